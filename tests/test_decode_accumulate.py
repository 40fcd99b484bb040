"""The coordinator's per-update hot path (decode, dequantise, FedAvg's weighted sum) gives the values of its
straightforward form, bit for bit, and the scripts that measure it (benchmarks/aggregation.py, memory.py) run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.codecs import decode_frame, encode_frame
from fedmqtt.codecs.encodings import dequantize
from fedmqtt.coordinator.aggregation import _ADD_BLOCK, build_strategy
from fedmqtt.data import write_idx_dataset
from fedmqtt.schema import CodecSpec, FrameKind

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Tensors smaller than, equal to, and several blocks (with a remainder) larger than FedAvg's add block.
SHAPES = {"w": (3, _ADD_BLOCK // 3 + 7), "b": (5,), "exact": (_ADD_BLOCK,), "big": (2 * _ADD_BLOCK + 11,)}


def _updates(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s, dtype=np.float32) * np.float32(rng.uniform(1e-4, 1e3)) for k, s in SHAPES.items()}
            for _ in range(count)]  # fmt: skip


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    weights=st.lists(st.one_of(st.integers(0, 10**6), st.floats(1e-6, 1e6)), min_size=1, max_size=5),
)
def test_fedavg_add_equals_the_plain_float64_weighted_sum(seed: int, weights: list[float]) -> None:
    updates = _updates(len(weights), seed)
    start = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}
    strategy = build_strategy("fedavg")
    strategy.begin_round(start)
    expected = {k: np.zeros(s, dtype=np.float64) for k, s in SHAPES.items()}
    for update, weight in zip(updates, weights, strict=True):
        strategy.add(update, weight)
        for k, total in expected.items():
            total += update[k].astype(np.float64) * float(weight)
    assert {k: v.tolist() for k, v in strategy._sum.items()} == {k: v.tolist() for k, v in expected.items()}
    if sum(weights) > 0:
        got = strategy.aggregate()
        for k, total in expected.items():
            assert np.array_equal(got[k], start[k] + (total / sum(float(w) for w in weights)).astype(np.float32))


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e36, 3e36]),  # the last ones overflow float32 once scaled
)
def test_per_channel_dequantize_equals_cast_then_scale(rows: int, cols: int, seed: int, magnitude: float) -> None:
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, rows * cols, dtype=np.int8)
    scales = (rng.random(rows, dtype=np.float32) * np.float32(magnitude)).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = (q.reshape(rows, -1).astype(np.float32) * scales[:, None]).reshape(-1)
        got = dequantize(q, scales, None, rows)
    assert got.dtype == np.float32 and got.shape == (rows * cols,)
    assert np.array_equal(got, expected)


def test_int8c_frames_decode_to_the_per_channel_values() -> None:
    update = _updates(1, 3)[0]
    frame = encode_frame(update, kind=FrameKind.UPDATE, job="j", round=1, sender="d", codec=CodecSpec.parse("int8c"),
                         num_samples=1, rng=np.random.default_rng(0))  # fmt: skip
    decoded = decode_frame(frame).arrays
    for name, value in update.items():
        # Per-channel int8 keeps every value within half a step of its channel's scale (amax / 127).
        flat = value.reshape(value.shape[0], -1) if value.ndim > 1 else value.reshape(1, -1)
        step = np.abs(flat).max(axis=1, keepdims=True) / 127
        error = np.abs(decoded[name].reshape(flat.shape) - flat)
        assert (error <= step * 0.5 + 1e-6 * step).all(), name


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:  # the scripts import their shared helpers (benchmarks/_runner.py) by name
        sys.path.append(str(BENCHMARKS))  # appended: benchmarks/codecs.py must not shadow the stdlib
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aggregation_benchmark_runs_and_reports_ratios_to_the_numpy_limit(tmp_path: Path) -> None:
    out = tmp_path / "aggregation.json"
    code = _load("aggregation").main(
        ["--updates", "3", "--repeats", "1", "--codecs", "float16,topk:0.01+int8", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert code == 0 and result["targets_missed"] == []  # no int8 row: no goal to miss
    assert [r["codec"] for r in result["records"]] == ["float16", "topk:0.01+int8"]
    assert result["configuration"]["updates"] == 3 and result["configuration"]["parameters"] == 1_663_370
    for record in result["records"]:
        assert record["ratio_vs_numpy_limit"] == pytest.approx(result["numpy_limit"]["seconds"] / record["seconds"])
        assert record["updates_per_s"] == pytest.approx(3 / record["seconds"])


def test_memory_benchmark_measures_both_paths_in_subprocesses(tmp_path: Path) -> None:
    data = write_idx_dataset(tmp_path / "data", num_train=400, num_test=0, seed=1)
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "memory.py"), "--data-dir", str(data), "--devices", "2",
         "--num-parts", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [(r["mode"], r["devices"], r["samples"]) for r in result["records"]] == [("old", 2, 200), ("lean", 2, 200)]
    pids = {result["baseline"]["pid"], *(r["pid"] for r in result["records"])}
    assert len(pids) == 3  # one fresh process per measurement
    for record in result["records"]:
        assert record["hwm_mb"] >= record["rss_mb"] > 0
        assert record["mb_per_device"] == pytest.approx((record["rss_mb"] - result["baseline"]["rss_mb"]) / 2)
