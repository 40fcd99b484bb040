"""The model file: fedmqtt's own safe format for one model's weights (no pickle, nothing executed on load).

What ``fedmqtt pretrain`` writes, ``--init-checkpoint`` reads, ``fedmqtt export --format state`` writes and
``fedmqtt predict`` and ``fedmqtt device --serve`` load. It is a :mod:`fedmqtt.checkpoint` state (npz members plus
one JSON document): the model's registry name, its number of classes, the float32 tensors in the model's order,
their digest (:func:`fedmqtt.codecs.downlink.arrays_digest`, the same content hash the downlink uses) and free
metadata (how it was made, the accuracy it reached). Loading checks the digest, so a damaged or altered file is
refused, and :func:`check_model` names every tensor that does not fit the model a job uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmqtt.arrays import ModelArrays
from fedmqtt.checkpoint import CheckpointError, load_state, save_state
from fedmqtt.codecs.downlink import arrays_digest
from fedmqtt.errors import FedmqttError

__all__ = ["MODEL_FILE_FORMAT", "ModelFile", "ModelFileError", "check_model", "load_model_file", "save_model_file"]

MODEL_FILE_FORMAT = "fedmqtt-model"
_VERSION = 1


class ModelFileError(FedmqttError):
    """A model file cannot be written, read, or does not fit the model it is meant for."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"model file {path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class ModelFile:
    model: str
    num_classes: int
    arrays: ModelArrays
    digest: str
    meta: dict[str, Any] = field(default_factory=dict)


def save_model_file(
    path: Path,
    model: str,
    arrays: Mapping[str, np.ndarray],
    *,
    num_classes: int = 10,
    meta: Mapping[str, Any] | None = None,
) -> ModelFile:
    """Write ``arrays`` (float32, in the model's order) as a model file, atomically; return what was written."""
    tensors: ModelArrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    digest = arrays_digest(tensors)
    state = {
        "format": MODEL_FILE_FORMAT,
        "version": _VERSION,
        "model": model,
        "num_classes": int(num_classes),
        "digest": digest,
        "names": list(tensors),
        "tensors": tensors,
        "meta": dict(meta or {}),
    }
    try:
        save_state(Path(path), state)
    except OSError as exc:
        raise ModelFileError(path, f"cannot be written ({exc.strerror or exc})") from None
    return ModelFile(model, int(num_classes), tensors, digest, dict(meta or {}))


def load_model_file(path: Path) -> ModelFile:
    """Read and verify a model file (format, version, tensor order, digest)."""
    try:
        state = load_state(Path(path))
    except CheckpointError as exc:
        raise ModelFileError(path, f"is not readable as a fedmqtt model file ({exc.reason})") from None
    if state.get("format") != MODEL_FILE_FORMAT:
        raise ModelFileError(
            path, "is not a fedmqtt model file (write one with `fedmqtt pretrain` or `fedmqtt export`)"
        )
    if state.get("version") != _VERSION:
        raise ModelFileError(path, f"has format version {state.get('version')!r}; this fedmqtt reads {_VERSION}")
    tensors, names = state.get("tensors"), state.get("names")
    if not isinstance(tensors, dict) or not isinstance(names, list) or sorted(names) != sorted(tensors):
        raise ModelFileError(path, "is damaged: its tensor list does not match its tensors")
    arrays: ModelArrays = {}
    for name in names:
        value = tensors[name]
        if not isinstance(value, np.ndarray) or value.dtype != np.float32:
            raise ModelFileError(path, f"is damaged: tensor {name!r} is not a float32 array")
        arrays[name] = value
    if arrays_digest(arrays) != state.get("digest"):
        raise ModelFileError(path, "is damaged or was altered: its tensors do not match the digest it records")
    model, num_classes, meta = state.get("model"), state.get("num_classes"), state.get("meta")
    if not isinstance(model, str) or not isinstance(num_classes, int) or not isinstance(meta, dict):
        raise ModelFileError(path, "is damaged: model name, number of classes or metadata missing")
    return ModelFile(model, num_classes, arrays, str(state["digest"]), meta)


def check_model(model_file: ModelFile, model: str, *, path: Path | str, num_classes: int = 10) -> ModelArrays:
    """The file's arrays in ``model``'s order, or :class:`ModelFileError` naming what does not fit."""
    from fedmqtt.models import model_manifest

    if model_file.model != model:
        raise ModelFileError(path, f"holds a {model_file.model!r} model, not {model!r}: use --model {model_file.model}")
    if model_file.num_classes != num_classes:
        raise ModelFileError(path, f"has {model_file.num_classes} classes; the job has {num_classes}")
    manifest = model_manifest(model, num_classes=num_classes)
    problems = []
    for entry in manifest:
        held = model_file.arrays.get(entry.name)
        if held is None:
            problems.append(f"{entry.name} missing")
        elif tuple(held.shape) != tuple(entry.shape):
            problems.append(f"{entry.name} has shape {tuple(held.shape)}, the model wants {tuple(entry.shape)}")
    extra = sorted(set(model_file.arrays) - {e.name for e in manifest})
    problems += [f"{name} is not a tensor of {model}" for name in extra]
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ModelFileError(path, f"does not fit {model}: {shown}")
    return {entry.name: model_file.arrays[entry.name] for entry in manifest}
