"""Magnitude pruning: which tensors may be pruned, the global magnitude mask, applying it, and a schedule.

The rules, stated once here:

- **What is prunable**: the weight of every ``Conv2d`` and ``Linear`` layer (biases and normalisation layers are
  kept). :func:`prunable_modules` gives the layers of a torch model (``fedmqtt export`` prunes those with
  ``torch.nn.utils.prune``), :func:`prunable_names` their tensor names for a model name (the coordinator's scope).
- **Which weights go**: global, unstructured, by magnitude. For a target sparsity ``s`` over ``n`` weights,
  ``round(s * n)`` weights are zeroed (``torch.nn.utils.prune``'s count), the smallest ``|w|`` over all scoped
  tensors at once; equal magnitudes are taken in tensor order, then position order, so the mask is deterministic.
  A mask only grows: weights pruned before stay pruned, the new ones are the smallest of the rest
  (:func:`magnitude_mask` with ``keep``).
- **A schedule** (``--prune-schedule``): ``SPARSITY@ROUND`` prunes once, after round ROUND is aggregated;
  ``SPARSITY@FIRST:LAST`` prunes after every round from FIRST to LAST, rising cubically to SPARSITY (gradual
  magnitude pruning, Zhu & Gupta 2017: ``s_k = S (1 - (1 - k/n)^3)`` at step ``k`` of ``n = LAST - FIRST + 1``).
  Rounds after the last step fine-tune with the mask held.

Everything but :func:`prunable_modules` / :func:`prunable_names` is numpy on tensors by name: no torch, no I/O.
A mask is ``{name: bool array}``, True where the weight is held at zero.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Mask",
    "PruneSchedule",
    "PruneState",
    "apply_mask",
    "count_to_prune",
    "magnitude_mask",
    "mask_of_zeros",
    "masked_count",
    "prunable_modules",
    "prunable_names",
]

Mask = dict[str, np.ndarray]
SCHEDULE_SYNTAX = "SPARSITY@ROUND (one shot) or SPARSITY@FIRST:LAST (cubic ramp), e.g. 0.5@3 or 0.8@2:10"


# --------------------------------------------------------------------------------------------- what is prunable


def prunable_modules(model: Any) -> list[tuple[str, Any]]:
    """``(qualified name, layer)`` of every Conv2d and Linear layer of a torch model, in module order."""
    from torch import nn

    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@functools.lru_cache(maxsize=32)
def prunable_names(model_name: str, num_classes: int = 10) -> tuple[str, ...]:
    """The prunable tensors of a model by name (``conv1.weight``, ``fc1.weight`` ...), in the model's order."""
    import torch

    from fedmqtt.models import model_info

    with torch.device("meta"):  # shapes only, nothing allocated
        model = model_info(model_name).build(num_classes)
    return tuple(f"{name}.weight" if name else "weight" for name, _ in prunable_modules(model))


# --------------------------------------------------------------------------------------------- masks


def count_to_prune(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a target ``sparsity`` zeroes (torch.nn.utils.prune's rounding)."""
    if not 0.0 <= sparsity <= 1.0 or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return min(total, round(sparsity * total))


def masked_count(mask: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.count_nonzero(m)) for m in mask.values())


def magnitude_mask(
    arrays: Mapping[str, np.ndarray],
    names: Sequence[str],
    sparsity: float,
    *,
    keep: Mapping[str, np.ndarray] | None = None,
) -> Mask:
    """The global magnitude mask over ``names`` at ``sparsity``: ``keep`` (an earlier mask) plus the smallest
    ``|w|`` of the other weights, until ``round(sparsity * n)`` are masked. Never smaller than ``keep``."""
    shapes = [np.shape(arrays[name]) for name in names]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    total = sum(sizes)
    held = (
        np.concatenate([np.asarray(keep[n], dtype=bool).ravel() for n in names])
        if keep is not None and names
        else np.zeros(total, dtype=bool)
    )
    need = count_to_prune(total, sparsity) - int(held.sum())
    if need > 0:
        magnitude = np.abs(np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in names]))
        free = np.flatnonzero(~held)
        values = magnitude[free]
        threshold = np.partition(values, need - 1)[need - 1]
        below = free[values < threshold]
        at = free[values == threshold][: need - below.size]  # ties: the first positions, in tensor order
        held = held.copy()
        held[below] = True
        held[at] = True
    out: Mask = {}
    start = 0
    for name, shape, size in zip(names, shapes, sizes, strict=True):
        out[name] = held[start : start + size].reshape(shape)
        start += size
    return out


def mask_of_zeros(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> Mask:
    """The mask a pruned model defines: its exactly-zero weights among ``names``."""
    return {name: np.asarray(arrays[name]) == 0 for name in names}


def apply_mask(arrays: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with every masked weight set to zero (masked tensors are copies; the others the same arrays)."""
    out = dict(arrays)
    for name, held in mask.items():
        if name in out and held.any():
            value = np.array(out[name], copy=True)
            value[held] = 0
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class PruneSchedule:
    """``SPARSITY@FIRST[:LAST]``: the target sparsity and the rounds after which the model is pruned."""

    target: float
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> PruneSchedule:
        """Raises ValueError saying what is wrong and what to write instead."""
        spec = str(text).strip()
        amount, at, rounds = spec.partition("@")
        if not at:
            raise ValueError(f"{text!r} names no round: write {SCHEDULE_SYNTAX}")
        try:
            target = float(amount)
        except ValueError:
            raise ValueError(
                f"{amount.strip()!r} is not a sparsity (a number in (0, 1)): write {SCHEDULE_SYNTAX}"
            ) from None
        if not 0.0 < target < 1.0:
            raise ValueError(f"sparsity {amount.strip()} must be above 0 and below 1 (the fraction of weights zeroed)")
        first_text, colon, last_text = rounds.partition(":")
        try:
            first = int(first_text)
            last = int(last_text) if colon else first
        except ValueError:
            raise ValueError(
                f"{rounds.strip()!r} is not a round or a FIRST:LAST range of rounds: write {SCHEDULE_SYNTAX}"
            ) from None
        if first < 1:
            raise ValueError(f"the first pruning round must be at least 1, got {first}")
        if last < first:
            raise ValueError(
                f"the ramp ends (round {last}) before it starts (round {first}): write FIRST:LAST with FIRST <= LAST"
            )
        return cls(target, first, last)  # fmt: skip

    @property
    def spec(self) -> str:
        return f"{self.target:g}@{self.first}" + (f":{self.last}" if self.last != self.first else "")

    def sparsity_after(self, round_number: int) -> float:
        """The sparsity the model must have once round ``round_number`` is aggregated (0 before the first step)."""
        if round_number < self.first:
            return 0.0
        if round_number >= self.last:
            return self.target
        steps = self.last - self.first + 1
        done = round_number - self.first + 1
        return self.target * (1.0 - (1.0 - done / steps) ** 3)


# --------------------------------------------------------------------------------------------- a job's pruning


class PruneState:
    """The pruning of one federated job: its scope (the prunable tensors it may zero), its schedule (or none)
    and its mask. :meth:`after_round` is what the coordinator calls on every new global model."""

    def __init__(self, scope: Sequence[str], schedule: PruneSchedule | None, mask: Mask | None = None) -> None:
        if not scope:
            raise ValueError("nothing to prune: the scope holds no conv/linear weight")
        self.scope = tuple(scope)
        self.schedule = schedule
        self.mask: Mask = dict(mask) if mask is not None else {}
        self.total = 0  # weights in scope, known once a model is seen

    def after_round(self, arrays: Mapping[str, np.ndarray], round_number: int) -> dict[str, np.ndarray]:
        """The global model of round ``round_number`` pruned: the mask grown to the schedule's sparsity (never
        shrunk), then every masked weight set to zero."""
        target = self.schedule.sparsity_after(round_number) if self.schedule is not None else 0.0
        self.mask = magnitude_mask(arrays, self.scope, target, keep=self.mask or None)
        self.total = sum(int(np.size(arrays[n])) for n in self.scope)
        return apply_mask(arrays, self.mask)

    def held(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``arrays`` with the current mask applied (no growth)."""
        self.total = sum(int(np.size(arrays[n])) for n in self.scope)
        return apply_mask(arrays, self.mask)

    @property
    def pruned(self) -> int:
        return masked_count(self.mask)

    @property
    def sparsity(self) -> float:
        """The fraction of the scope's weights held at zero."""
        return self.pruned / self.total if self.total else 0.0

    def state_dict(self) -> dict[str, Any]:
        """The mask, bit-packed (exact: the mask itself, not re-derived from the model's zeros)."""
        return {
            "scope": list(self.scope),
            "schedule": None if self.schedule is None else self.schedule.spec,
            "mask": {n: np.packbits(m.ravel()) for n, m in self.mask.items()},
            "shapes": {n: list(m.shape) for n, m in self.mask.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mask: Mask = {}
        for name, bits in state["mask"].items():
            shape = tuple(int(d) for d in state["shapes"][name])
            size = int(np.prod(shape, dtype=np.int64))
            mask[name] = np.unpackbits(np.asarray(bits, dtype=np.uint8), count=size).astype(bool).reshape(shape)
        self.mask = mask
