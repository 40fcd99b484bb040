"""Helpers of tests/test_export.py and tests/test_predict.py: a briefly trained model and MNIST test images as files.

Real data (the original MNIST files in ../shared/data), real training (:func:`fedmqtt.training.train_local`), real
image files (torchvision's own PNG and JPEG encoders).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import SHARED_DATA
from fedmqtt.data import load_dataset, read_idx_file
from fedmqtt.model_file import save_model_file
from fedmqtt.models import build_model, get_arrays
from fedmqtt.training import train_local

MNIST = SHARED_DATA / "mnist"


def train_model_file(model: str, path: Path, *, samples: int, seed: int = 1) -> Path:
    """``model`` trained one epoch on the first ``samples`` MNIST training images, written as a model file."""
    train = load_dataset("mnist", SHARED_DATA, train=True).subset(np.arange(samples))
    net = build_model(model, seed=seed)
    train_local(net, train, epochs=1, batch_size=50, lr=0.05, momentum=0.9, seed=seed)
    save_model_file(path, model, get_arrays(net), meta={"dataset": "mnist", "made_by": "tests/exported.py"})
    return path


def mnist_test_pixels(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` MNIST test images (uint8, N×28×28) and labels, read straight from the IDX files."""
    images = read_idx_file(MNIST / "t10k-images-idx3-ubyte.gz", 3)[:count]
    labels = read_idx_file(MNIST / "t10k-labels-idx1-ubyte.gz", 1)[:count]
    return images, labels


def write_pngs(directory: Path, images: np.ndarray) -> list[Path]:
    from torchvision.io import encode_png

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = directory / f"{i:04d}.png"
        path.write_bytes(bytes(encode_png(torch.from_numpy(image.copy()).unsqueeze(0)).numpy()))
        paths.append(path)
    return paths


def write_jpegs(directory: Path, images: np.ndarray, *, size: int = 64, rgb: bool = True) -> list[Path]:
    """Each image resized to ``size``×``size`` (and made RGB) and written as a JPEG (quality 90)."""
    from torchvision.io import encode_jpeg
    from torchvision.transforms.v2.functional import resize

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        pixels = resize(torch.from_numpy(image.copy()).unsqueeze(0), [size, size], antialias=True)
        if rgb:
            pixels = pixels.expand(3, size, size).contiguous()
        path = directory / f"{i:04d}.jpg"
        path.write_bytes(bytes(encode_jpeg(pixels, quality=90).numpy()))
        paths.append(path)
    return paths


def float_probabilities(model_file: Path, count: int) -> np.ndarray:
    """The float32 model of ``model_file``'s class probabilities (count × classes) for the first ``count`` MNIST
    test images (the training pipeline's own loading and normalisation)."""
    from fedmqtt.model_file import check_model, load_model_file
    from fedmqtt.models import set_arrays

    held = load_model_file(model_file)
    net = build_model(held.model, num_classes=held.num_classes).eval()
    set_arrays(net, check_model(held, held.model, path=model_file))
    test = load_dataset("mnist", SHARED_DATA, train=False)
    with torch.inference_mode():
        return torch.softmax(net(test.images[:count]), dim=1).numpy()


def float_classes(model_file: Path, count: int) -> np.ndarray:
    """The classes the float32 model of ``model_file`` gives the first ``count`` MNIST test images."""
    return float_probabilities(model_file, count).argmax(axis=1)


INT8_AGREEMENT = 0.95  # int8 classes equal the float model's on at least this share of the images, and
NEAR_TIE = 0.25  # where they differ, the float model itself hardly preferred its class: p(its) - p(int8's) below this


def assert_int8_faithful(int8_classes: np.ndarray, float_probs: np.ndarray, what: object) -> None:
    """int8 is a faithful copy of the float model: it may change a class only where the float model was near a tie
    between the two (rounding moves logits a little; a briefly trained model has a few such images, and which of
    them flip varies from run to run), and it agrees on nearly all images."""
    float_classes_ = float_probs.argmax(axis=1)
    rows = np.arange(len(int8_classes))
    gaps = float_probs[rows, float_classes_] - float_probs[rows, int8_classes]
    flipped = np.flatnonzero(int8_classes != float_classes_)
    agreement = 1.0 - len(flipped) / len(int8_classes)
    assert agreement >= INT8_AGREEMENT, (what, agreement, gaps[flipped].round(3).tolist())
    assert (gaps[flipped] < NEAR_TIE).all(), (what, "int8 changed a confident class", gaps[flipped].round(3).tolist())
