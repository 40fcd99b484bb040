"""Errors raised by the differential-privacy core.

Bad settings (a negative clip, a sample rate above 1, ...) raise :class:`fedmqtt.errors.ConfigError` naming the
setting; the classes here cover what can go wrong with values and state at run time.
"""

from __future__ import annotations

from fedmqtt.errors import FedmqttError


class PrivacyError(FedmqttError):
    """Base class of the privacy core's own errors."""


class NonFiniteUpdate(PrivacyError):
    """An update holds NaN or infinite values, so it cannot be clipped (its norm is undefined)."""

    def __init__(self, tensor: str) -> None:
        super().__init__(
            f"the update's tensor {tensor!r} holds NaN or infinite values, so it cannot be clipped; "
            "local training diverged: lower the learning rate or check the data"
        )
        self.tensor = tensor


class FrozenTensorChanged(PrivacyError):
    """A tensor outside the trainable set changed in local training: clipping over the trainable tensors alone
    would let its change through unbounded, so the update is not sent."""

    def __init__(self, tensor: str) -> None:
        super().__init__(
            f"the update's tensor {tensor!r} is frozen (not in the plan's trainable set) but changed in local "
            "training; DP clips and noises the trainable tensors only, so this update must not be sent: the "
            "device's model code trains a tensor it was told to freeze"
        )
        self.tensor = tensor


class BudgetExceeded(PrivacyError):
    """Recording this round would take a device past its own privacy budget."""

    def __init__(self, spent: float, after: float, budget: float, delta: float) -> None:
        super().__init__(
            f"privacy budget: this round would take the device from epsilon {spent:.3f} to {after:.3f}, "
            f"past its budget {budget:g} (delta {delta:.2e}); the device must not take part"
        )
        self.spent = spent
        self.after = after
        self.budget = budget
        self.delta = delta


class PrivacyStateError(PrivacyError):
    """A saved accountant, ledger or adaptive-clip state cannot be loaded."""

    def __init__(self, source: str, detail: str, remedy: str) -> None:
        super().__init__(f"{source}: {detail}; {remedy}")
        self.source = source
        self.detail = detail


class UnboundedEpsilon(PrivacyError):
    """A round ran without noise (noise multiplier 0), so no finite epsilon describes the job."""

    def __init__(self, job: str) -> None:
        super().__init__(
            f"job {job}: a round ran with noise multiplier 0, so epsilon is unbounded and the privacy "
            "ledger cannot state a finite value; use a positive noise multiplier for a DP job"
        )
        self.job = job
