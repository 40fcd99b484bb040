"""Atomic checkpoints of server or device state: one ``.npz`` file, written then renamed (:mod:`fedmqtt.atomic`).

State is a nested dict of JSON values and numpy arrays. Arrays are stored as npz members and the rest as one
JSON document, so a checkpoint never goes through pickle and loads without executing anything.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedmqtt.atomic import atomic_file, write_atomic
from fedmqtt.errors import FedmqttError

__all__ = ["CheckpointError", "load_state", "save_state", "write_atomic"]

_STATE_KEY = "__state__"
_ARRAY_MARK = "__array__"


class CheckpointError(FedmqttError):
    """A checkpoint cannot be written or read; ``reason`` says why without the advice (for callers with their own)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def _split(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {_ARRAY_MARK: key}
    if isinstance(value, dict):
        return {str(k): _split(v, arrays) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _join(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_MARK}:
            return np.array(arrays[value[_ARRAY_MARK]])
        return {k: _join(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, arrays) for v in value]
    return value


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably (:func:`fedmqtt.atomic.atomic_file`)."""
    arrays: dict[str, np.ndarray] = {}
    document = json.dumps(_split(state, arrays), allow_nan=True)
    arrays[_STATE_KEY] = np.frombuffer(document.encode("utf-8"), dtype=np.uint8)
    with atomic_file(path) as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]


def load_state(path: Path) -> dict[str, Any]:
    """Read a state written by :func:`save_state`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            document = bytes(npz[_STATE_KEY]).decode("utf-8")
            arrays = {k: npz[k] for k in npz.files if k != _STATE_KEY}
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}", reason="no such file") from None
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        if "pickle" in str(exc):  # numpy's message suggests loading it unsafely: never, and never advise it
            exc = ValueError("it holds pickled Python objects, which fedmqtt never loads")
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({exc}); remove it or start without --resume",
            reason=str(exc) or type(exc).__name__,
        ) from None
    result = _join(json.loads(document), arrays)
    if not isinstance(result, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dictionary")
    return result
