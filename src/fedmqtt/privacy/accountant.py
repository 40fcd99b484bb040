"""Privacy accounting for a job: opacus's RDP accountant for the sampled Gaussian mechanism, round by round.

Each DP round is one application of the sampled Gaussian mechanism (Mironov, Talwar, Zhang, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism", 2019): devices are Poisson-sampled with rate ``q`` and the sum of
their clipped updates carries Gaussian noise of ``z·C`` (``z`` = the round's *effective* noise multiplier, see
:func:`fedmqtt.privacy.mechanism.effective_noise_multiplier`). RDP composes by addition over rounds; the total is
converted to (ε, δ) with Balle et al. 2020, Theorem 21 — both steps are opacus's
(``opacus.accountants.analysis.rdp``); this module adds memoisation, a stop-before-the-budget check, JSON state
and the retained ``PrivacyLedger`` message.

opacus is imported on first use (it pulls in torch), so ``import fedmqtt.privacy`` stays light.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from fedmqtt.errors import ConfigError
from fedmqtt.extras import require
from fedmqtt.privacy.errors import PrivacyStateError
from fedmqtt.schema import DPMode, PrivacyLedger

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

# RDP orders searched for the best conversion: opacus's defaults (1.1 ... 63) plus the large orders TF Privacy
# also uses, which give a tighter ε for few rounds with much noise. Any order gives a valid bound.
EXTRA_ORDERS: tuple[float, ...] = (80.0, 96.0, 128.0, 256.0, 512.0)

HistoryEntry = tuple[float, float, int]  # (noise multiplier, sample rate, steps): opacus's history format


def opacus_module(name: str = "") -> ModuleType:
    """``opacus`` or ``opacus.NAME``, imported on first use (the ``dp`` extra, else a ``MissingExtra``)."""
    return require("dp", f"opacus.{name}" if name else "opacus", "differential privacy accounting")


def default_delta(population: int) -> float:
    """δ = 1/N^1.1 for a population of N devices: below 1/N, so no single device's data can leak outright."""
    if isinstance(population, bool) or not isinstance(population, int) or population < 2:
        raise ConfigError("dp_population", f"must be an integer >= 2 to derive delta, got {population!r}")
    return float(population**-1.1)


def _validate_rate(field: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(field, f"must be in (0, 1], got {value!r}")
    return float(value)


def _validate_sigma(field: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0.0):
        raise ConfigError(field, f"must be a finite number >= 0, got {value!r}")
    return float(value)


def _validate_delta(value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 < value < 1.0):
        raise ConfigError("dp_delta", f"must be in (0, 1), got {value!r}")
    return float(value)


@functools.cache
def _orders() -> tuple[float, ...]:
    return tuple(float(a) for a in opacus_module("accountants").RDPAccountant.DEFAULT_ALPHAS) + EXTRA_ORDERS


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at every order (opacus), cached: a job meets only a few distinct (σ, q) pairs."""
    analysis = opacus_module("accountants.analysis.rdp")

    values = np.asarray(
        analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(_orders())),
        dtype=np.float64,
    )
    values.setflags(write=False)
    return values


def epsilon_of(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε at ``delta`` of a composition of sampled Gaussian mechanisms, given as opacus history entries.

    The same value as ``RDPAccountant.get_epsilon(delta, alphas=orders)`` with these orders. 0 for no history,
    ``inf`` if any step had noise multiplier 0.
    """
    analysis = opacus_module("accountants.analysis.rdp")

    if not history:
        return 0.0
    total = np.zeros(len(_orders()), dtype=np.float64)
    for sigma, q, steps in history:
        total = total + _rdp_per_step(float(sigma), float(q)) * steps
    if np.isinf(total).all():
        return math.inf
    with warnings.catch_warnings():
        # opacus warns when the best order is at the edge of the list; the bound is valid either way.
        warnings.simplefilter("ignore", UserWarning)
        eps, _order = analysis.get_privacy_spent(orders=list(_orders()), rdp=total, delta=delta)
    return float(eps)


def _opacus_version() -> str:
    return str(getattr(opacus_module(), "__version__", "unknown"))


_STATE_REMEDY = "the saved state is damaged or from another tool; restore it from a backup (do not reset it)"


def _parse_history(source: str, raw: Any, remedy: str) -> list[HistoryEntry]:
    if not isinstance(raw, list):
        raise PrivacyStateError(source, "history must be a list of [noise_multiplier, sample_rate, steps]", remedy)
    entries: list[HistoryEntry] = []
    for i, item in enumerate(raw):
        if not (isinstance(item, list | tuple) and len(item) == 3):
            raise PrivacyStateError(source, f"history[{i}] is not [noise_multiplier, sample_rate, steps]", remedy)
        sigma, q, steps = item
        ok = (
            isinstance(sigma, int | float)
            and not isinstance(sigma, bool)
            and math.isfinite(sigma)
            and sigma >= 0
            and isinstance(q, int | float)
            and not isinstance(q, bool)
            and math.isfinite(q)
            and 0 < q <= 1
            and isinstance(steps, int)
            and not isinstance(steps, bool)
            and steps >= 1
        )
        if not ok:
            raise PrivacyStateError(source, f"history[{i}] = {item!r} is out of range", remedy)
        entries.append((float(sigma), float(q), int(steps)))
    return entries


def history_state(accountant: RDPAccountant) -> dict[str, Any]:
    """opacus's ``state_dict`` as plain JSON values (lists, not tuples or OrderedDict)."""
    return {
        "mechanism": accountant.mechanism(),
        "history": [[float(s), float(q), int(n)] for s, q, n in accountant.history],
    }


def load_history_state(
    accountant: RDPAccountant, state: Mapping[str, Any], source: str, remedy: str = _STATE_REMEDY
) -> None:
    """Validate ``state`` (see :func:`history_state`) and load it into ``accountant``."""
    if not isinstance(state, Mapping):
        raise PrivacyStateError(source, "state must be a JSON object", remedy)
    if state.get("mechanism") != accountant.mechanism():
        raise PrivacyStateError(
            source, f"mechanism {state.get('mechanism')!r} is not {accountant.mechanism()!r}", remedy
        )
    history = _parse_history(source, state.get("history"), remedy)
    accountant.load_state_dict({"mechanism": accountant.mechanism(), "history": history})


class JobAccountant:
    """The coordinator's privacy accountant: one :meth:`step` per round that was aggregated.

    ``epsilon`` is the guarantee against an observer of the published models who does not learn which devices
    took part (the standard DP-FedAvg claim, with amplification by Poisson sampling at rate ``q``).
    ``epsilon_participation_known`` drops the amplification (``q = 1`` for every round): the bound for any
    device against someone who also reads the plans or round summaries, which name the participants.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        *,
        target_epsilon: float | None = None,
    ) -> None:
        RDPAccountant = opacus_module("accountants").RDPAccountant

        self.noise_multiplier = _validate_sigma("dp_noise_multiplier", noise_multiplier)
        self.sample_rate = _validate_rate("dp_sample_rate", sample_rate)
        self.delta = _validate_delta(delta)
        if target_epsilon is not None and not (
            isinstance(target_epsilon, int | float) and math.isfinite(target_epsilon) and target_epsilon > 0
        ):
            raise ConfigError("target_epsilon", f"must be a positive finite number, got {target_epsilon!r}")
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self._accountant = RDPAccountant()

    # ------------------------------------------------------------------------------------ rounds

    def _args(self, noise_multiplier: float | None, sample_rate: float | None) -> tuple[float, float]:
        if noise_multiplier is not None:
            noise_multiplier = _validate_sigma("noise_multiplier", noise_multiplier)
        if sample_rate is not None:
            sample_rate = _validate_rate("sample_rate", sample_rate)
        return (
            self.noise_multiplier if noise_multiplier is None else noise_multiplier,
            self.sample_rate if sample_rate is None else sample_rate,
        )

    def step(self, noise_multiplier: float | None = None, sample_rate: float | None = None) -> None:
        """Account one round that was run, with its effective noise multiplier (default: the configured σ, q)."""
        sigma, q = self._args(noise_multiplier, sample_rate)
        self._accountant.step(noise_multiplier=sigma, sample_rate=q)

    @property
    def history(self) -> list[HistoryEntry]:
        return [(float(s), float(q), int(n)) for s, q, n in self._accountant.history]

    @property
    def rounds(self) -> int:
        return sum(n for _s, _q, n in self._accountant.history)

    @property
    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (0 before the first round; ``inf`` after a round without noise)."""
        return epsilon_of(self.history, self.delta)

    @property
    def epsilon_participation_known(self) -> float:
        """ε at ``delta`` without amplification by sampling: every round counted as a plain Gaussian mechanism."""
        return epsilon_of([(s, 1.0, n) for s, _q, n in self.history], self.delta)

    def epsilon_after_next(self, noise_multiplier: float | None = None, sample_rate: float | None = None) -> float:
        """ε if one more round ran with these parameters (default: the configured σ, q); nothing is recorded."""
        sigma, q = self._args(noise_multiplier, sample_rate)
        trial = copy.deepcopy(self._accountant)
        trial.step(noise_multiplier=sigma, sample_rate=q)
        return epsilon_of(trial.history, self.delta)

    def would_exceed(self, noise_multiplier: float | None = None, sample_rate: float | None = None) -> bool:
        """True when one more round would take ε past ``target_epsilon`` (never without a target)."""
        if self.target_epsilon is None:
            return False
        return self.epsilon_after_next(noise_multiplier, sample_rate) > self.target_epsilon

    # ------------------------------------------------------------------------------------ reporting

    @property
    def accountant_name(self) -> str:
        return f"opacus {_opacus_version()} RDPAccountant ({self._accountant.mechanism()})"

    def ledger(self, job: str, mode: DPMode | str, clip: float, now: float) -> PrivacyLedger:
        """The retained ``PREFIX/JOB/privacy`` message for the rounds accounted so far."""
        try:
            dp_mode = DPMode(mode)
        except ValueError:
            raise ConfigError("dp_mode", f"{mode!r} is not a DP mode; use off, device, local or central") from None
        epsilon = self.epsilon
        known = self.epsilon_participation_known
        try:
            return PrivacyLedger(
                job=job,
                mode=dp_mode,
                clip=clip,
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                rounds=self.rounds,
                # inf cannot cross JSON: None means "no finite bound".
                epsilon=None if math.isinf(epsilon) else epsilon,
                epsilon_participation_known=None if math.isinf(known) else known,
                delta=self.delta,
                target_epsilon=self.target_epsilon,
                accountant=self.accountant_name,
                updated_at=now,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first.get("loc", ())) or "ledger"
            raise ConfigError(field, first["msg"]) from None

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: opacus's history of ``[noise_multiplier, sample_rate, steps]`` and the mechanism."""
        return history_state(self._accountant)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict` (configuration comes from the constructor)."""
        load_history_state(self._accountant, state, "accountant state")


def noise_multiplier_for_budget(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The smallest noise multiplier (to 0.01 in ε) that keeps ``rounds`` full rounds within ``target_epsilon``.

    opacus's ``get_noise_multiplier`` (binary search over its RDP accountant).
    """
    get_noise_multiplier = opacus_module("accountants.utils").get_noise_multiplier

    if not (isinstance(target_epsilon, int | float) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError("target_epsilon", f"must be a positive finite number, got {target_epsilon!r}")
    delta = _validate_delta(delta)
    q = _validate_rate("dp_sample_rate", sample_rate)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError("rounds", f"must be an integer >= 1, got {rounds!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha": still valid
            return float(
                get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=rounds)
            )
    except ValueError as exc:
        raise ConfigError("target_epsilon", f"{target_epsilon:g} cannot be reached: {exc}") from None
