"""How long this device will train for a plan, estimated from the rounds it trained. Pure: no torch, no clock.

A round's training time grows with the samples it visits (its data set's size × the plan's local epochs), so
the estimator keeps the measured *seconds per sample per epoch* of the last few rounds and multiplies. Rates
are kept per kind of training (model, trained parameters, batch size): head-only fine-tuning or another model
runs at another speed, and the first round of a kind has no estimate, so it is always tried. The median of the
last :data:`WINDOW` rates is used: one slow round (a cold start, another process busy) does not make the device
decline the next ones, and a board that got slower for good catches up within a few rounds.

:func:`time_problem` is the rule the device screening applies (``device/screening.py``): decline a round whose
estimate exceeds ``--max-train-seconds``, or the time left before the plan's deadline (the update would arrive
too late to count). The estimate covers training only; fetching the model and sending the update come on top.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from fedmqtt.schema import Plan

WINDOW = 5  # rounds per kind of training the estimate looks back on
MAX_KINDS = 16  # kinds remembered; the oldest is forgotten first

Kind = tuple[str, tuple[str, ...] | None, int]  # (model name, trainable parameter names or None, batch size)


def training_kind(plan: Plan) -> Kind:
    return (plan.model_name, plan.trainable, plan.batch_size)


class TrainTimeEstimator:
    """Seconds per sample per epoch of the last rounds, by kind of training (see the module docstring)."""

    def __init__(self, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self._rates: dict[Kind, deque[float]] = {}

    def record(self, plan: Plan, *, samples: int, seconds: float) -> None:
        """Record that training ``samples`` samples for ``plan.local_epochs`` epochs took ``seconds``. A
        measurement that cannot be a rate (no samples, a negative or non-finite time) is ignored."""
        visited = samples * plan.local_epochs
        if visited <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        kind = training_kind(plan)
        rates = self._rates.pop(kind, None) or deque(maxlen=self.window)
        rates.append(seconds / visited)
        self._rates[kind] = rates  # most recently used last
        while len(self._rates) > MAX_KINDS:
            del self._rates[next(iter(self._rates))]

    def rate(self, plan: Plan) -> float | None:
        """Seconds per sample per epoch for this plan's kind of training, or None before its first round."""
        rates = self._rates.get(training_kind(plan))
        return statistics.median(rates) if rates else None

    def estimate(self, plan: Plan, samples: int) -> float | None:
        """Seconds of training for ``samples`` samples and the plan's epochs, or None (no round of this kind
        yet: try it)."""
        rate = self.rate(plan)
        return None if rate is None else rate * samples * plan.local_epochs


def time_problem(estimate: float | None, *, max_seconds: float | None, now: float, deadline: float) -> str | None:
    """Why a round whose training is estimated at ``estimate`` seconds should be declined, or None to take it.
    No estimate (the first round of its kind) is always taken."""
    if estimate is None:
        return None
    if max_seconds is not None and estimate > max_seconds:
        return (
            f"training would take about {estimate:.1f} s (measured on its last rounds), more than "
            f"--max-train-seconds {max_seconds:g}"
        )
    left = deadline - now
    if estimate > left:
        return f"training would take about {estimate:.1f} s (measured on its last rounds) but the deadline is {max(left, 0):.1f} s away"
    return None
