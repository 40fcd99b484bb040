"""The coordinator's evaluation worker (fedmqtt.coordinator.evaluation): results in round order, errors reported
and never fatal, the worker's own torch thread count, and which rounds a restart can still evaluate."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmqtt.coordinator.evaluation import (
    EVAL_THREADS,
    Evaluation,
    Evaluator,
    evaluation_due,
    model_evaluation,
    unevaluated,
)

H = "ab" * 32  # a model hash
WAIT = 30.0


def arrays(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, dtype=np.float32)}


def mean_of(a: Any) -> tuple[float, float]:
    """An evaluation: accuracy = the mean entry (the tests pass values in [0, 1]), loss = 1 - accuracy."""
    value = float(np.mean(a["w"]))
    return value, 1.0 - value


def test_results_come_back_in_round_order_with_what_each_model_scored() -> None:
    evaluator = Evaluator(lambda cancelled: mean_of)
    for r, value in [(1, 0.25), (2, 0.5), (4, 0.75)]:
        evaluator.submit(r, H, arrays(value))
    assert evaluator.pending == (1, 2, 4)
    results = evaluator.wait(timeout=WAIT)
    assert [(e.round, e.accuracy, e.loss, e.model_hash, e.error) for e in results] == [
        (1, 0.25, 0.75, H, None),
        (2, 0.5, 0.5, H, None),
        (4, 0.75, 0.25, H, None),
    ]
    assert evaluator.pending == () and evaluator.poll() == []
    assert all(e.seconds >= 0 for e in results)
    evaluator.close()


def test_poll_never_blocks_and_a_slow_evaluation_holds_the_later_ones_behind_it() -> None:
    gate = threading.Event()

    def slow(a: Any) -> tuple[float, float]:
        if float(np.mean(a["w"])) == 0.25:
            assert gate.wait(WAIT)
        return mean_of(a)

    evaluator = Evaluator(lambda cancelled: slow)
    evaluator.submit(1, H, arrays(0.25))
    evaluator.submit(2, H, arrays(0.5))
    assert evaluator.poll() == []
    assert evaluator.wait(timeout=0.2) == []  # round 1 is held: nothing, not round 2 first
    assert evaluator.pending == (1, 2)
    gate.set()
    first = [e.round for e in evaluator.wait(through=1, timeout=WAIT)]  # round 1, and round 2 if ready by then
    assert first in ([1], [1, 2])
    assert first + [e.round for e in evaluator.wait(timeout=WAIT)] == [1, 2]
    evaluator.close()


def test_an_evaluation_that_raises_is_reported_and_the_next_one_still_runs() -> None:
    def flaky(a: Any) -> tuple[float, float]:
        if float(np.mean(a["w"])) == 0.5:
            raise RuntimeError("out of memory")
        return mean_of(a)

    evaluator = Evaluator(lambda cancelled: flaky)
    for r, value in [(1, 0.25), (2, 0.5), (3, 0.75)]:
        evaluator.submit(r, H, arrays(value))
    first, failed, third = evaluator.wait(timeout=WAIT)
    assert failed.accuracy is None and failed.loss is None and failed.error == "RuntimeError: out of memory"
    assert "failed: RuntimeError: out of memory" in failed.detail and H[:12] in failed.detail
    assert first.accuracy == 0.25 and third.accuracy == 0.75 and third.error is None
    assert "accuracy 0.7500, loss 0.2500" in third.detail
    evaluator.close()


def test_a_setup_that_raises_is_reported_by_every_evaluation() -> None:
    def setup(cancelled: Any) -> Any:
        raise FileNotFoundError("no eval data")

    evaluator = Evaluator(setup)
    evaluator.submit(1, H, arrays(0.5))
    evaluator.submit(2, H, arrays(0.5))
    results = evaluator.wait(timeout=WAIT)
    assert [e.accuracy for e in results] == [None, None]
    assert all(e.error is not None and "FileNotFoundError: no eval data" in e.error for e in results)
    evaluator.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread ends on purpose
def test_a_worker_thread_that_ends_gives_error_results_instead_of_a_wait_that_never_ends() -> None:
    def setup(cancelled: Any) -> Any:
        raise SystemExit("a BaseException ends the worker thread")

    evaluator = Evaluator(setup)
    evaluator.submit(1, H, arrays(0.5))
    evaluator.submit(2, H, arrays(0.5))
    results = evaluator.wait(timeout=WAIT)
    assert [(e.round, e.accuracy, e.error) for e in results] == [
        (1, None, "the evaluation worker thread ended"),
        (2, None, "the evaluation worker thread ended"),
    ]
    assert evaluator.pending == ()


def test_non_finite_metrics_become_none() -> None:
    evaluator = Evaluator(lambda cancelled: lambda a: (0.1, float("inf")))
    evaluator.submit(1, H, arrays(0.5))
    (result,) = evaluator.wait(timeout=WAIT)
    assert result.accuracy == pytest.approx(0.1) and result.loss is None and result.error is None
    evaluator.close()


def test_submit_copies_the_arrays_and_refuses_rounds_out_of_order() -> None:
    gate = threading.Event()

    def gated(a: Any) -> tuple[float, float]:
        assert gate.wait(WAIT)
        return mean_of(a)

    evaluator = Evaluator(lambda cancelled: gated)
    model = arrays(0.25)
    evaluator.submit(3, H, model)
    model["w"][:] = 1.0  # the caller's next aggregate, in place
    with pytest.raises(ValueError, match="round 3 submitted after round 3"):
        evaluator.submit(3, H, model)
    with pytest.raises(ValueError, match="rounds must increase"):
        evaluator.submit(2, H, model)
    gate.set()
    (result,) = evaluator.wait(timeout=WAIT)
    assert result.accuracy == 0.25
    evaluator.close()
    with pytest.raises(RuntimeError, match="closed"):
        evaluator.submit(4, H, model)


def test_the_evaluation_detail_states_accuracy_loss_and_model() -> None:
    e = Evaluation(round=2, model_hash=H, accuracy=0.5, loss=None, seconds=1.25)
    assert e.detail == f"accuracy 0.5000, loss - of model {H[:12]}; evaluation 1.25s"


def test_the_model_evaluation_runs_the_real_model_on_its_own_torch_threads(tmp_path: Path) -> None:
    import torch

    from fedmqtt.data import load_dataset, write_idx_dataset
    from fedmqtt.models import build_model, get_arrays
    from fedmqtt.training import evaluate

    directory = write_idx_dataset(tmp_path, num_train=10, num_test=50, seed=1)
    dataset = load_dataset("mnist", directory, train=False)
    model = build_model("mlp", seed=7)
    expected = evaluate(model, dataset)
    main_threads = torch.get_num_threads()
    seen: list[int] = []

    def setup(cancelled: Any) -> Any:
        run = model_evaluation("mlp", dataset)(cancelled)
        seen.append(torch.get_num_threads())
        return run

    evaluator = Evaluator(setup)
    evaluator.submit(1, H, get_arrays(model))
    (result,) = evaluator.wait(timeout=120)
    assert result.error is None
    assert (result.accuracy, result.loss) == pytest.approx(expected)
    assert seen == [EVAL_THREADS] and torch.get_num_threads() == main_threads
    evaluator.close()


# ------------------------------------------------------------------------------ after a restart


def entry(n: int, accuracy: float | None) -> dict[str, Any]:
    return {"round": n, "accuracy": accuracy}


def test_after_a_restart_only_the_latest_model_can_still_be_evaluated() -> None:
    assert unevaluated([]) == (None, [])
    assert unevaluated([entry(1, 0.5), entry(2, None)]) == (2, [])
    assert unevaluated([entry(1, None), entry(2, 0.5)]) == (None, [1])
    assert unevaluated([entry(1, None), entry(2, None), entry(3, None)]) == (3, [1, 2])


def test_eval_every_evaluates_every_nth_round_and_the_last() -> None:
    assert [r for r in range(1, 8) if evaluation_due(r, 1, 7)] == [1, 2, 3, 4, 5, 6, 7]
    assert [r for r in range(1, 8) if evaluation_due(r, 3, 7)] == [3, 6, 7]
    assert [r for r in range(1, 8) if evaluation_due(r, 10, 7)] == [7]
    # After a restart, rounds --eval-every skipped are neither lost nor evaluated again.
    due = lambda r: evaluation_due(r, 2, 6)  # noqa: E731
    assert unevaluated([entry(1, None), entry(2, 0.5), entry(3, None)], due) == (None, [])
    assert unevaluated([entry(1, None), entry(2, None), entry(3, None)], due) == (None, [2])
    assert unevaluated([entry(1, None), entry(2, 0.5), entry(3, None), entry(4, None)], due) == (4, [])


@given(st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), max_size=30))
def test_every_round_without_accuracy_is_either_evaluated_again_or_reported_lost(
    accuracies: list[float | None],
) -> None:
    history = [entry(n, a) for n, a in enumerate(accuracies, start=1)]
    current, lost = unevaluated(history)
    missing = [e["round"] for e in history if e["accuracy"] is None]
    assert sorted(lost + ([current] if current is not None else [])) == missing
    assert current is None or current == len(history)


def test_close_waits_for_the_worker_thread_to_end() -> None:
    """A worker thread that ran torch and is still alive at interpreter exit can abort the process (exit 134,
    "terminate called without an active exception"): close() ends it before the coordinator returns."""
    gate = threading.Event()

    def held(a: Any) -> tuple[float, float]:
        assert gate.wait(WAIT)
        return mean_of(a)

    evaluator = Evaluator(lambda cancelled: held)
    evaluator.submit(1, H, arrays(0.25))
    threading.Timer(0.2, gate.set).start()  # the running evaluation ends a moment after close() is called
    evaluator.close()
    names = [t.name for t in threading.enumerate()]
    assert "fedmqtt-evaluation" not in names, names


def test_close_cancels_the_running_evaluation_and_skips_the_queued_ones() -> None:
    """A stop drops the results not collected, so it does not wait for them: the running evaluation is told to
    stop (``cancelled()`` turns True) and the queued ones never start."""
    started = threading.Event()
    rounds_run: list[float] = []

    def setup(cancelled: Any) -> Any:
        def evaluate(a: Any) -> tuple[float, float]:
            rounds_run.append(float(np.mean(a["w"])))
            started.set()
            deadline = time.monotonic() + WAIT
            while not cancelled():  # a long evaluation that asks between its batches
                assert time.monotonic() < deadline, "close() never cancelled the running evaluation"
                time.sleep(0.01)
            raise RuntimeError("cancelled")

        return evaluate

    evaluator = Evaluator(setup)
    evaluator.submit(1, H, arrays(0.25))
    evaluator.submit(2, H, arrays(0.5))
    assert started.wait(WAIT)
    evaluator.close()
    names = [t.name for t in threading.enumerate()]
    assert "fedmqtt-evaluation" not in names, names
    assert rounds_run == [0.25]


def test_the_real_evaluation_stops_between_batches_once_cancelled(tmp_path: Path) -> None:
    from fedmqtt.data import load_dataset, write_idx_dataset
    from fedmqtt.models import build_model
    from fedmqtt.training import EvaluationCancelled, evaluate

    dataset = load_dataset("mnist", write_idx_dataset(tmp_path, num_train=10, num_test=50, seed=1), train=False)
    model = build_model("mlp", seed=7)
    asked: list[int] = []

    def cancelled_at_the_third_batch() -> bool:
        asked.append(1)
        return len(asked) == 3

    with pytest.raises(EvaluationCancelled, match="after 20 of 50 samples"):
        evaluate(model, dataset, batch_size=10, cancelled=cancelled_at_the_third_batch)
    assert model.training  # the model's mode is restored
    assert evaluate(model, dataset, batch_size=10, cancelled=lambda: False) == evaluate(model, dataset, batch_size=10)
