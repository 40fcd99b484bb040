"""``fedmqtt predict``: classify image files with a model that ``fedmqtt export`` wrote (or any fedmqtt model file).

This module also owns what an exported model records about itself (:class:`ModelMeta`: the model's name, number of
classes, input shape, the data set whose normalisation the model expects, class names, how it was compressed) and
how any export is loaded (:func:`load_exported`), so ``fedmqtt export`` writes and checks exactly what ``predict``
reads. Where the metadata lives:

- a TorchScript archive: the extra file ``fedmqtt.json`` (``torch.jit.save(..., _extra_files=...)``);
- an ONNX model: the ``metadata_props`` entry ``fedmqtt``;
- a fedmqtt model file (:mod:`fedmqtt.model_file`): its own model name and classes, plus ``meta["dataset"]``
  (MNIST when absent).

The kind of file is told by its content, never its name: a fedmqtt model file is an npz archive holding
``__state__.npy``; a TorchScript archive is a zip holding ``*/extra/fedmqtt.json`` and TorchScript code; an ONNX
model is a protobuf whose first field is the IR version (first byte 0x08). Images are decoded by torchvision's
own decoders (PNG, JPEG, any size, gray, RGB or with alpha), converted to the model's channels, resized to its
input size and normalised as the training data is (:data:`fedmqtt.data.NORMALISATION`).
"""

from __future__ import annotations

import json
import sys
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmqtt.errors import FedmqttError

__all__ = [
    "META_KEY",
    "ExportedModel",
    "ExportedModelError",
    "ImageError",
    "ModelMeta",
    "Prediction",
    "class_names_for",
    "load_exported",
    "load_image",
    "meta_for",
    "module_logits",
    "predict_images",
    "register",
]

META_KEY = "fedmqtt.json"  # the TorchScript extra file; the ONNX metadata_props key is ONNX_META_KEY
ONNX_META_KEY = "fedmqtt"
META_FORMAT: Literal["fedmqtt-export-meta"] = "fedmqtt-export-meta"

# Names of the classes of the data sets fedmqtt knows (index = label).
_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
}

ExportFormat = Literal["torchscript", "onnx", "state"]
FORMATS: tuple[str, ...] = ("torchscript", "onnx", "state")


class ExportedModelError(FedmqttError):
    """A file is not a model that ``fedmqtt predict`` can load, or its metadata is missing or damaged."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"model {path}: {problem}")
        self.path = str(path)
        self.problem = problem


class ImageError(FedmqttError):
    """One image cannot be read or decoded."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class ModelMeta(BaseModel):
    """What an exported model records about itself: everything ``predict`` needs to feed it and name its output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["fedmqtt-export-meta"] = META_FORMAT
    version: Literal[1] = 1
    model: str = Field(min_length=1, max_length=64)
    num_classes: int = Field(ge=2)
    input_shape: tuple[int, int, int]  # C×H×W of one sample
    dataset: str
    normalisation: tuple[float, float]  # (mean, std) of pixels scaled to [0, 1], as the training data
    class_names: tuple[str, ...] | None = None
    int8: Literal["static", "dynamic"] | None = None
    quant_engine: str | None = None
    pruned: float | None = Field(default=None, ge=0.0, lt=1.0)
    source_digest: str | None = None  # arrays_digest of the float32 tensors it was made from

    def to_json(self) -> str:
        return self.model_dump_json()

    def label(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)


def class_names_for(dataset: str, num_classes: int) -> tuple[str, ...] | None:
    names = _CLASS_NAMES.get(dataset)
    return names if names is not None and len(names) == num_classes else None


def meta_for(
    model: str,
    num_classes: int,
    dataset: str,
    *,
    int8: Literal["static", "dynamic"] | None = None,
    quant_engine: str | None = None,
    pruned: float | None = None,
    source_digest: str | None = None,
) -> ModelMeta:
    """The metadata of ``model`` trained on ``dataset`` (its input shape and normalisation from the registries)."""
    from fedmqtt.data import NORMALISATION, _check_dataset_name
    from fedmqtt.models import model_input_shape

    _check_dataset_name(dataset)
    return ModelMeta(
        model=model,
        num_classes=num_classes,
        input_shape=model_input_shape(model),
        dataset=dataset,
        normalisation=NORMALISATION[dataset],
        class_names=class_names_for(dataset, num_classes),
        int8=int8,
        quant_engine=quant_engine,
        pruned=pruned,
        source_digest=source_digest,
    )


def _parse_meta(path: Path, text: str | bytes, where: str) -> ModelMeta:
    if not text:
        raise ExportedModelError(path, f"has no fedmqtt metadata ({where}); write it with `fedmqtt export`")
    try:
        return ModelMeta.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "document"
        raise ExportedModelError(path, f"has damaged fedmqtt metadata ({where}): {field}: {first['msg']}") from None


# --------------------------------------------------------------------------------------------------
# Loading any export


@dataclass
class ExportedModel:
    """A loaded export: its kind, its metadata, and ``logits(batch)`` (float32 N×C×H×W in, N×classes out)."""

    path: Path
    kind: ExportFormat
    meta: ModelMeta
    logits: Callable[[np.ndarray], np.ndarray]


def _zip_names(path: Path) -> list[str] | None:
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None


def module_logits(module: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def logits(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).float().numpy()

    return logits


def _load_state(path: Path) -> ExportedModel:
    from fedmqtt.model_file import check_model, load_model_file
    from fedmqtt.models import build_model, set_arrays

    held = load_model_file(path)
    dataset = held.meta.get("dataset", "mnist")
    try:
        meta = meta_for(
            held.model,
            held.num_classes,
            str(dataset),
            pruned=held.meta.get("pruned"),
            source_digest=held.meta.get("source_digest", held.digest),
        )
    except (FedmqttError, ValidationError) as exc:
        raise ExportedModelError(path, f"has metadata predict cannot use: {exc}") from None
    model = build_model(held.model, num_classes=held.num_classes)
    set_arrays(model, check_model(held, held.model, path=path, num_classes=held.num_classes))
    return ExportedModel(path, "state", meta, module_logits(model.eval()))


def _load_torchscript(path: Path) -> ExportedModel:
    import torch

    extra = {META_KEY: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14: "torch.jit.load is deprecated"
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportedModelError(path, f"is not a loadable TorchScript archive ({first})") from None
    meta = _parse_meta(path, extra[META_KEY], f"extra file {META_KEY}")
    return ExportedModel(path, "torchscript", meta, module_logits(module.eval()))


def _load_onnx(path: Path) -> ExportedModel:
    from fedmqtt.extras import require

    ort = require("export", "onnxruntime", "running an ONNX model")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unparsable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportedModelError(path, f"is not a loadable ONNX model ({first[:200]})") from None
    props = session.get_modelmeta().custom_metadata_map
    meta = _parse_meta(path, props.get(ONNX_META_KEY, ""), f"metadata_props {ONNX_META_KEY!r}")
    input_name = session.get_inputs()[0].name

    def logits(batch: np.ndarray) -> np.ndarray:
        out = session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    return ExportedModel(path, "onnx", meta, logits)


def load_exported(path: Path | str) -> ExportedModel:
    """Load a TorchScript, ONNX or fedmqtt model file (told apart by content) with its metadata."""
    from fedmqtt.paths import input_file_problem

    path = Path(path)
    problem = input_file_problem(path)
    if problem is not None:
        raise ExportedModelError(path, problem)
    names = _zip_names(path)
    if names is not None:
        if "__state__.npy" in names:
            return _load_state(path)
        if any(n.endswith(f"/extra/{META_KEY}") for n in names) or any("/code/" in n for n in names):
            return _load_torchscript(path)
        raise ExportedModelError(path, "is a zip archive but neither a fedmqtt model file nor a TorchScript model")
    with open(path, "rb") as handle:
        head = handle.read(1)
    if head == b"\x08":
        return _load_onnx(path)
    raise ExportedModelError(
        path, "is not a model fedmqtt can run (a TorchScript, ONNX or fedmqtt model file written by `fedmqtt export`)"
    )


# --------------------------------------------------------------------------------------------------
# Images


def load_image(path: Path | str, meta: ModelMeta) -> np.ndarray:
    """One image file as the model's input: float32 C×H×W, resized and normalised (:class:`ImageError` if not)."""
    from fedmqtt.extras import require

    tv_io = require("vision", "torchvision.io", "reading images")
    functional = require("vision", "torchvision.transforms.v2.functional", "resizing images")
    import torch

    path = Path(path)
    channels, height, width = meta.input_shape
    if channels not in (1, 3):
        raise ImageError(path, f"the model takes {channels}-channel input; predict reads gray or RGB images")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            data = tv_io.read_file(str(path))
    except RuntimeError as exc:
        from fedmqtt.paths import input_file_problem

        raise ImageError(path, input_file_problem(path) or f"cannot be read ({exc})") from None
    mode = tv_io.ImageReadMode.GRAY if channels == 1 else tv_io.ImageReadMode.RGB
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            image = tv_io.decode_image(data, mode=mode)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageError(path, f"is not a readable PNG or JPEG image ({first[:160]})") from None
    if image.dim() != 3 or image.shape[0] != channels or image.dtype != torch.uint8:
        raise ImageError(path, f"decoded to an unexpected shape {tuple(image.shape)} ({image.dtype})")
    if tuple(image.shape[1:]) != (height, width):
        image = functional.resize(image, [height, width], antialias=True)
    mean, std = meta.normalisation
    pixels = image.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return pixels.numpy()


@dataclass(frozen=True)
class Prediction:
    path: str
    label: int | None = None
    name: str | None = None
    confidence: float | None = None
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path,
            "class": self.label,
            "name": self.name,
            "confidence": self.confidence,
            "top": [{"name": n, "confidence": c} for n, c in self.top],
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_images(model: ExportedModel, images: Sequence[Path | str], *, top: int = 1) -> list[Prediction]:
    """One :class:`Prediction` per image, in order; an unreadable image gets one with ``error`` set."""
    loaded: list[tuple[int, np.ndarray]] = []
    results: list[Prediction | None] = [None] * len(images)
    for i, image in enumerate(images):
        try:
            loaded.append((i, load_image(image, model.meta)))
        except ImageError as exc:
            results[i] = Prediction(str(image), error=exc.problem)
    if loaded:
        probabilities = _softmax(model.logits(np.stack([pixels for _, pixels in loaded])))
        k = max(1, min(top, probabilities.shape[1]))
        for (i, _), row in zip(loaded, probabilities, strict=True):
            order = np.argsort(-row, kind="stable")[:k]
            best = int(order[0])
            results[i] = Prediction(
                str(images[i]),
                label=best,
                name=model.meta.label(best),
                confidence=float(row[best]),
                top=tuple((model.meta.label(int(j)), float(row[j])) for j in order),
            )
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------------------------------
# Command line


def run_predict(args: Any) -> int:
    from fedmqtt.errors import ConfigError

    if args.top < 1:
        raise ConfigError("--top", f"must be at least 1, got {args.top}")
    try:
        model = load_exported(args.model)
    except ExportedModelError as exc:
        raise ConfigError("--model", str(exc)) from None
    predictions = predict_images(model, args.images, top=args.top)
    failed = [p for p in predictions if p.error is not None]
    if args.json:
        document = {
            "model": str(model.path),
            "kind": model.kind,
            "meta": json.loads(model.meta.to_json()),
            "predictions": [p.as_dict() for p in predictions],
            "errors": len(failed),
        }
        print(json.dumps(document, indent=2))
    else:
        for p in predictions:
            if p.error is not None:
                continue
            extra = "  " + ", ".join(f"{n} {c:.3f}" for n, c in p.top[1:]) if len(p.top) > 1 else ""
            print(f"{p.path}\t{p.name}\t{p.confidence:.3f}{extra}")
    for p in failed:
        print(f"fedmqtt predict: error: {p.path}: {p.error}", file=sys.stderr)
    return 1 if failed else 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify image files with an exported model (TorchScript, ONNX or fedmqtt model file)",
        description="Classify PNG or JPEG images (any size, gray or colour: converted, resized and normalised to "
        "the model's input) with a model written by `fedmqtt export`, a pretrained model file or a release. "
        "Prints path, class and confidence per image; an image that cannot be read is reported on stderr and "
        "makes the exit status 1, the others are still classified.",
    )
    parser.add_argument("--model", required=True, type=Path, help="the model file (its kind is read from its content)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG or JPEG)")
    parser.add_argument("--top", type=int, default=1, help="also list the K most likely classes (default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.set_defaults(func=run_predict)
