"""The model file: round trip, digest check, refusal of damaged, foreign and mismatched files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedmqtt.checkpoint import save_state
from fedmqtt.model_file import ModelFileError, check_model, load_model_file, save_model_file
from fedmqtt.models import build_model, get_arrays


def _mlp_arrays() -> dict[str, np.ndarray]:
    return get_arrays(build_model("mlp", seed=3))


def test_round_trip_keeps_order_values_and_meta(tmp_path: Path) -> None:
    arrays = _mlp_arrays()
    written = save_model_file(tmp_path / "m.fedmodel", "mlp", arrays, meta={"accuracy": 0.9})
    loaded = load_model_file(tmp_path / "m.fedmodel")
    assert loaded.model == "mlp" and loaded.num_classes == 10 and loaded.meta == {"accuracy": 0.9}
    assert list(loaded.arrays) == list(arrays)
    assert all(np.array_equal(loaded.arrays[k], arrays[k]) for k in arrays)
    assert loaded.digest == written.digest
    assert list(check_model(loaded, "mlp", path="m")) == list(arrays)


def test_altered_tensor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.fedmodel"
    save_model_file(path, "mlp", _mlp_arrays())
    # Rewrite the file with one value changed but the old digest kept.
    from fedmqtt.checkpoint import load_state

    state = load_state(path)
    first = state["names"][0]
    state["tensors"][first] = state["tensors"][first].copy()
    state["tensors"][first].flat[0] += 1.0
    save_state(path, state)
    with pytest.raises(ModelFileError, match="do not match the digest"):
        load_model_file(path)


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_garbage_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "m.fedmodel"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not readable"):
        load_model_file(path)


def test_missing_file_and_other_state(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not readable"):
        load_model_file(tmp_path / "absent")
    save_state(tmp_path / "other.npz", {"round": 3})
    with pytest.raises(ModelFileError, match="not a fedmqtt model file"):
        load_model_file(tmp_path / "other.npz")


def test_pickle_payload_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, __state__=np.array([object()], dtype=object))
    with pytest.raises(ModelFileError):
        load_model_file(path)
    assert zipfile.is_zipfile(path)


def test_other_model_and_shapes_are_named(tmp_path: Path) -> None:
    path = tmp_path / "m.fedmodel"
    save_model_file(path, "mlp", _mlp_arrays())
    loaded = load_model_file(path)
    with pytest.raises(ModelFileError, match="holds a 'mlp' model, not 'cnn'"):
        check_model(loaded, "cnn", path=path)
    with pytest.raises(ModelFileError, match="has 10 classes; the job has 7"):
        check_model(loaded, "mlp", path=path, num_classes=7)
    arrays = _mlp_arrays()
    name = next(iter(arrays))
    arrays[name] = np.zeros((2, 2), dtype=np.float32)
    save_model_file(path, "mlp", arrays)
    with pytest.raises(ModelFileError, match=f"{name} has shape \\(2, 2\\)"):
        check_model(load_model_file(path), "mlp", path=path)
