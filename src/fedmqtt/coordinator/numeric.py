"""Numeric screening: the checks every number from the network passes before it touches the aggregate (pure).

A well-formed frame can still carry numbers that end a job: values that are finite in float32 but overflow once
weighted and summed, or a norm so large that the aggregate (and then the evaluation) turns to NaN. The header's
sample count is bounded by the round machine (``RoundConfig.max_samples``); this module checks the decoded values
and the aggregate. Norms and sums are computed in float64, where no float32 value can overflow them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedmqtt.schema import RefusalReason

__all__ = ["check_aggregate", "finite_or_none", "screen_values", "update_norm"]


def update_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors together, accumulated in float64 (inf if a value is not finite)."""
    total = 0.0
    for v in arrays.values():
        if v.size:
            x = np.asarray(v, dtype=np.float64).ravel()
            total += float(np.dot(x, x))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def screen_values(arrays: Mapping[str, np.ndarray], *, max_norm: float | None) -> tuple[RefusalReason, str] | None:
    """Refuse non-finite values, and (with ``max_norm``) an update whose L2 norm exceeds it; else None."""
    for name, v in arrays.items():
        if v.size and not np.isfinite(v).all():
            return RefusalReason.NON_FINITE, f"tensor {name!r} holds NaN or infinity"
    if max_norm is not None:
        norm = update_norm(arrays)
        if not norm <= max_norm:
            return RefusalReason.NORM_TOO_LARGE, f"update norm {norm:.4g} exceeds --max-update-norm {max_norm:g}"
    return None


def check_aggregate(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Why an aggregate may not be published (a non-finite tensor), or None when it may."""
    bad = [name for name, v in arrays.items() if v.size and not np.isfinite(v).all()]
    if bad:
        listed = ", ".join(repr(b) for b in bad[:5]) + (" ..." if len(bad) > 5 else "")
        return f"the aggregate holds NaN or infinity in {listed}"
    return None


def finite_or_none(value: float | None) -> float | None:
    """A metric for a message: None when it is missing or not finite (an exploded model's loss is inf)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)
