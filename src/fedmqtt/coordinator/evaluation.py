"""Evaluating global models off the coordinator's critical path (pipelined rounds).

The coordinator publishes the next global model and plan as soon as a round's aggregate exists and submits the
model here; one worker thread, which owns its own copy of the model, evaluates the submitted models one at a time
in the order they came, so results come back in round order. The coordinator's driver thread collects them
(:meth:`Evaluator.poll`, :meth:`Evaluator.wait`) and alone publishes anything. No MQTT here.

An evaluation that raises is reported as an :class:`Evaluation` with ``error`` set and no accuracy: it never ends
the job. The worker runs torch with :data:`EVAL_THREADS` intra-op threads, so it does not compete with the devices
(or the coordinator) for every core; the setting is per thread and leaves the caller's own threads as they were.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedmqtt.arrays import ModelArrays
from fedmqtt.coordinator.numeric import finite_or_none

#: torch intra-op threads of the evaluation worker.
EVAL_THREADS = 1

#: ``arrays -> (accuracy, loss)``: one evaluation, run in the worker thread.
EvaluateFn = Callable[[ModelArrays], tuple[float, float]]


@dataclass(frozen=True)
class Evaluation:
    """The result of evaluating the model that closing ``round`` published (``model_hash``: its frame's sha256)."""

    round: int
    model_hash: str
    accuracy: float | None
    loss: float | None
    seconds: float
    error: str | None = None  # why there is no accuracy: what the evaluation raised

    @property
    def detail(self) -> str:
        """One line for the ``round_evaluated`` event."""
        if self.error is not None:
            return f"evaluation of model {self.model_hash[:12]} failed: {self.error}; accuracy unknown"
        accuracy = "-" if self.accuracy is None else f"{self.accuracy:.4f}"
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        return f"accuracy {accuracy}, loss {loss} of model {self.model_hash[:12]}; evaluation {self.seconds:.2f}s"


@dataclass(frozen=True)
class _Job:
    round: int
    model_hash: str
    arrays: ModelArrays


_STOP = object()


class Evaluator:
    """One worker thread evaluating submitted models in submission order.

    ``setup(cancelled)`` runs once in the worker thread, before the first evaluation, and returns the function that
    evaluates (it builds the worker's own model there); an error in ``setup`` is reported by every evaluation.
    ``cancelled()`` turns True once :meth:`close` is called: an evaluation that asks it between batches ends early.
    ``clock`` times the evaluations (seconds).
    """

    def __init__(
        self, setup: Callable[[Callable[[], bool]], EvaluateFn], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._setup = setup
        self._cancel = threading.Event()
        self._clock = clock
        self._jobs: queue.Queue[_Job | object] = queue.Queue()
        self._results: queue.Queue[Evaluation] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._submitted: list[tuple[int, str]] = []  # (round, model hash) submitted, not yet collected, in order
        self._closed = False

    @property
    def pending(self) -> tuple[int, ...]:
        """Rounds submitted whose results have not been collected yet, in order."""
        return tuple(r for r, _ in self._submitted)

    def submit(self, round: int, model_hash: str, arrays: Mapping[str, Any]) -> None:
        """Queue the model ``round`` produced for evaluation. The arrays are copied: the caller may change its own."""
        if self._closed:
            raise RuntimeError("the evaluator is closed")
        if self._submitted and round <= self._submitted[-1][0]:
            raise ValueError(f"round {round} submitted after round {self._submitted[-1][0]}: rounds must increase")
        job = _Job(round, model_hash, {k: v.copy() for k, v in arrays.items()})
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fedmqtt-evaluation", daemon=True)
            self._thread.start()
        self._submitted.append((round, model_hash))
        self._jobs.put(job)

    def poll(self) -> list[Evaluation]:
        """The results that are ready, in round order (never blocks)."""
        return self._collect(0, None)

    def wait(self, *, through: int | None = None, timeout: float | None = None) -> list[Evaluation]:
        """Block until every submitted round (or every round up to ``through``) is evaluated or ``timeout`` passes;
        return the results collected meanwhile, in round order."""
        wanted = sum(1 for r, _ in self._submitted if through is None or r <= through)
        return self._collect(wanted, timeout)

    def _collect(self, wanted: int, timeout: float | None) -> list[Evaluation]:
        results: list[Evaluation] = []
        until = None if timeout is None else time.monotonic() + timeout
        while self._submitted:
            try:
                result = self._next(until) if len(results) < wanted else self._results.get_nowait()
            except queue.Empty:
                break
            assert result.round == self._submitted[0][0], (result.round, self._submitted)
            self._submitted.pop(0)
            results.append(result)
        return results

    def _next(self, until: float | None) -> Evaluation:
        """The next result, waiting until ``until`` (monotonic; None: until it comes). Should the worker thread
        have ended (it catches every Exception, so only a BaseException ends it), the waiting round gets an
        error result instead of a wait that never ends. Raises queue.Empty when ``until`` passes."""
        while True:
            left = 1.0 if until is None else min(1.0, max(0.0, until - time.monotonic()))
            try:
                return self._results.get(timeout=left)
            except queue.Empty:
                thread = self._thread
                if thread is not None and not thread.is_alive() and self._results.empty():
                    round_number, model_hash = self._submitted[0]
                    return Evaluation(round_number, model_hash, None, None, 0.0, "the evaluation worker thread ended")
                if until is not None and time.monotonic() >= until:
                    raise

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker: results not collected are dropped, so the running evaluation is cancelled (at its next
        batch, see ``setup``) and the queued ones are skipped. Then wait up to ``timeout`` seconds for its thread to
        end: a thread that has run torch and is still alive when the interpreter exits can abort the process
        ("terminate called without an active exception", exit 134 after a finished job), and a stop (SIGTERM) must
        not wait for a whole evaluation whose result it drops."""
        self._closed = True
        self._cancel.set()
        if self._thread is not None:
            self._jobs.put(_STOP)
            self._thread.join(timeout)

    def _work(self) -> None:
        evaluate: EvaluateFn | None = None
        setup_error: str | None = None
        try:
            evaluate = self._setup(self._cancel.is_set)
        except Exception as exc:
            setup_error = f"setting up the evaluation failed: {type(exc).__name__}: {exc}"
        while True:
            job = self._jobs.get()
            if not isinstance(job, _Job) or self._cancel.is_set():
                return
            started = self._clock()
            accuracy: float | None = None
            loss: float | None = None
            error = setup_error
            if evaluate is not None:
                try:
                    raw_accuracy, raw_loss = evaluate(job.arrays)
                    accuracy, loss = finite_or_none(float(raw_accuracy)), finite_or_none(float(raw_loss))
                except Exception as exc:  # reported, never fatal
                    error = f"{type(exc).__name__}: {exc}"
            seconds = max(0.0, self._clock() - started)
            self._results.put(Evaluation(job.round, job.model_hash, accuracy, loss, seconds, error))


def model_evaluation(
    model_name: str, dataset: Any, *, threads: int = EVAL_THREADS
) -> Callable[[Callable[[], bool]], EvaluateFn]:
    """The ``setup`` of an :class:`Evaluator` for a model of the zoo on ``dataset`` (the coordinator's eval set):
    in the worker thread, limit torch to ``threads`` threads, build the worker's own model, and evaluate with
    :func:`fedmqtt.training.evaluate`, which stops between batches once ``cancelled()``."""

    def setup(cancelled: Callable[[], bool]) -> EvaluateFn:
        import torch

        from fedmqtt import training
        from fedmqtt.models import build_model, set_arrays

        torch.set_num_threads(threads)  # this thread's pool only (the driver thread keeps its own)
        # Channels-last convolutions ran the CNN's evaluation in 0.8x the time (set_arrays copies in place: the
        # layout stays); a model without image weights is unchanged.
        model = build_model(model_name, seed=0).to(memory_format=torch.channels_last)

        def evaluate(arrays: ModelArrays) -> tuple[float, float]:
            set_arrays(model, arrays)
            return training.evaluate(model, dataset, cancelled=cancelled)

        return evaluate

    return setup


def evaluation_due(round_number: int, every: int, rounds: int) -> bool:
    """Whether round ``round_number``'s model is evaluated under ``--eval-every every`` in a job of ``rounds``
    rounds: every ``every``-th round, and the last (its accuracy is the job's result)."""
    return round_number % every == 0 or round_number >= rounds


def unevaluated(
    history: Sequence[Mapping[str, Any]], due: Callable[[int], bool] = lambda _: True
) -> tuple[int | None, list[int]]:
    """Which recorded rounds (closed-round summaries as dicts, in order) lack an accuracy that was ``due`` (see
    :func:`evaluation_due`) after a restart: ``(the last round, when it lacks one: its model is the checkpoint's
    current model and can be evaluated now; the earlier rounds that lack one: their models are gone, as a
    checkpoint keeps only the latest)``."""
    missing = [int(e["round"]) for e in history if e.get("accuracy") is None and due(int(e["round"]))]
    if missing and history and missing[-1] == int(history[-1]["round"]):
        return missing[-1], missing[:-1]
    return None, missing
