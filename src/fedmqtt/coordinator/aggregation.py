"""Aggregation strategies: from the round's device updates to the next global model. Pure numpy (+ torch
for the server optimizers), no I/O.

Updates are *deltas* (trained − global), as :mod:`fedmqtt.arrays` ``ModelArrays``. One round::

    strategy.begin_round(global_arrays)
    strategy.add(delta, weight)            # per accepted update (weight = num_samples, or 1.0 under DP)
    strategy.add_partial(sum, weight, n)   # or partial sums from scale-out aggregators (FedAvg family)
    new_global = strategy.aggregate()      # or aggregate(denominator=m, noise=z) for central DP

The FedAvg family streams: it keeps one running sum, so memory is O(model) however many devices report.
The robust strategies (median, trimmed mean, Krum) must see every update at once and buffer them:
O(devices × model). Following Flower's ``aggregate.py``, every strategy is plain arithmetic over
``(arrays, weight)`` pairs; the server optimizers of Reddi et al. 2021 ("Adaptive Federated
Optimization", ICLR) run as ``torch.optim`` optimizers on the averaged pseudo-gradient −Δ.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from fedmqtt.arrays import ModelArrays, flatten, manifest_of, unflatten
from fedmqtt.coordinator.errors import AggregationError, StateDictError
from fedmqtt.errors import ConfigError

# ---------------------------------------------------------------------------------------------------
# Parameter validation
# ---------------------------------------------------------------------------------------------------


def _number(field: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> float:  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(field, f"must be a finite number, got {value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(field, f"must be in {lo}{low:g}, {high:g}{hi}, got {v:g}")
    return v


def _integer(field: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(field, f"must be >= {low}, got {value}")
    return value


def _flag(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, f"must be true or false, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------


class Strategy(ABC):
    """Turns one round's updates into the next global model.

    ``buffers_updates`` says whether the strategy keeps every update in memory (O(devices × model)) or
    streams them into a running sum (O(model)). Subclasses document their memory use exactly.
    """

    name: ClassVar[str]
    buffers_updates: ClassVar[bool]

    def __init__(self) -> None:
        self._global: ModelArrays | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._count = 0
        self._open = False

    # -- the round -------------------------------------------------------------------------------

    def begin_round(self, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Start aggregating against ``global_arrays`` (copied; float32). Discards an unfinished round."""
        if not global_arrays:
            raise AggregationError("the global model has no tensors")
        self._global = {k: np.array(v, dtype=np.float32, copy=True) for k, v in global_arrays.items()}
        self._shapes = {k: v.shape for k, v in self._global.items()}
        self._count = 0
        self._open = True
        self._begin(self._global)

    @property
    def min_updates(self) -> int:
        """The fewest updates this strategy, as configured, aggregates meaningfully. The job configuration
        checks ``--min-updates`` and ``--min-updates-at-deadline`` against it before round 1."""
        return 1

    def requirement(self) -> str:
        """Why :attr:`min_updates` is what it is, for error messages."""
        return f"{self.name} aggregates any number of updates"

    @property
    def count(self) -> int:
        """Device updates folded in this round (a partial aggregate counts for its ``count``)."""
        return self._count

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold in one device's delta with its weight (``num_samples`` for FedAvg; 1.0 for uniform DP)."""
        self._require_open("add")
        self._check_arrays("update", update)
        w = self._check_weight("weight", weight)
        self._add(update, w)
        self._count += 1

    def add_partial(self, weighted_sum: Mapping[str, np.ndarray], total_weight: float, count: int) -> None:
        """Fold in a partial aggregate Σwᵢuᵢ of ``count`` updates with Σwᵢ = ``total_weight``."""
        raise AggregationError(
            f"{self.name} cannot combine partial aggregates: it must see every update, so scale-out "
            "aggregators work with the FedAvg family only (fedavg, fedavgm, fedadam, fedyogi)"
        )

    def aggregate(
        self, *, denominator: float | None = None, noise: Mapping[str, np.ndarray] | None = None
    ) -> ModelArrays:
        """Close the round and return the NEW global arrays. Call ``begin_round`` before the next one."""
        self._require_open("aggregate")
        if self._count == 0:
            raise AggregationError("no updates were added this round; there is nothing to aggregate")
        if denominator is not None:
            self._check_weight("denominator", denominator)
            if denominator == 0:
                raise AggregationError("denominator must be > 0, got 0")
        if noise is not None:
            self._check_arrays("noise", noise)
        result = self._aggregate(denominator, noise)
        self._open = False
        return result

    # -- server-optimizer state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state that outlives a round, as a flat ``name -> ndarray`` dict (``np.savez``-ready)."""
        return {"strategy": np.array(self.name)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._check_strategy_name(state)

    # -- for subclasses ----------------------------------------------------------------------------

    @abstractmethod
    def _begin(self, global_arrays: ModelArrays) -> None: ...

    @abstractmethod
    def _add(self, update: Mapping[str, np.ndarray], weight: float) -> None: ...

    @abstractmethod
    def _aggregate(self, denominator: float | None, noise: Mapping[str, np.ndarray] | None) -> ModelArrays: ...

    def _require_open(self, what: str) -> None:
        if not self._open:
            raise AggregationError(f"{what}() before begin_round(): start each round with the global model")

    def _check_arrays(self, what: str, arrays: Mapping[str, np.ndarray]) -> None:
        if list(arrays) != list(self._shapes):
            raise AggregationError(
                f"the {what}'s tensors {list(arrays)[:5]}... do not match the global model's "
                f"{list(self._shapes)[:5]}..."
            )
        for k, v in arrays.items():
            if tuple(v.shape) != self._shapes[k]:
                raise AggregationError(
                    f"{what} tensor {k!r} has shape {tuple(v.shape)}, the global model has {self._shapes[k]}"
                )
            if not np.isfinite(v).all():
                raise AggregationError(f"{what} tensor {k!r} holds NaN or infinity; refuse such updates first")

    def _check_weight(self, what: str, weight: float) -> float:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise AggregationError(f"{what} must be a finite number, got {weight!r}")
        if weight < 0:
            raise AggregationError(f"{what} must be >= 0, got {weight}")
        return float(weight)

    def _check_strategy_name(self, state: Mapping[str, np.ndarray]) -> None:
        saved = state.get("strategy")
        if saved is None:
            raise StateDictError("strategy", "the state has no 'strategy' entry")
        if str(np.asarray(saved)) != self.name:
            raise StateDictError("strategy", f"the state is of strategy {str(saved)!r}, not {self.name!r}")


# ---------------------------------------------------------------------------------------------------
# The FedAvg family: a streaming weighted mean, then a server step
# ---------------------------------------------------------------------------------------------------


_ADD_BLOCK = 1 << 15  # float64 values of w·u worked on at once (256 KiB: stays in a core's L2 cache)


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): new = global + server_lr · (Σwᵢuᵢ + noise) / (denominator or Σwᵢ).

    Memory: the global model (float32, 1×) plus a float64 running sum (2×) plus a 256 KiB float64 scratch
    buffer: 3 × the float32 model size, independent of the number of devices.
    """

    name = "fedavg"
    buffers_updates = False

    def __init__(self, *, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = _number(f"{self.name}.server_lr", server_lr, low=0.0, low_open=True)
        self._sum: dict[str, np.ndarray] = {}
        self._scratch = np.empty(0, dtype=np.float64)
        self._weight = 0.0

    @property
    def total_weight(self) -> float:
        return self._weight

    def _begin(self, global_arrays: ModelArrays) -> None:
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_arrays.items()}
        self._scratch = np.empty(min(_ADD_BLOCK, max(v.size for v in global_arrays.values())), dtype=np.float64)
        self._weight = 0.0

    def _add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        for k, s in self._sum.items():
            flat_sum, flat_update = s.reshape(-1), update[k].reshape(-1)
            # w·u in float64 without allocating, a cache-sized block at a time: the product goes into the reused
            # scratch buffer and is added while it is still in cache (1.35× faster than whole tensors at once on
            # the CNN; the same values, element by element).
            for start in range(0, flat_sum.size, _ADD_BLOCK):
                stop = min(start + _ADD_BLOCK, flat_sum.size)
                product = self._scratch[: stop - start]
                # dtype: NumPy 2 would pick the float32 loop for a float32 update and overflow before the cast.
                np.multiply(flat_update[start:stop], weight, out=product, dtype=np.float64)
                flat_sum[start:stop] += product
        self._weight += weight

    def add_partial(self, weighted_sum: Mapping[str, np.ndarray], total_weight: float, count: int) -> None:
        self._require_open("add_partial")
        self._check_arrays("partial aggregate", weighted_sum)
        w = self._check_weight("total_weight", total_weight)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise AggregationError(f"a partial aggregate must count >= 1 updates, got {count!r}")
        for k, s in self._sum.items():
            s += weighted_sum[k]
        self._weight += w
        self._count += count

    def _aggregate(self, denominator: float | None, noise: Mapping[str, np.ndarray] | None) -> ModelArrays:
        denom = self._weight if denominator is None else float(denominator)
        if denom <= 0:
            raise AggregationError(
                "the total weight is 0 (every update reported num_samples=0): weight updates by a positive "
                "number or pass a denominator"
            )
        # In place: aggregate() ends the round, so the running sum may be consumed.
        average: ModelArrays = {}
        for k in list(self._sum):
            s = self._sum.pop(k)
            if noise is not None:
                s += noise[k]
            s /= denom
            average[k] = s.astype(np.float32)
            del s
        return self._server_step(average)

    def _server_step(self, average_delta: ModelArrays) -> ModelArrays:
        assert self._global is not None
        if self.server_lr == 1.0:
            return {k: g + average_delta[k] for k, g in self._global.items()}
        lr = np.float32(self.server_lr)
        return {k: g + lr * average_delta[k] for k, g in self._global.items()}


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al. 2018, "Adaptive Methods for Nonconvex Optimization"; the server optimizer of
    FedYogi in Reddi et al. 2021, Algorithm 2).

    Adam's update with an additive second moment that cannot grow or shrink faster than (1−β₂)g²::

        m ← β₁m + (1−β₁)g
        v ← v − (1−β₂)·sign(v − g²)·g²
        p ← p − lr · m̂ / (√v̂ + eps),   m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ)

    The bias correction and the ``eps`` placement follow ``torch.optim.Adam`` (as does the Yogi of the
    torch-optimizer package), so that FedAdam and FedYogi here differ only in the rule for v. ``v``
    starts at ``initial_accumulator`` (1e-6, as in Zaheer et al.).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        initial_accumulator: float = 1e-6,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "initial_accumulator": initial_accumulator}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, group["initial_accumulator"])
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                grad_sq = grad * grad
                v.addcmul_(torch.sign(v - grad_sq), grad_sq, value=-(1 - beta2))
                bias1 = 1 - beta1**t
                bias2 = 1 - beta2**t
                denom = (v.sqrt() / math.sqrt(bias2)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / bias1)
        return loss


class _ServerOptimizer(FedAvg):
    """FedAvg's average, then one step of a ``torch.optim`` optimizer with gradient −Δ̄ on the global model.

    Memory: FedAvg's (3 × model) plus the torch parameters (1 × model) and the optimizer's slots
    (momentum: 1 × model; Adam/Yogi: 2 × model), all float32 except the running sum.
    """

    def __init__(self, *, server_lr: float) -> None:
        super().__init__(server_lr=server_lr)
        self._params: list[torch.nn.Parameter] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, np.ndarray] | None = None
        self._param_names: list[str] = []

    @abstractmethod
    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer: ...

    def _begin(self, global_arrays: ModelArrays) -> None:
        super()._begin(global_arrays)
        if self._optimizer is None:
            self._params = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in global_arrays.values()]
            self._optimizer = self._make_optimizer(self._params)
            self._param_names = list(global_arrays)
        elif list(global_arrays) != self._param_names or any(
            tuple(p.shape) != v.shape for p, v in zip(self._params, global_arrays.values(), strict=True)
        ):
            raise AggregationError(
                f"{self.name}'s server optimizer was built for another model (tensors {self._param_names[:5]}"
                "...); build a new strategy for a new model"
            )
        else:
            with torch.no_grad():
                for p, v in zip(self._params, global_arrays.values(), strict=True):
                    p.copy_(torch.from_numpy(v))
        if self._pending_state is not None:
            pending, self._pending_state = self._pending_state, None
            self._load_optimizer_state(pending)

    def _server_step(self, average_delta: ModelArrays) -> ModelArrays:
        assert self._optimizer is not None
        for p, delta in zip(self._params, average_delta.values(), strict=True):
            # The pseudo-gradient: the direction the devices moved, negated.
            p.grad = torch.from_numpy(-delta)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return {name: p.detach().numpy().copy() for name, p in zip(self._param_names, self._params, strict=True)}

    def state_dict(self) -> dict[str, np.ndarray]:
        """``strategy`` plus ``SLOT:TENSOR`` arrays (e.g. ``exp_avg:fc.weight``, ``step:fc.weight``)."""
        if self._optimizer is None:
            return dict(self._pending_state) if self._pending_state is not None else super().state_dict()
        out = super().state_dict()
        for name, p in zip(self._param_names, self._params, strict=True):
            for slot, value in self._optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"{slot}:{name}"] = value.detach().numpy().copy()
                elif isinstance(value, int | float):
                    out[f"{slot}:{name}"] = np.array(value)
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._check_strategy_name(state)
        saved = {k: np.asarray(v) for k, v in state.items()}
        if self._optimizer is None:
            self._pending_state = saved  # applied when begin_round shows the model's shapes
        else:
            self._load_optimizer_state(saved)

    def _load_optimizer_state(self, saved: dict[str, np.ndarray]) -> None:
        assert self._optimizer is not None
        per_param: dict[str, dict[str, np.ndarray]] = {}
        for key, value in saved.items():
            if key == "strategy":
                continue
            slot, sep, name = key.partition(":")
            if not sep or name not in self._param_names:
                raise StateDictError("strategy", f"entry {key!r} does not name a tensor of this model")
            per_param.setdefault(name, {})[slot] = value
        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, (name, p) in enumerate(zip(self._param_names, self._params, strict=True)):
            slots = per_param.get(name)
            if not slots:
                continue
            for slot, value in slots.items():
                if slot != "step" and value.shape != tuple(p.shape):
                    raise StateDictError(
                        "strategy", f"{slot}:{name} has shape {value.shape}, the model has {tuple(p.shape)}"
                    )
            state[i] = {slot: torch.from_numpy(np.array(value, copy=True)) for slot, value in slots.items()}
        # Hyperparameters come from this strategy's configuration, not from the checkpoint.
        groups = self._optimizer.state_dict()["param_groups"]
        try:
            self._optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise StateDictError("strategy", str(exc)) from None


class FedAvgM(_ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): server SGD with momentum on −Δ̄ (``torch.optim.SGD``)::

        b ← momentum·b + (−Δ̄);   global ← global − server_lr·b

    Defaults: server_lr=1.0, momentum=0.9 (the effective step in steady state is server_lr/(1−momentum);
    lower server_lr if training oscillates). momentum=0 is FedAvg.
    Memory: FedAvg's plus 2 × model (torch parameters and the momentum buffer).
    """

    name = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False) -> None:
        super().__init__(server_lr=server_lr)
        self.momentum = _number(f"{self.name}.momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.nesterov = _flag(f"{self.name}.nesterov", nesterov)
        if self.nesterov and self.momentum == 0:
            raise ConfigError(f"{self.name}.nesterov", "Nesterov momentum needs momentum > 0")

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.server_lr, momentum=self.momentum, nesterov=self.nesterov)


class FedAdam(_ServerOptimizer):
    """FedAdam (Reddi et al. 2021): ``torch.optim.Adam`` on −Δ̄ with lr=server_lr, betas=(beta1, beta2),
    eps=tau. Defaults from the paper: beta1=0.9, beta2=0.99, tau=1e-3; server_lr=0.01 (the paper tunes
    it per task, typically 10^-2.5 … 10^-1). Unlike the paper's Algorithm 2, torch's Adam corrects the
    moments' initial bias (as Flower's FedAdam also does).
    Memory: FedAvg's plus 3 × model (torch parameters, m and v).
    """

    name = "fedadam"

    def __init__(self, *, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr)
        self.beta1 = _number(f"{self.name}.beta1", beta1, low=0.0, high=1.0, high_open=True)
        self.beta2 = _number(f"{self.name}.beta2", beta2, low=0.0, high=1.0, high_open=True)
        self.tau = _number(f"{self.name}.tau", tau, low=0.0, low_open=True)

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.server_lr, betas=(self.beta1, self.beta2), eps=self.tau)


class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021): :class:`Yogi` on −Δ̄. Same defaults as FedAdam, plus
    initial_accumulator=1e-6 (the starting value of v).
    Memory: FedAvg's plus 3 × model (torch parameters, m and v).
    """

    name = "fedyogi"

    def __init__(
        self,
        *,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        initial_accumulator: float = 1e-6,
    ) -> None:
        super().__init__(server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)
        self.initial_accumulator = _number(f"{self.name}.initial_accumulator", initial_accumulator, low=0.0)

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return Yogi(
            params,
            lr=self.server_lr,
            betas=(self.beta1, self.beta2),
            eps=self.tau,
            initial_accumulator=self.initial_accumulator,
        )


# ---------------------------------------------------------------------------------------------------
# Robust strategies: they see every update at once
# ---------------------------------------------------------------------------------------------------


# Coordinate blocks for the robust strategies: at most this many values (n updates × block width) are
# worked on at once, so their scratch memory stays ~16-32 MB whatever the model size.
_BLOCK_VALUES = 1 << 22


def _blocks(flats: list[np.ndarray], dtype: type[np.floating[Any]]) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (coordinate slice, n × width block) over the stacked flat updates, reusing one buffer."""
    n, size = len(flats), flats[0].size
    width = max(1024, _BLOCK_VALUES // n)
    buffer = np.empty((n, min(width, size)), dtype=dtype)
    for start in range(0, size, width):
        stop = min(size, start + width)
        block = buffer[:, : stop - start]
        for i, flat in enumerate(flats):
            block[i] = flat[start:stop]
        yield slice(start, stop), block


class _Buffered(Strategy):
    """Keeps one flat float32 copy of every update: memory (n + 1) × the model size for n updates, plus
    ~16-32 MB of scratch while aggregating (coordinates are processed in blocks).

    Weights are ignored: a Byzantine device controls the ``num_samples`` it reports, so letting it
    weigh more would undo the robustness. Central-DP ``denominator``/``noise`` are refused: those bounds
    hold for a (clipped) sum, not for an order statistic.
    """

    buffers_updates = True

    def __init__(self) -> None:
        super().__init__()
        self._flats: list[np.ndarray] = []

    def _begin(self, global_arrays: ModelArrays) -> None:
        self._flats = []

    def _add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        self._flats.append(flatten(update))  # a copy, in the global model's tensor order

    def _aggregate(self, denominator: float | None, noise: Mapping[str, np.ndarray] | None) -> ModelArrays:
        if denominator is not None or noise is not None:
            raise AggregationError(
                f"{self.name} does not take a denominator or noise: central DP needs a sum-based strategy "
                "(fedavg, fedavgm, fedadam, fedyogi)"
            )
        assert self._global is not None
        combined = unflatten(self._combine(self._flats), manifest_of(self._global))
        self._flats = []
        return {k: g + combined[k] for k, g in self._global.items()}

    @abstractmethod
    def _combine(self, flats: list[np.ndarray]) -> np.ndarray:
        """The robust delta as one flat float32 vector."""


class Median(_Buffered):
    """Coordinate-wise median of the deltas (Yin et al. 2018). No parameters. Tolerates < n/2 bad updates."""

    name = "median"

    def _combine(self, flats: list[np.ndarray]) -> np.ndarray:
        out = np.empty(flats[0].size, dtype=np.float32)
        for where, block in _blocks(flats, np.float32):
            out[where] = np.median(block, axis=0, overwrite_input=True)
        return out


class TrimmedMean(_Buffered):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the ⌊beta·n⌋ largest and the
    ⌊beta·n⌋ smallest values and average the rest. ``beta`` in [0, 0.5), default 0.1 (0 = plain mean).
    """

    name = "trimmed-mean"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = _number(f"{self.name}.beta", beta, low=0.0, high=0.5, high_open=True)

    @property
    def min_updates(self) -> int:
        if self.beta == 0.0:
            return 1
        n = max(1, math.ceil(1.0 / self.beta))
        while math.floor(self.beta * n) < 1:
            n += 1
        return n

    def requirement(self) -> str:
        return (
            f"trimmed-mean with beta={self.beta:g} drops floor(beta * n) updates from each end, none with fewer "
            f"than {self.min_updates} updates (raise beta or the update counts)"
        )

    def _combine(self, flats: list[np.ndarray]) -> np.ndarray:
        n = len(flats)
        cut = math.floor(self.beta * n)
        out = np.empty(flats[0].size, dtype=np.float32)
        for where, block in _blocks(flats, np.float32):
            block.sort(axis=0)
            out[where] = block[cut : n - cut].mean(axis=0, dtype=np.float64)
        return out


class Krum(_Buffered):
    """Krum and multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent").

    Each update's score is the sum of squared L2 distances to its n − f − 2 nearest other updates; the
    ``m`` lowest-scoring updates are averaged (m=1: Krum picks one update). ``f`` = the number of
    Byzantine updates tolerated (default 1); needs n ≥ 2f + 3 updates and m ≤ n − f.
    Time: O(n² × model) for the pairwise distances (a float64 Gram matrix, built block by block).
    """

    name = "krum"

    def __init__(self, *, f: int = 1, m: int = 1) -> None:
        super().__init__()
        self.f = _integer(f"{self.name}.f", f, low=0)
        self.m = _integer(f"{self.name}.m", m, low=1)

    @property
    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.m + self.f)

    def requirement(self) -> str:
        return (
            f"krum with f={self.f}, m={self.m} needs at least {self.min_updates} updates (n >= 2f + 3 and m <= n - f)"
        )

    def scores(self, updates: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Krum scores of ``updates`` (lower = more central)."""
        return self._scores([flatten(u) for u in updates])

    def _scores(self, flats: list[np.ndarray]) -> np.ndarray:
        n = len(flats)
        if n < 2 * self.f + 3:
            raise AggregationError(
                f"Krum with f={self.f} needs at least {2 * self.f + 3} updates, got {n}; "
                "lower f or wait for more updates"
            )
        gram = np.zeros((n, n), dtype=np.float64)
        for _, block in _blocks(flats, np.float64):
            gram += block @ block.T
        norms = np.diag(gram)
        dist = np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
        neighbours = n - self.f - 2
        scores = np.empty(n, dtype=np.float64)
        for i in range(n):
            others = np.delete(dist[i], i)
            scores[i] = np.sort(others)[:neighbours].sum()
        return scores

    def _combine(self, flats: list[np.ndarray]) -> np.ndarray:
        n = len(flats)
        scores = self._scores(flats)
        if self.m > n - self.f:
            raise AggregationError(f"multi-Krum m={self.m} must be <= n - f = {n - self.f}")
        chosen = np.argsort(scores, kind="stable")[: self.m]
        total = np.zeros(flats[0].size, dtype=np.float64)
        for i in chosen:
            total += flats[i]
        return (total / len(chosen)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Construction by name
# ---------------------------------------------------------------------------------------------------

# The one list of strategies: the CLI's choices, the job configuration and the docs read it.
_STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, Median, TrimmedMean, Krum)
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)


def strategy_parameters(name: str) -> dict[str, Any]:
    """The parameters of strategy ``name`` and their defaults."""
    cls = _strategy_class(name)
    sig = inspect.signature(cls.__init__)
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _strategy_class(name: str) -> type[Strategy]:
    cls = _STRATEGIES.get(name)
    if cls is None:
        raise ConfigError("strategy", f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    return cls


def build_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by name; unknown names, unknown parameters and bad values raise :class:`ConfigError`."""
    cls = _strategy_class(name)
    known = strategy_parameters(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        takes = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "no parameters"
        raise ConfigError(f"{name}.{unknown[0]}", f"{name} has no parameter {unknown[0]!r}; it takes {takes}")
    return cls(**params)


def parse_strategy_params(text: str) -> dict[str, float | int | bool]:
    """Parse ``"server_lr=0.1,momentum=0.9"`` (the CLI form) into keyword arguments for build_strategy.

    Integers stay integers, ``true``/``false`` become booleans, anything else must be a number.
    """
    out: dict[str, float | int | bool] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or not key or not raw:
            raise ConfigError("strategy parameters", f"{item!r} is not KEY=VALUE (e.g. server_lr=0.1)")
        if raw.lower() in ("true", "false"):
            out[key] = raw.lower() == "true"
            continue
        try:
            out[key] = int(raw)
        except ValueError:
            try:
                out[key] = float(raw)
            except ValueError:
                raise ConfigError(f"strategy parameter {key}", f"{raw!r} is not a number") from None
    return out
