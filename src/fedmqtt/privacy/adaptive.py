"""Adaptive clipping: follow a quantile of the update norms instead of a hand-tuned clip.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021
(Algorithm 1). Each device reports one bit ``b_i = [‖Δ_i‖ ≤ C]`` with its update; the coordinator forms the noised
fraction ``b̃ = (Σ b_i + N(0, σ_b²)) / m`` (``m`` = expected updates per round) and moves the clip geometrically,

    ``C ← C · exp(−η (b̃ − γ))``,

so ``C`` drifts towards the ``γ``-quantile of the norms. The bit sum is a second Gaussian query; to keep the
round's total noise multiplier at ``z``, the update noise uses :func:`update_noise_multiplier`
(``σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``; the ``2`` is because a centred bit ``b − ½`` has sensitivity ½). The
paper's defaults: ``γ = 0.5``, ``η = 0.2``, ``σ_b = m/20``.

The bits reach the coordinator unnoised, so adaptive clipping is offered in central mode only
(:func:`check_adaptive_clip_compatible`): in device and local modes the coordinator is not trusted with raw
per-device information, and one bit per round would escape the mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedmqtt.errors import ConfigError
from fedmqtt.privacy.errors import PrivacyStateError
from fedmqtt.schema import DPMode


def _positive(field: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(field, f"must be a positive finite number, got {value!r}")
    return float(value)


def recommended_count_noise_std(expected_updates: int) -> float:
    """The paper's choice ``σ_b = m/20`` for ``m`` expected updates per round."""
    if isinstance(expected_updates, bool) or not isinstance(expected_updates, int) or expected_updates < 1:
        raise ConfigError("expected_updates", f"must be an integer >= 1, got {expected_updates!r}")
    return expected_updates / 20.0


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``σ_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``: the update noise that, with the bit-count noise, totals ``z``."""
    z = _positive("noise_multiplier", noise_multiplier)
    sigma_b = _positive("count_noise_std", count_noise_std)
    if 2.0 * sigma_b <= z:
        raise ConfigError(
            "count_noise_std",
            f"{sigma_b:g} is too small for noise multiplier {z:g}: it must exceed z/2 = {z / 2:g} "
            "(the bit count would use up the whole privacy budget); use m/20 with more expected updates",
        )
    return float((z**-2 - (2.0 * sigma_b) ** -2) ** -0.5)


def combined_noise_multiplier(update_noise_multiplier: float, count_noise_std: float) -> float:
    """The inverse: the total noise multiplier ``z = (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2)`` to account a round with.

    ``count_noise_std = 0`` means the bits were published exactly: no privacy (0).
    """
    sigma_delta = _positive("noise_multiplier", update_noise_multiplier)
    if not (isinstance(count_noise_std, int | float) and math.isfinite(count_noise_std) and count_noise_std >= 0):
        raise ConfigError("count_noise_std", f"must be a finite number >= 0, got {count_noise_std!r}")
    if count_noise_std == 0:
        return 0.0
    return float((sigma_delta**-2 + (2.0 * count_noise_std) ** -2) ** -0.5)


def check_adaptive_clip_compatible(dp_mode: DPMode | str) -> None:
    """Adaptive clipping needs ``dp_mode = central``; raise :class:`ConfigError` otherwise."""
    try:
        mode = DPMode(dp_mode)
    except ValueError:
        raise ConfigError("dp_mode", f"{dp_mode!r} is not a DP mode; use off, device, local or central") from None
    if mode is not DPMode.CENTRAL:
        raise ConfigError(
            "dp_adaptive_clip",
            f"needs dp_mode central (got {mode.value}): devices report an unnoised clipping bit, which only a "
            "trusted coordinator may see",
        )


class AdaptiveClip:
    """The clip of the next round, updated once per aggregated round from the devices' clipping bits."""

    def __init__(
        self,
        initial_clip: float,
        target_quantile: float,
        learning_rate: float = 0.2,
        *,
        count_noise_std: float,
    ) -> None:
        self.clip = _positive("dp_clip", initial_clip)
        if not (isinstance(target_quantile, int | float) and 0.0 < target_quantile < 1.0):
            raise ConfigError("dp_adaptive_clip", f"target quantile must be in (0, 1), got {target_quantile!r}")
        self.target_quantile = float(target_quantile)
        self.learning_rate = _positive("learning_rate", learning_rate)
        if not (isinstance(count_noise_std, int | float) and math.isfinite(count_noise_std) and count_noise_std >= 0):
            raise ConfigError("count_noise_std", f"must be a finite number >= 0, got {count_noise_std!r}")
        self.count_noise_std = float(count_noise_std)
        self.rounds = 0
        self.last_fraction: float | None = None

    def update(self, unclipped: int, expected_updates: int, rng: np.random.Generator) -> float:
        """Apply one round: ``unclipped`` updates had norm ≤ the current clip. Returns the new clip.

        ``rng`` draws the count noise: use :func:`fedmqtt.privacy.sampling.secure_rng` in a real job.
        """
        if isinstance(unclipped, bool) or not isinstance(unclipped, int | np.integer) or unclipped < 0:
            raise ConfigError("unclipped", f"must be an integer >= 0, got {unclipped!r}")
        if isinstance(expected_updates, bool) or not isinstance(expected_updates, int) or expected_updates < 1:
            raise ConfigError("expected_updates", f"must be an integer >= 1, got {expected_updates!r}")
        noise = float(rng.normal(0.0, self.count_noise_std)) if self.count_noise_std > 0 else 0.0
        fraction = (int(unclipped) + noise) / expected_updates
        self.clip *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        self.last_fraction = fraction
        self.rounds += 1
        return self.clip

    def state_dict(self) -> dict[str, Any]:
        return {
            "clip": self.clip,
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "count_noise_std": self.count_noise_std,
            "rounds": self.rounds,
            "last_fraction": self.last_fraction,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the clip and round count; the settings must match the ones this object was built with."""
        remedy = "resume with the same adaptive-clipping settings, or start a new job"
        source = "adaptive clip state"
        if not isinstance(state, Mapping):
            raise PrivacyStateError(source, "state must be a JSON object", remedy)
        clip, rounds = state.get("clip"), state.get("rounds")
        if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
            raise PrivacyStateError(source, f"clip {clip!r} is not a positive number", remedy)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise PrivacyStateError(source, f"rounds {rounds!r} is not an integer >= 0", remedy)
        for key in ("target_quantile", "learning_rate", "count_noise_std"):
            if state.get(key) != getattr(self, key):
                raise PrivacyStateError(
                    source, f"{key} was {state.get(key)!r}, this job uses {getattr(self, key)!r}", remedy
                )
        last = state.get("last_fraction")
        self.clip = float(clip)
        self.rounds = rounds
        self.last_fraction = float(last) if isinstance(last, int | float) else None
