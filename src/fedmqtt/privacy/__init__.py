"""Client-level differential privacy for fedmqtt (DP-FedAvg): clip, noise, account.

Pure and synchronous: values in, values out. torch and opacus are imported on first use. See docs/privacy.md.

- :mod:`.mechanism`: clipping, Gaussian noise, where each DP mode adds it, the norm bound the coordinator checks.
- :mod:`.accountant`: the job's ε (opacus RDP accountant), stop-before-the-budget, the ``PrivacyLedger`` message.
- :mod:`.ledger`: a device's own persisted ledger and budget.
- :mod:`.sampling`: Poisson selection of devices.
- :mod:`.adaptive`: adaptive clipping (Andrew et al. 2021).
- :mod:`.policy`: :class:`RoundPrivacy`, a DP job's round policy (plan, norm bound, server noise, accounting,
  budget) that the coordinator and the privacy benchmark share.
"""

from fedmqtt.privacy.accountant import (
    JobAccountant,
    default_delta,
    epsilon_of,
    noise_multiplier_for_budget,
)
from fedmqtt.privacy.adaptive import (
    AdaptiveClip,
    check_adaptive_clip_compatible,
    combined_noise_multiplier,
    recommended_count_noise_std,
    update_noise_multiplier,
)
from fedmqtt.privacy.errors import (
    BudgetExceeded,
    FrozenTensorChanged,
    NonFiniteUpdate,
    PrivacyError,
    PrivacyStateError,
    UnboundedEpsilon,
)
from fedmqtt.privacy.ledger import DeviceLedger, device_noise_multiplier
from fedmqtt.privacy.mechanism import (
    DP_COMPATIBLE_STRATEGIES,
    DP_UPDATE_WEIGHT,
    add_gaussian_noise,
    central_noise_std,
    check_dp_compatible,
    clip_and_noise,
    clip_update,
    device_noise_std,
    effective_noise_multiplier,
    max_accepted_norm,
    secure_generator,
    split_trainable,
    topup_noise_std,
)
from fedmqtt.privacy.policy import RoundBudget, RoundPrivacy, check_update_norm
from fedmqtt.privacy.sampling import poisson_select, secure_rng

__all__ = [
    "DP_COMPATIBLE_STRATEGIES",
    "DP_UPDATE_WEIGHT",
    "AdaptiveClip",
    "BudgetExceeded",
    "DeviceLedger",
    "FrozenTensorChanged",
    "JobAccountant",
    "NonFiniteUpdate",
    "PrivacyError",
    "PrivacyStateError",
    "RoundBudget",
    "RoundPrivacy",
    "UnboundedEpsilon",
    "add_gaussian_noise",
    "central_noise_std",
    "check_adaptive_clip_compatible",
    "check_dp_compatible",
    "check_update_norm",
    "clip_and_noise",
    "clip_update",
    "combined_noise_multiplier",
    "default_delta",
    "device_noise_multiplier",
    "device_noise_std",
    "effective_noise_multiplier",
    "epsilon_of",
    "max_accepted_norm",
    "noise_multiplier_for_budget",
    "poisson_select",
    "recommended_count_noise_std",
    "secure_generator",
    "secure_rng",
    "split_trainable",
    "topup_noise_std",
    "update_noise_multiplier",
]
