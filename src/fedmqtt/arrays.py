"""Model tensors as plain numpy: the currency of the pure core.

``ModelArrays`` is an ordered ``dict[str, np.ndarray]`` of float32 arrays (the order of the model's
``state_dict``). Codecs, aggregation and DP take and return these; torch appears only at the edges
(``fedmqtt.models``), as Flower's strategies work on numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedmqtt.schema import ManifestEntry

ModelArrays = dict[str, np.ndarray]


def manifest_of(arrays: Mapping[str, np.ndarray]) -> tuple[ManifestEntry, ...]:
    return tuple(ManifestEntry(name=k, shape=tuple(int(d) for d in v.shape)) for k, v in arrays.items())


def manifest_matches(arrays: Mapping[str, np.ndarray], manifest: Sequence[ManifestEntry]) -> bool:
    return manifest_of(arrays) == tuple(manifest)


def zeros_like(arrays: Mapping[str, np.ndarray]) -> ModelArrays:
    return {k: np.zeros_like(v, dtype=np.float32) for k, v in arrays.items()}


def add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> ModelArrays:
    return {k: (a[k] + b[k]).astype(np.float32, copy=False) for k in a}


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> ModelArrays:
    return {k: (a[k] - b[k]).astype(np.float32, copy=False) for k in a}


def scale(a: Mapping[str, np.ndarray], factor: float) -> ModelArrays:
    return {k: (v * np.float32(factor)).astype(np.float32, copy=False) for k, v in a.items()}


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every tensor (float64 accumulation)."""
    total = 0.0
    for v in arrays.values():
        flat = v.astype(np.float64, copy=False).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(v).all()) for v in arrays.values())


def numel(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(int(v.size) for v in arrays.values())


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float32 vector (manifest order)."""
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([v.astype(np.float32, copy=False).ravel() for v in arrays.values()])


def unflatten(vector: np.ndarray, manifest: Iterable[ManifestEntry]) -> ModelArrays:
    out: ModelArrays = {}
    offset = 0
    for entry in manifest:
        n = entry.numel
        out[entry.name] = vector[offset : offset + n].astype(np.float32, copy=False).reshape(entry.shape)
        offset += n
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, manifest needs {offset}")
    return out
