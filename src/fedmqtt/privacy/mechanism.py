"""The Gaussian mechanism on model updates: clipping, noise, and where the noise is added in each DP mode.

Client-level DP as in DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018): each device's whole update is clipped to L2 norm ``C``; the coordinator averages
with uniform weights and a fixed denominator ``m`` (the number of updates a round needs), so one device changes
the sum by at most ``C``; Gaussian noise of standard deviation ``σ·C`` on the sum makes each round a Gaussian
mechanism with noise multiplier ``σ``. Where that noise is added depends on :class:`fedmqtt.schema.DPMode`:

``device``   every device adds ``σC/√m``; the sum of ``m`` noised updates carries ``σC``.
``local``    every device adds ``σC``, so each update is private on its own (and the sum carries ``σC·√k``).
``central``  devices only clip; the coordinator adds ``σC`` to the sum (it sees the clipped updates).

Noise is added before compression: quantisation and top-k are post-processing and cost no privacy.

Head-only (``--trainable``) jobs clip and noise the trainable tensors only (:func:`split_trainable`): the norm is
taken over them, the noise drawn for them, and the frozen tensors, which local training leaves exactly unchanged,
are never touched. The sensitivity is over what is sent, so the accountant is the same.
torch is imported only where noise is drawn, so ``import fedmqtt.privacy`` stays light.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedmqtt.arrays import ModelArrays, l2_norm
from fedmqtt.errors import ConfigError
from fedmqtt.privacy.errors import FrozenTensorChanged, NonFiniteUpdate
from fedmqtt.schema import DPMode

if TYPE_CHECKING:
    import torch

# Aggregation strategies whose output is a function of the DP average only (post-processing of it). The robust
# ones (median, trimmed mean, Krum) select or drop updates, so one device can move their output by more than
# C/m and the accountant's sensitivity would be wrong.
DP_COMPATIBLE_STRATEGIES: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi")

# The weight every update gets in a DP round (uniform; never the sample count, which would let one device with
# many samples move the average by more than C/m).
DP_UPDATE_WEIGHT = 1.0


def _mode(mode: DPMode | str) -> DPMode:
    try:
        return DPMode(mode)
    except ValueError:
        raise ConfigError("dp_mode", f"{mode!r} is not a DP mode; use off, device, local or central") from None


def _positive(field: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(field, f"must be a positive finite number, got {value!r}")
    return float(value)


def _non_negative(field: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ConfigError(field, f"must be a finite number >= 0, got {value!r}")
    return float(value)


def _count(field: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# Clipping and noise
# ---------------------------------------------------------------------------------------------------


def clip_update(arrays: Mapping[str, np.ndarray], clip: float) -> tuple[ModelArrays, float]:
    """Scale the whole update so that its global L2 norm is at most ``clip``.

    Returns ``(clipped, norm_before)``. An update already within the bound is returned unchanged (as float32
    copies). The norm is accumulated in float64 over every tensor; the scaled result is re-measured after the
    float32 cast and shrunk further if rounding left it a hair above ``clip``, so the bound holds exactly.
    """
    clip = _positive("clip", clip)
    for name, value in arrays.items():
        if not np.isfinite(value).all():
            raise NonFiniteUpdate(name)
    norm = l2_norm(arrays)
    if norm <= clip:
        return {k: np.array(v, dtype=np.float32, copy=True) for k, v in arrays.items()}, norm
    factor = clip / norm
    while True:
        clipped = {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in arrays.items()}
        if l2_norm(clipped) <= clip:
            return clipped, norm
        factor *= 1.0 - 2.0**-20  # float32 rounding pushed the norm just past C: shrink a little more


def secure_generator() -> torch.Generator:
    """A fresh torch CPU generator seeded with 63 bits from the OS's CSPRNG (:mod:`secrets`).

    Never seed DP noise with a fixed or guessable value: whoever can regenerate the noise can subtract it.
    """
    import torch

    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63))
    return generator


def add_gaussian_noise(arrays: Mapping[str, np.ndarray], std: float, generator: torch.Generator) -> ModelArrays:
    """Return ``arrays`` plus independent N(0, std²) noise on every coordinate (float32 out)."""
    import torch

    std = _non_negative("noise_std", std)
    if std == 0.0:
        return {k: np.array(v, dtype=np.float32, copy=True) for k, v in arrays.items()}
    out: ModelArrays = {}
    for name, value in arrays.items():
        noise = torch.normal(0.0, std, size=tuple(value.shape), generator=generator, dtype=torch.float32)
        out[name] = value.astype(np.float32, copy=False) + noise.numpy()
    return out


def split_trainable(
    arrays: Mapping[str, np.ndarray], trainable: Collection[str] | None
) -> tuple[ModelArrays, ModelArrays]:
    """``(trained, frozen)``: the tensors of ``arrays`` named in ``trainable`` and the rest (None: all trained).

    The one rule of head-only DP: clipping, noise and the norm bound apply to the trained part only.
    """
    if trainable is None:
        return dict(arrays), {}
    names = set(trainable)
    trained = {k: v for k, v in arrays.items() if k in names}
    frozen = {k: v for k, v in arrays.items() if k not in names}
    return trained, frozen


def clip_and_noise(
    arrays: Mapping[str, np.ndarray],
    *,
    clip: float,
    noise_std: float,
    generator: torch.Generator | None = None,
    trainable: Collection[str] | None = None,
) -> tuple[ModelArrays, float]:
    """Clip the update to ``clip``, then add N(0, noise_std²) per coordinate; return ``(update, norm_before)``.

    With ``trainable`` (a head-only job's plan), the norm, the clipping and the noise cover those tensors only;
    any other tensor of ``arrays`` must be exactly zero (a frozen tensor's delta) and is returned unchanged, else
    :class:`FrozenTensorChanged`. The result keeps ``arrays``' names and order. Without a generator a fresh
    :func:`secure_generator` is used. Compress the result afterwards.
    """
    noise_std = _non_negative("noise_std", noise_std)
    trained, frozen = split_trainable(arrays, trainable)
    for name, value in frozen.items():
        if np.any(value):
            raise FrozenTensorChanged(name)
    clipped, norm_before = clip_update(trained, clip)
    if noise_std != 0.0:
        clipped = add_gaussian_noise(clipped, noise_std, generator or secure_generator())
    if not frozen:
        return clipped, norm_before
    out = {k: clipped[k] if k in clipped else np.array(v, dtype=np.float32, copy=True) for k, v in arrays.items()}
    return out, norm_before


# ---------------------------------------------------------------------------------------------------
# Noise placement by mode
# ---------------------------------------------------------------------------------------------------


def device_noise_std(mode: DPMode | str, noise_multiplier: float, clip: float, expected_updates: int) -> float:
    """The standard deviation each device adds to its clipped update.

    device: ``σC/√m`` (so the sum of the ``m`` updates a round needs carries ``σC``); local: ``σC``;
    central and off: 0.
    """
    mode = _mode(mode)
    sigma = _non_negative("noise_multiplier", noise_multiplier)
    clip = _positive("clip", clip)
    m = _count("expected_updates", expected_updates, 1)
    if mode is DPMode.DEVICE:
        return sigma * clip / math.sqrt(m)
    if mode is DPMode.LOCAL:
        return sigma * clip
    return 0.0


def central_noise_std(mode: DPMode | str, noise_multiplier: float, clip: float) -> float:
    """The standard deviation the coordinator adds to the SUM of updates: ``σC`` in central mode, else 0."""
    mode = _mode(mode)
    sigma = _non_negative("noise_multiplier", noise_multiplier)
    clip = _positive("clip", clip)
    return sigma * clip if mode is DPMode.CENTRAL else 0.0


def topup_noise_std(
    mode: DPMode | str, noise_multiplier: float, clip: float, expected_updates: int, received_updates: int
) -> float:
    """Noise the coordinator can add to the sum in device mode when only ``k < m`` updates arrived.

    ``k`` devices each added ``σC/√m``, so the sum carries ``σC·√(k/m)``; adding ``σC·√(1 − k/m)`` restores
    ``σC`` and the round keeps its planned privacy (:func:`effective_noise_multiplier` with ``topped_up=True``).
    Zero in every other case. The device-side guarantee against the coordinator itself is unchanged by it.
    """
    mode = _mode(mode)
    sigma = _non_negative("noise_multiplier", noise_multiplier)
    clip = _positive("clip", clip)
    m = _count("expected_updates", expected_updates, 1)
    k = _count("received_updates", received_updates, 0)
    if mode is not DPMode.DEVICE or k >= m:
        return 0.0
    return sigma * clip * math.sqrt(1.0 - k / m)


def effective_noise_multiplier(
    mode: DPMode | str,
    noise_multiplier: float,
    expected_updates: int,
    received_updates: int,
    *,
    topped_up: bool = False,
) -> float:
    """The noise actually present in a round's sum, relative to the sensitivity ``C``: what the accountant uses.

    - device: ``k`` updates of ``σC/√m`` each → ``σ·√(k/m)`` (less than σ when the round got fewer than ``m``
      updates, unless the coordinator added :func:`topup_noise_std`, ``topped_up=True`` → σ);
    - local: ``k`` updates of ``σC`` each → ``σ·√k`` (the sum of local noise; each update alone has σ);
    - central: σ (the coordinator's noise does not depend on ``k``);
    - off: 0 (no privacy).

    ``received_updates`` counts the updates summed into the aggregate. A round that aggregated none released
    nothing that depends on data and must not be accounted, so 0 is refused.
    """
    mode = _mode(mode)
    sigma = _non_negative("noise_multiplier", noise_multiplier)
    m = _count("expected_updates", expected_updates, 1)
    k = _count("received_updates", received_updates, 0)
    if k == 0:
        raise ConfigError(
            "received_updates",
            "is 0: a round that aggregated no update released nothing about the data; do not account it",
        )
    if mode is DPMode.DEVICE:
        return sigma * math.sqrt(max(k, m) / m) if topped_up else sigma * math.sqrt(k / m)
    if mode is DPMode.LOCAL:
        return sigma * math.sqrt(k)
    if mode is DPMode.CENTRAL:
        return sigma
    return 0.0


# ---------------------------------------------------------------------------------------------------
# What the coordinator accepts and how it aggregates
# ---------------------------------------------------------------------------------------------------


def max_accepted_norm(clip: float, noise_std: float, numel: int, *, tail: float = 1e-9) -> float:
    """The largest L2 norm an honest update (clipped to ``clip``, then noised) has, except with prob. ``tail``.

    For ``v = u + n`` with ``‖u‖ ≤ C`` and ``n ~ N(0, s²I_d)``: ``‖v‖² = ‖u‖² + 2u·n + ‖n‖²``. With
    ``x = ln(2/tail)``, ``u·n ≤ sC·√(2x)`` (Gaussian tail) and ``‖n‖² ≤ s²(d + 2√(dx) + 2x)`` (Laurent & Massart
    2000, Lemma 1) each fail with probability at most ``e^{-x} = tail/2``, so

        ``‖v‖ ≤ √(C² + 2sC·√(2x) + s²(d + 2√(dx) + 2x))``  with probability ≥ 1 − tail.

    A relative slack of 1e-6 absorbs float32 rounding. Quantisation error is the caller's margin to add.
    When ``s·√d`` is much larger than ``C`` the check only catches updates far above the clip (see
    docs/privacy.md); it is a guard against devices that skip clipping, not a proof that they clipped.
    """
    clip = _positive("clip", clip)
    s = _non_negative("noise_std", noise_std)
    d = _count("numel", numel, 0)
    if not (isinstance(tail, float) and 0.0 < tail < 1.0):
        raise ConfigError("tail", f"must be a probability in (0, 1), got {tail!r}")
    x = math.log(2.0 / tail)
    squared = clip * clip + 2.0 * s * clip * math.sqrt(2.0 * x) + s * s * (d + 2.0 * math.sqrt(d * x) + 2.0 * x)
    return math.sqrt(squared) * (1.0 + 1e-6)


def check_dp_compatible(strategy_name: str, dp_mode: DPMode | str, *, sample_weighted: bool = False) -> None:
    """Refuse aggregation settings whose output a single device could move by more than ``C/m`` in a DP job.

    With DP on, every update gets the same weight (:data:`DP_UPDATE_WEIGHT`) and the sum is divided by the fixed
    ``m``. FedAvg and the server optimisers FedAvgM / FedAdam / FedYogi only post-process that noised average, so
    they are fine. Sample-count weighting and the robust rules (median, trimmed mean, Krum) are not: the
    accountant's sensitivity would be wrong. Raises :class:`ConfigError`; returns None when compatible.
    """
    mode = _mode(dp_mode)
    if mode is DPMode.OFF:
        return
    if strategy_name not in DP_COMPATIBLE_STRATEGIES:
        raise ConfigError(
            "strategy",
            f"{strategy_name!r} cannot be used with dp_mode {mode.value}: its output is not a function of the "
            f"clipped average, so one device's influence is not bounded by C/m; use one of "
            f"{', '.join(DP_COMPATIBLE_STRATEGIES)}",
        )
    if sample_weighted:
        raise ConfigError(
            "strategy",
            "sample-weighted averaging cannot be used with DP: a device with many samples would move the "
            "average by more than C/m; DP rounds weight every update 1.0 and divide by the expected count m",
        )
