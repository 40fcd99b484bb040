"""A device's own privacy ledger: what its data has spent, from the plans it actually trained on.

The coordinator's :class:`~fedmqtt.privacy.accountant.JobAccountant` speaks for the job; a device cannot check
it. So each device keeps its own account, persisted on its disk, and declines rounds once its own budget
(``fedmqtt device --privacy-budget``) would be exceeded.

What one round costs, from the device's side (see docs/privacy.md, "The device ledger"):

- **No amplification by sampling** (sample rate 1). The device knows it took part, and so does anyone who reads
  the plan (``selected``) or the round summary (``participants``). Amplification also needs every round the
  device was *not* sampled in to be counted at rate ``q``; counting only the rounds it trained on at rate ``q``
  would understate its loss by roughly a factor ``q``.
- **Only noise the device can rely on.** local: the noise it adds itself (σ); device: the noise it adds itself
  (σ/√m) — without secure aggregation the coordinator sees its update alone, and in the worst case it is the
  only update of the round; central: the σ the coordinator promised (the device trusts the coordinator in that
  mode by definition; it adds nothing itself).

Each round is then one Gaussian mechanism with that noise multiplier, composed with opacus's RDP accountant.
This is conservative against an observer of the published models, and honest against the coordinator in the
local and device modes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmqtt.atomic import write_atomic
from fedmqtt.errors import ConfigError
from fedmqtt.privacy.accountant import epsilon_of, history_state, load_history_state, opacus_module
from fedmqtt.privacy.errors import BudgetExceeded, PrivacyStateError
from fedmqtt.schema import DPMode, DPPlan

LEDGER_FORMAT = "fedmqtt.device-privacy-ledger"
LEDGER_VERSION = 1

_REMEDY = (
    "the device must not train until this is resolved: restore the file from a backup; deleting it would "
    "forget the privacy this device has already spent"
)


def device_noise_multiplier(plan: DPPlan) -> float:
    """The noise multiplier one round of ``plan`` is charged at in a device's own ledger (sample rate 1).

    local and device modes: the device's own noise relative to the clip (``device_noise_std / clip``: σ in local
    mode, σ/√m in device mode); central mode: the plan's σ (noise the coordinator adds); off: 0 (no privacy).
    """
    if plan.mode in (DPMode.LOCAL, DPMode.DEVICE):
        return plan.device_noise_std / plan.clip
    if plan.mode is DPMode.CENTRAL:
        return plan.noise_multiplier
    return 0.0


class DeviceLedger:
    """A device's privacy ledger, persisted as JSON at ``path`` (written to a temp file, then renamed).

    ``path=None`` keeps it in memory only (tests, devices without a state directory). ``delta``: the δ at which
    ε is stated; by default the δ of the first plan recorded, then fixed (RDP does not depend on δ, only the
    final conversion does, so later plans with another δ are still accounted exactly).

    Call :meth:`record` **before** publishing the update: a crash between the two then over-counts (safe)
    instead of under-counting.
    """

    def __init__(self, path: Path | str | None, budget: float, *, delta: float | None = None) -> None:
        RDPAccountant = opacus_module("accountants").RDPAccountant

        if not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
            raise ConfigError("privacy_budget", f"must be a positive finite epsilon, got {budget!r}")
        if delta is not None and not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
            raise ConfigError("delta", f"must be in (0, 1), got {delta!r}")
        self.path = None if path is None else Path(path)
        self.budget = float(budget)
        self._delta = None if delta is None else float(delta)
        self._accountant = RDPAccountant()
        if self.path is not None and self.path.exists():
            self._load(self.path)
            if delta is not None:
                self._delta = float(delta)  # an explicit delta states the saved rounds at that delta

    # ------------------------------------------------------------------------------------ queries

    @property
    def delta(self) -> float | None:
        return self._delta

    @property
    def rounds(self) -> int:
        return sum(n for _s, _q, n in self._accountant.history)

    @property
    def epsilon(self) -> float:
        """ε spent so far (0 before the first round; ``inf`` after a round without noise)."""
        if self._delta is None:
            return 0.0
        return epsilon_of(self._accountant.history, self._delta)

    def epsilon_after(self, plan: DPPlan) -> float:
        """ε if the device trained on one more round of ``plan``; nothing is recorded."""
        history = [*self._accountant.history, (device_noise_multiplier(plan), 1.0, 1)]
        return epsilon_of(history, self._delta if self._delta is not None else plan.delta)

    def would_exceed(self, plan: DPPlan) -> bool:
        """True when training on ``plan`` would take the device past its budget (always for a noiseless plan)."""
        return self.epsilon_after(plan) > self.budget

    # ------------------------------------------------------------------------------------ recording

    def record(self, plan: DPPlan) -> float:
        """Charge one round of ``plan`` and persist the ledger; return the new ε.

        Raises :class:`BudgetExceeded` (and records nothing) when the round would exceed the budget.
        """
        after = self.epsilon_after(plan)
        delta = self._delta if self._delta is not None else plan.delta
        if after > self.budget:
            raise BudgetExceeded(self.epsilon, after, self.budget, delta)
        before = (list(self._accountant.history), self._delta)
        self._delta = delta
        self._accountant.step(noise_multiplier=device_noise_multiplier(plan), sample_rate=1.0)
        try:
            self._save()
        except BaseException:
            self._accountant.history, self._delta = before  # not on disk: not recorded
            raise
        return after

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (what the ledger file holds), for device checkpoints."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "delta": self._delta,
            "accountant": history_state(self._accountant),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, source: str = "device ledger state") -> None:
        if not isinstance(state, Mapping):
            raise PrivacyStateError(source, "state must be a JSON object", _REMEDY)
        if state.get("format") != LEDGER_FORMAT or state.get("version") != LEDGER_VERSION:
            raise PrivacyStateError(
                source,
                f"not a {LEDGER_FORMAT} version {LEDGER_VERSION} ledger "
                f"(format {state.get('format')!r}, version {state.get('version')!r})",
                _REMEDY,
            )
        delta = state.get("delta")
        if delta is not None and not (isinstance(delta, float) and math.isfinite(delta) and 0.0 < delta < 1.0):
            raise PrivacyStateError(source, f"delta {delta!r} is not in (0, 1)", _REMEDY)
        accountant = state.get("accountant")
        if not isinstance(accountant, Mapping):
            raise PrivacyStateError(source, "missing the accountant history", _REMEDY)
        RDPAccountant = opacus_module("accountants").RDPAccountant

        loaded = RDPAccountant()  # validate everything before replacing anything
        load_history_state(loaded, accountant, source, _REMEDY)
        if loaded.history and delta is None:
            raise PrivacyStateError(source, "rounds are recorded but delta is missing", _REMEDY)
        self._accountant = loaded
        self._delta = delta if delta is not None else self._delta

    def _load(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PrivacyStateError(str(path), f"unreadable ({exc})", _REMEDY) from None
        self.load_state_dict(state, source=str(path))

    def _save(self) -> None:
        if self.path is None:
            return
        document = json.dumps(self.state_dict(), allow_nan=False, indent=1) + "\n"
        write_atomic(self.path, document.encode("utf-8"))
