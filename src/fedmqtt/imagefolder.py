"""Device data as a directory of images per class (torchvision's ``ImageFolder`` layout): what a camera collects.

    DIR/0/img001.png  DIR/0/img002.jpg  ...  DIR/9/img777.png

Each class folder is named by the class index it holds, as a decimal number (``0`` ... ``9`` for MNIST and
Fashion-MNIST): the mapping from folders to the model's classes is explicit, so a device holding only some
classes (folders ``3`` and ``7``) still labels them 3 and 7, where ImageFolder's own ``class_to_idx`` would say
0 and 1. Folders and files are listed as ImageFolder lists them (torchvision's ``find_classes`` and
``make_dataset``: sorted), and images are read with torchvision's own decoders (PNG and JPEG, as ``fedmqtt predict`` reads them), converted to the
model's input (:func:`fedmqtt.models.model_input_shape`: gray or RGB, resized when the size differs) and normalised
as the IDX data sets are (:data:`fedmqtt.data.NORMALISATION`), so a 28×28 gray PNG written from an IDX image
gives exactly that image's training sample. Needs the ``vision`` extra (torchvision).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fedmqtt.data import IMAGE_SIZE, NORMALISATION, NUM_CLASSES, DatasetError, ImageDataset
from fedmqtt.extras import require

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderError",
    "class_folders",
    "is_imagefolder",
    "load_imagefolder",
    "read_image",
    "to_model_input",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageFolderError(DatasetError):
    """An image directory is not a usable ImageFolder of the model's classes."""

    def __init__(self, directory: Path | str, problem: str) -> None:
        super().__init__(f"image folder {directory}: {problem}")
        self.directory = str(directory)
        self.problem = problem


def _visible_subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_imagefolder(directory: Path | str) -> bool:
    """True when ``directory`` looks like an ImageFolder (a visible subdirectory holding an image file directly)
    and not like an IDX data set (no ``*-ubyte`` file in it): ``--data-format auto``'s test."""
    base = Path(directory)
    if not base.is_dir() or any("-ubyte" in p.name for p in base.iterdir() if p.is_file()):
        return False
    return any(
        f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS for sub in _visible_subdirs(base) for f in sub.iterdir()
    )


def class_folders(directory: Path | str, num_classes: int = NUM_CLASSES) -> dict[str, int]:
    """The class folders of ``directory`` (ImageFolder's ``find_classes``, sorted) and the class index each names;
    :class:`ImageFolderError` names every folder that is not a class index below ``num_classes``."""
    folder = require("vision", "torchvision.datasets.folder", "ImageFolder device data (--data-format imagefolder)")
    base = Path(directory)
    if not base.is_dir():
        raise ImageFolderError(base, "is not a directory")
    try:
        names, _ = folder.find_classes(os.fspath(base))
    except FileNotFoundError:
        raise ImageFolderError(
            base, f"has no class folders; put the images of class k in {base}/k/ (k = 0..{num_classes - 1})"
        ) from None
    bad = [n for n in names if not (n.isdecimal() and n == str(int(n)) and int(n) < num_classes)]
    if bad:
        shown = ", ".join(repr(n) for n in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ImageFolderError(
            base,
            f"folder(s) {shown} do not name a class: name each class folder by the class index it holds, "
            f"0..{num_classes - 1} (e.g. {base}/3/ for the images of class 3); found {', '.join(names[:20])}",
        )
    return {name: int(name) for name in names}


def read_image(path: Path | str, channels: int) -> torch.Tensor:
    """One PNG or JPEG file as uint8 C×H×W, gray (``channels`` 1) or RGB (3), decoded by torchvision's own decoders
    (as ``fedmqtt predict`` decodes); :class:`ImageFolderError` if it is not a readable image."""
    tv_io = require("vision", "torchvision.io", "reading images (PNG, JPEG)")
    mode = tv_io.ImageReadMode.GRAY if channels == 1 else tv_io.ImageReadMode.RGB
    try:
        pixels = tv_io.decode_image(tv_io.read_file(str(path)), mode=mode)
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ImageFolderError(Path(path).parent, f"{path} is not a readable PNG or JPEG image ({first})") from None
    if pixels.dim() != 3 or pixels.shape[0] != channels or pixels.dtype != torch.uint8:
        raise ImageFolderError(
            Path(path).parent, f"{path} decoded to an unexpected {tuple(pixels.shape)} {pixels.dtype}"
        )
    return pixels


def to_model_input(pixels: torch.Tensor, *, input_shape: tuple[int, int, int], dataset: str = "mnist") -> torch.Tensor:
    """uint8 C×H×W pixels as one model input (float32 ``input_shape``): resized (antialiased) when the size differs,
    scaled to [0, 1] and normalised with ``NORMALISATION[dataset]``, as the IDX data sets are. What a device trains
    on and what a prediction should be given."""
    functional = require("vision", "torchvision.transforms.v2.functional", "resizing images")
    mean, std = NORMALISATION[dataset]
    if tuple(pixels.shape[1:]) != tuple(input_shape[1:]):
        pixels = functional.resize(pixels, list(input_shape[1:]), antialias=True)
    return pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def load_imagefolder(
    directory: Path | str, *, dataset: str = "mnist", input_shape: tuple[int, int, int] = (1, IMAGE_SIZE, IMAGE_SIZE)
) -> ImageDataset:
    """Every image of an ImageFolder as an :class:`ImageDataset` for a model taking ``input_shape`` (C×H×W, C 1 or
    3), normalised with ``NORMALISATION[dataset]`` (the statistics the model's training data set uses)."""
    if dataset not in NORMALISATION:
        raise ImageFolderError(directory, f"unknown data set {dataset!r} for the normalisation")
    channels = input_shape[0]
    if channels not in (1, 3):
        raise ImageFolderError(directory, f"the model takes {channels} channels; images give 1 (gray) or 3 (RGB)")
    folder = require("vision", "torchvision.datasets.folder", "ImageFolder device data (--data-format imagefolder)")
    base = Path(directory)
    mapping = class_folders(base)
    try:
        samples = folder.make_dataset(os.fspath(base), mapping, extensions=IMAGE_EXTENSIONS)
    except FileNotFoundError as exc:
        raise ImageFolderError(base, f"{exc} (read: {', '.join(IMAGE_EXTENSIONS)})") from None
    images = torch.empty((len(samples), *input_shape), dtype=torch.float32)
    labels = np.empty(len(samples), dtype=np.int64)
    for index, (path, label) in enumerate(samples):
        images[index] = to_model_input(read_image(path, channels), input_shape=input_shape, dataset=dataset)
        labels[index] = label
    return ImageDataset(images, torch.from_numpy(labels), num_classes=NUM_CLASSES)
