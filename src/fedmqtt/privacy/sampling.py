"""Poisson sampling of devices for DP rounds, so that the mechanism is the one the accountant analyses.

The RDP analysis of the sampled Gaussian mechanism (opacus, Mironov et al. 2019) assumes each device is in a round
independently with probability ``q``. A fixed-size uniform sample, or "the first m that answer", is a different
mechanism; so DP rounds draw each online device's coin separately. The number selected is then random
(binomial), and the DP average still divides by the fixed ``m`` (the expected count), never by it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from fedmqtt.errors import ConfigError


def secure_rng() -> np.random.Generator:
    """A numpy generator seeded with 128 bits from the OS's CSPRNG.

    Amplification by sampling needs the selection to be unpredictable: never pass a fixed seed in a DP job.
    """
    return np.random.default_rng(secrets.randbits(128))


def poisson_select(devices: Sequence[str], q: float, rng: np.random.Generator) -> list[str]:
    """Each device independently with probability ``q``; the selected ones in their input order."""
    if not (isinstance(q, int | float) and math.isfinite(q) and 0.0 < q <= 1.0):
        raise ConfigError("dp_sample_rate", f"must be in (0, 1], got {q!r}")
    if isinstance(devices, str):
        raise ConfigError("devices", "must be a sequence of device ids, not one string")
    if len(set(devices)) != len(devices):
        raise ConfigError("devices", "lists a device more than once; each online device gets exactly one draw")
    draws = rng.random(len(devices))
    return [device for device, draw in zip(devices, draws, strict=True) if draw < q]
