"""The round-privacy policy of a DP job: every decision a round needs, stated once.

Pure and synchronous (no network, no files; randomness comes in as generators): the coordinator
(``coordinator/service.py``) and the privacy benchmark (``benchmarks/privacy.py``) both run their rounds through
:class:`RoundPrivacy`, so what the benchmark measures is what a job does.

One round of a DP job, in order:

1. :meth:`RoundPrivacy.plan`: the DP section of the round's plan (clip, σ, the noise each device adds, m, q, δ).
2. :func:`check_update_norm`: an accepted update's L2 norm must fit the plan's clip plus the noise and
   quantisation margins.
3. Aggregation: uniform weights (:attr:`RoundPrivacy.update_weight`), the fixed denominator m
   (:attr:`RoundPrivacy.denominator`), and :meth:`RoundPrivacy.server_noise` on the sum (σC in central mode, the
   top-up σC·√(1 − k/m) in device mode when only k < m updates arrived).
4. :meth:`RoundPrivacy.record_round`: account the round at its effective noise multiplier and move the adaptive
   clip; an empty Poisson draw is charged too (:meth:`RoundPrivacy.record_empty_draw`).
5. :meth:`RoundPrivacy.budget`: how many more rounds fit under ``target_epsilon`` — the round machine stops the
   job (``StopCause.PRIVACY_BUDGET``) before the first round that would not.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedmqtt import arrays as A
from fedmqtt.errors import ConfigError
from fedmqtt.privacy.accountant import JobAccountant, default_delta, epsilon_of
from fedmqtt.privacy.adaptive import (
    AdaptiveClip,
    check_adaptive_clip_compatible,
    recommended_count_noise_std,
    update_noise_multiplier,
)
from fedmqtt.privacy.mechanism import (
    DP_UPDATE_WEIGHT,
    add_gaussian_noise,
    central_noise_std,
    device_noise_std,
    effective_noise_multiplier,
    max_accepted_norm,
    secure_generator,
    split_trainable,
    topup_noise_std,
)
from fedmqtt.privacy.sampling import secure_rng
from fedmqtt.schema import CodecSpec, DPMode, DPPlan, PrivacyLedger, PrivacySpent, ValueEncoding

if TYPE_CHECKING:
    import torch


class DPSettingsLike(Protocol):
    """The DP section of a job's configuration (``CoordinatorConfig.dp``)."""

    mode: DPMode
    clip: float
    noise_multiplier: float
    sample_rate: float | None  # resolved by the configuration before a policy is built
    delta: float | None
    target_epsilon: float | None
    population: int | None
    adaptive_clip: float | None


@dataclass(frozen=True)
class RoundBudget:
    """How many more rounds at the planned noise fit under the target ε, and why the job stops after them.

    ``rounds`` is capped at the rounds the caller asked about; ``reason`` states the ε spent once they are used.
    """

    rounds: int
    reason: str


def job_delta(delta: float | None, population: int | None, *, min_devices: int, expected_updates: int,
              sample_rate: float) -> float:  # fmt: skip
    """δ of a job: the configured one, else ``1/N^1.1`` for the population N (configured, else estimated as
    ``max(min_devices, m/q)``: the population that Poisson sampling at rate q draws m devices from)."""
    if delta is not None:
        return float(delta)
    n = population or max(min_devices, round(expected_updates / sample_rate))
    return default_delta(int(n))


def quantisation_margin(update: A.ModelArrays, codec: CodecSpec) -> float:
    """An upper bound on how much lossy value encoding can have grown an update's L2 norm."""
    if codec.values is ValueEncoding.FLOAT32:
        return 0.0
    total = 0.0
    for v in update.values():
        if v.size == 0:
            continue
        peak = float(np.max(np.abs(v)))
        step = peak / 127.0 if codec.values is ValueEncoding.INT8 else peak * 2.0**-10
        total += v.size * (step / 2.0) ** 2
    return float(np.sqrt(total))


def check_update_norm(
    dp: DPPlan, update: A.ModelArrays, codec: CodecSpec, trainable: Collection[str] | None = None
) -> str | None:
    """None when ``update`` (as decoded) fits the round's clip bound plus noise and quantisation margins, else
    why not (the detail of a ``norm_exceeds_clip`` refusal).

    With ``trainable`` (a head-only plan) the noise margin counts the trainable tensors only (devices noise no
    other); the norm is still taken over every tensor received, so a frozen tensor's values count against it.
    """
    trained, _ = split_trainable(update, trainable)
    bound = max_accepted_norm(dp.clip, dp.device_noise_std, A.numel(trained)) + quantisation_margin(update, codec)
    norm = A.l2_norm(update)
    if norm > bound:
        return f"update norm {norm:.4g} exceeds the clip bound {dp.clip:g} (+ noise margin: {bound:.4g})"
    return None


class RoundPrivacy:
    """The privacy policy of one DP job: plan, server noise, accounting, adaptive clip and budget.

    - ``mode``: device, local or central (``off`` has no policy);
    - ``clip``: C (the initial clip with adaptive clipping); ``noise_multiplier``: the round's σ;
    - ``sample_rate``: q of Poisson selection; ``expected_updates``: m, the fixed denominator of the DP average;
    - ``delta``: δ of the ledger (see :func:`job_delta`); ``target_epsilon``: stop before a round would pass it;
    - ``adaptive_clip``: target quantile of adaptive clipping (central mode only).
    """

    update_weight = DP_UPDATE_WEIGHT

    def __init__(
        self,
        *,
        mode: DPMode | str,
        clip: float,
        noise_multiplier: float,
        sample_rate: float,
        expected_updates: int,
        delta: float,
        target_epsilon: float | None = None,
        adaptive_clip: float | None = None,
    ) -> None:
        try:
            self.mode = DPMode(mode)
        except ValueError:
            raise ConfigError("dp_mode", f"{mode!r} is not a DP mode; use device, local or central") from None
        if self.mode is DPMode.OFF:
            raise ConfigError("dp_mode", "is off: a job without DP has no privacy policy")
        if isinstance(expected_updates, bool) or not isinstance(expected_updates, int) or expected_updates < 1:
            raise ConfigError("min_updates", f"must be an integer >= 1, got {expected_updates!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.expected_updates = expected_updates
        self.accountant = JobAccountant(noise_multiplier, sample_rate, delta, target_epsilon=target_epsilon)
        self._clip = float(clip)
        self.adaptive: AdaptiveClip | None = None
        if adaptive_clip is not None:
            check_adaptive_clip_compatible(self.mode)
            count_noise_std = recommended_count_noise_std(expected_updates)
            update_noise_multiplier(noise_multiplier, count_noise_std)  # refuses a quorum too small for it
            self.adaptive = AdaptiveClip(clip, adaptive_clip, count_noise_std=count_noise_std)
        device_noise_std(self.mode, self.noise_multiplier, self._clip, expected_updates)  # validates C and σ

    @classmethod
    def from_settings(cls, dp: DPSettingsLike, *, expected_updates: int, min_devices: int) -> RoundPrivacy:
        """The policy of a job's DP section (``CoordinatorConfig.dp``); m is the job's quorum ``min_updates``."""
        if dp.sample_rate is None:
            raise ConfigError("dp_sample_rate", "is required: DP rounds select devices by Poisson sampling with rate q")
        delta = job_delta(
            dp.delta,
            dp.population,
            min_devices=min_devices,
            expected_updates=expected_updates,
            sample_rate=dp.sample_rate,
        )
        return cls(
            mode=dp.mode,
            clip=dp.clip,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=dp.sample_rate,
            expected_updates=expected_updates,
            delta=delta,
            target_epsilon=dp.target_epsilon,
            adaptive_clip=dp.adaptive_clip,
        )

    # ------------------------------------------------------------------------------------ the round

    @property
    def clip(self) -> float:
        """The clip of the next round (it moves after each aggregated round with adaptive clipping)."""
        return float(self.adaptive.clip) if self.adaptive is not None else self._clip

    @property
    def delta(self) -> float:
        return self.accountant.delta

    @property
    def sample_rate(self) -> float:
        return self.accountant.sample_rate

    @property
    def denominator(self) -> float:
        """The DP average divides by the fixed m (sensitivity C/m), never by the number of updates received."""
        return float(self.expected_updates)

    @property
    def update_noise_multiplier(self) -> float:
        """σ for the update sum: the configured one, less what the clip-bit count uses (adaptive clipping), so
        the round as a whole still runs at the configured σ (Andrew et al. 2021)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self.adaptive.count_noise_std)

    def plan(self) -> DPPlan:
        """The DP section of the next round's plan."""
        clip = self.clip
        return DPPlan(
            mode=self.mode,
            clip=clip,
            noise_multiplier=self.noise_multiplier,
            device_noise_std=device_noise_std(self.mode, self.noise_multiplier, clip, self.expected_updates),
            expected_updates=self.expected_updates,
            sample_rate=self.sample_rate,
            delta=self.delta,
        )

    def server_noise_std(self, received: int, clip: float | None = None) -> float:
        """The noise the coordinator adds to the sum of ``received`` updates clipped to ``clip`` (default: the
        current clip): σC in central mode; in device mode the top-up that restores σC when k < m arrived."""
        clip = self.clip if clip is None else clip
        central = central_noise_std(self.mode, self.update_noise_multiplier, clip)
        topup = topup_noise_std(self.mode, self.noise_multiplier, clip, self.expected_updates, received)
        return float(math.hypot(central, topup))

    def server_noise(
        self,
        received: int,
        like: A.ModelArrays,
        *,
        clip: float | None = None,
        generator: torch.Generator | None = None,
        trainable: Collection[str] | None = None,
    ) -> A.ModelArrays | None:
        """Noise shaped like ``like`` to add to the sum (None when there is none to add). With ``trainable`` (a
        head-only job) only those tensors are noised; the others get exact zeros. Without a generator a fresh
        :func:`secure_generator` draws it."""
        std = self.server_noise_std(received, clip)
        if std <= 0:
            return None
        trained, _ = split_trainable(like, trainable)
        noise = add_gaussian_noise(A.zeros_like(trained), std, generator or secure_generator())
        return {k: noise[k] if k in noise else np.zeros_like(v, dtype=np.float32) for k, v in like.items()}

    def record_round(self, received: int, unclipped: int = 0, rng: np.random.Generator | None = None) -> float | None:
        """Account a round that aggregated ``received`` updates (at the noise actually in its sum) and move the
        adaptive clip by the ``unclipped`` bits; return ε so far (None when unbounded or nothing was released)."""
        if received > 0:
            z = effective_noise_multiplier(
                self.mode,
                self.noise_multiplier,
                self.expected_updates,
                received,
                topped_up=self.mode is DPMode.DEVICE,
            )
            self.accountant.step(noise_multiplier=z)
        if self.adaptive is not None:
            self.adaptive.update(unclipped, self.expected_updates, rng or secure_rng())
        if received == 0:
            return None
        epsilon = self.accountant.epsilon
        return None if math.isinf(epsilon) else float(epsilon)

    def record_empty_draw(self) -> None:
        """An empty Poisson draw still counts as a round of the sampled mechanism: charged at the planned noise
        (conservative), so the ledger matches the sampling the accountant assumes."""
        self.accountant.step()

    # ------------------------------------------------------------------------------------ the budget

    def budget(self, rounds_to_go: int) -> RoundBudget | None:
        """How many of the next ``rounds_to_go`` rounds fit under ``target_epsilon`` at the planned noise (None
        without a target). Every round the coordinator runs costs at most that (effective σ ≥ planned σ)."""
        target = self.accountant.target_epsilon
        if target is None:
            return None
        history = self.accountant.history
        sigma, q, delta = self.accountant.noise_multiplier, self.sample_rate, self.delta

        def after(n: int) -> float:
            return epsilon_of([*history, (sigma, q, n)], delta) if n > 0 else self.accountant.epsilon

        lo, hi = 0, max(0, rounds_to_go)  # invariant: after(lo) <= target, or lo == 0
        if after(hi) <= target:
            lo = hi
        else:
            while hi - lo > 1:  # after(hi) > target
                mid = (lo + hi) // 2
                if after(mid) <= target:
                    lo = mid
                else:
                    hi = mid
        return RoundBudget(
            rounds=lo,
            reason=f"privacy budget: one more round would exceed target epsilon {target:g} "
            f"(spent {after(lo):.3f} at delta {delta:.2e})",
        )

    # ------------------------------------------------------------------------------------ reporting and state

    def spent(self) -> PrivacySpent | None:
        """ε and δ so far for the status message (None before the first round or when unbounded)."""
        if self.accountant.rounds == 0:
            return None
        epsilon = self.accountant.epsilon
        return None if math.isinf(epsilon) else PrivacySpent(epsilon=float(epsilon), delta=self.delta)

    def ledger(self, job: str, now: float, run_id: str | None = None) -> PrivacyLedger:
        """The retained ``PREFIX/JOB/privacy`` message."""
        ledger = self.accountant.ledger(job=job, mode=self.mode, clip=self.clip, now=now)
        return ledger.model_copy(update={"run_id": run_id})

    def state_dict(self) -> dict[str, Any]:
        """The accountant and the adaptive clip (checkpoint keys ``accountant`` and ``adaptive_clip``)."""
        return {
            "accountant": self.accountant.state_dict(),
            "adaptive_clip": self.adaptive.state_dict() if self.adaptive is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        if self.adaptive is not None and state.get("adaptive_clip") is not None:
            self.adaptive.load_state_dict(state["adaptive_clip"])
