"""The coordinator's job configuration: the one place that validates a job.

:class:`CoordinatorConfig` is a pydantic model; its fields are the only list of the coordinator's settings. The
flags of ``fedmqtt coordinator`` and ``fedmqtt simulate``, the TOML keys of ``--config`` and the ``FEDMQTT_*``
environment variables are derived from them (:mod:`fedmqtt.settings`), as is docs/configuration.md. Precedence:
flags > environment > TOML > defaults. Everything is checked before a model is built or a broker dialled, and
errors name settings by their flags, every missing or bad one at once.

Differential privacy is one optional section, :class:`DPSettings` (``config.dp``; ``None`` = DP off), set with the
``--dp-*`` flags, ``[coordinator.dp]`` in TOML or ``FEDMQTT_DP_*``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fedmqtt import settings as S
from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.mqtt.settings import BrokerSettings
from fedmqtt.paths import input_dir_problem, output_dir_problem
from fedmqtt.schema import ID_PATTERN, MAX_SAMPLES_LIMIT, CodecSpec, DPMode, MessageError
from fedmqtt.topics import DEFAULT_PREFIX

CONNECTION = "job"
ROUNDS = "rounds"
TRAINING = "model and training"
LIMITS = "update limits"
DURABILITY = "durability"
PRIVACY = "differential privacy"
SCALE_OUT = "scale-out aggregation"


def _strategy_names() -> Sequence[str]:
    from fedmqtt.coordinator.aggregation import STRATEGY_NAMES

    return STRATEGY_NAMES


def _model_names() -> Sequence[str]:
    from fedmqtt.models import MODEL_NAMES

    return MODEL_NAMES


def _parse_strategy_params(text: str) -> dict[str, bool | int | float]:
    from fedmqtt.coordinator.aggregation import parse_strategy_params

    return parse_strategy_params(text)


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _expand_trainable(model: str, patterns: Sequence[str]) -> tuple[str, ...]:
    from fedmqtt.models import expand_trainable

    try:
        return expand_trainable(model, patterns)
    except FedmqttError as exc:
        raise ValueError(f"--trainable: {getattr(exc, 'message', exc)}") from None


def _partials_refused(strategy: Any) -> str:
    """Why ``strategy`` cannot merge the partial aggregates of --aggregators, in the strategy's own words."""
    from fedmqtt.coordinator.errors import AggregationError

    try:
        strategy.add_partial({}, 0.0, 1)
    except AggregationError as exc:
        return str(exc)
    return f"{strategy.name} cannot combine partial aggregates"  # pragma: no cover - buffering strategies raise


def _info(help: str, **kwargs: Any) -> dict[str, Any]:
    return {"description": help, "json_schema_extra": S.opt(**kwargs)}


class DPSettings(BaseModel):
    """Client-level differential privacy of a job (DP-FedAvg); see docs/privacy.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Annotated[
        DPMode,
        Field(**_info("where the Gaussian noise is added (off: no DP)", group=PRIVACY, section_switch=True)),
    ]
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False, **_info("L2 clip bound C of each update", group=PRIVACY))]
    noise_multiplier: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False, **_info("noise multiplier sigma (> 0: sigma = 0 has no finite epsilon)",
                                                 group=PRIVACY)),
    ]  # fmt: skip
    sample_rate: Annotated[
        float | None,
        Field(
            gt=0,
            le=1,
            **_info(
                "Poisson sampling rate q of devices per round",
                group=PRIVACY,
                default_text="--devices-per-round / --dp-population (1 with every device selected)",
            ),
        ),
    ] = None
    delta: Annotated[
        float | None,
        Field(gt=0, lt=1, **_info("delta of (epsilon, delta)", group=PRIVACY, default_text="1/population^1.1")),
    ] = None
    target_epsilon: Annotated[
        float | None,
        Field(
            gt=0,
            allow_inf_nan=False,
            **_info("stop before a round would exceed this epsilon", group=PRIVACY, flag="--target-epsilon"),
        ),
    ] = None
    population: Annotated[
        int | None,
        Field(gt=1, **_info("number of devices in the population (for the default delta and sample rate)",
                            group=PRIVACY, default_text="min-updates / sample rate")),
    ] = None  # fmt: skip
    adaptive_clip: Annotated[
        float | None,
        Field(gt=0, lt=1, **_info("target quantile for adaptive clipping (needs --dp-mode central)", group=PRIVACY)),
    ] = None


class CoordinatorConfig(BrokerSettings):
    """Everything a coordinator needs to run one federated job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- broker connection: --broker --username --password --password-file --tls-ca --mqtt-version, their
    # types and checks are inherited from fedmqtt.mqtt.settings.BrokerSettings (stated there once).
    job: Annotated[str, Field(pattern=ID_PATTERN, **_info("job id (one topic level)", group=CONNECTION))]
    prefix: Annotated[str, Field(**_info("topic prefix", group=CONNECTION))] = DEFAULT_PREFIX
    client_id: Annotated[
        str | None, Field(**_info("MQTT client id", group=CONNECTION, default_text="fedmqtt-coordinator-JOB"))
    ] = None

    # -- rounds
    rounds: Annotated[int, Field(gt=0, **_info("rounds to run", group=ROUNDS))]
    min_updates: Annotated[int, Field(gt=0, **_info("accepted updates that close a round (quorum)", group=ROUNDS))]
    round_timeout: Annotated[
        float, Field(gt=0, allow_inf_nan=False, **_info("seconds until a round's deadline", group=ROUNDS))
    ] = 120.0
    devices_per_round: Annotated[
        int | None, Field(gt=0, **_info("devices selected per round", group=ROUNDS, default_text="all online"))
    ] = None
    min_devices: Annotated[
        int | None,
        Field(gt=0, **_info("devices online before a round opens", group=ROUNDS, default_text="--min-updates")),
    ] = None
    min_updates_at_deadline: Annotated[
        int | None,
        Field(
            gt=0,
            **_info(
                "updates enough to close a round at its deadline",
                group=ROUNDS,
                default_text="1, or the fewest the strategy needs (krum: 2f + 3)",
            ),
        ),
    ] = None
    max_attempts: Annotated[int, Field(gt=0, **_info("attempts per round before the job stops", group=ROUNDS))] = 3
    target_accuracy: Annotated[
        float | None,
        Field(gt=0, le=1, allow_inf_nan=False, **_info(
            "end the job (exit 0) after the first round whose test accuracy reaches this (needs --eval-data)",
            group=ROUNDS, metavar="X")),
    ] = None  # fmt: skip
    seed: Annotated[int, Field(**_info("seed of the model and of the selection (not under DP)", group=ROUNDS))] = 0

    # -- model and training
    strategy: Annotated[
        str, Field(**_info("aggregation strategy", group=TRAINING, choices=_strategy_names, metavar="NAME"))
    ] = "fedavg"
    # bool | int | float keeps TOML's types (nesterov = true, f = 1); the strategy validates each one itself.
    strategy_params: Annotated[
        dict[str, bool | int | float],
        Field(
            default_factory=dict,
            **_info(
                "strategy parameters, e.g. server_lr=0.5,momentum=0.9 (TOML: a table)",
                group=TRAINING,
                parse=_parse_strategy_params,
                metavar="K=V,...",
            ),
        ),
    ]
    model: Annotated[str, Field(**_info("model", group=TRAINING, choices=_model_names, metavar="NAME"))] = "cnn"
    dataset: Annotated[Literal["mnist", "fashion-mnist"], Field(**_info("data set", group=TRAINING))] = "mnist"
    eval_data: Annotated[
        Path | None,
        Field(**_info("directory of the IDX files; evaluates on the test split each round", group=TRAINING)),
    ] = None
    eval_every: Annotated[
        int,
        Field(gt=0, **_info(
            "with --eval-data, evaluate the model of every N-th round and of the last round only (the others' "
            "accuracy stays empty; --target-accuracy is judged on the evaluated rounds)",
            group=TRAINING, metavar="N")),
    ] = 1  # fmt: skip
    local_epochs: Annotated[int, Field(gt=0, **_info("local epochs per round", group=TRAINING))] = 1
    batch_size: Annotated[int, Field(gt=0, **_info("local batch size", group=TRAINING))] = 50
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False, **_info("local learning rate", group=TRAINING))] = 0.05
    prox_mu: Annotated[
        float | None, Field(ge=0, allow_inf_nan=False, **_info("FedProx proximal term mu", group=TRAINING))
    ] = None
    uplink: Annotated[
        str, Field(**_info("device update codec, e.g. int8, float16, topk:0.01+int8+ef", group=TRAINING))
    ] = "int8"
    downlink: Annotated[
        str,
        Field(
            **_info(
                "global-model codec: float32 sends the whole model each round; float16, int8, topk:0.01+int8 ... "
                "send compressed deltas against the model devices hold (error feedback on the coordinator)",
                group=TRAINING,
            )
        ),
    ] = "float32"
    trainable: Annotated[
        tuple[str, ...] | None,
        Field(
            **_info(
                "train only these tensors: comma-separated names or globs over the model's tensor names, e.g. "
                "fc2.* (expanded when the job is checked; updates and downlink deltas carry only these tensors, the "
                "rest stay bit-identical)",
                group=TRAINING,
                parse=_parse_names,
                metavar="GLOBS",
                default_text="all",
            )
        ),
    ] = None
    init_checkpoint: Annotated[
        Path | None,
        Field(
            **_info(
                "start round 1 from this model file (fedmqtt pretrain, fedmqtt export --format state); it must hold "
                "--model's tensors; --resume from a checkpoint wins over it",
                group=TRAINING,
                metavar="PATH",
            )
        ),
    ] = None
    prune_schedule: Annotated[
        str | None,
        Field(
            **_info(
                "magnitude-prune the global model's conv/linear weights (the trainable ones with --trainable) after "
                "aggregation: SPARSITY@ROUND once, or SPARSITY@FIRST:LAST rising cubically (Zhu & Gupta); pruned "
                "weights stay zero in every later round",
                group=TRAINING,
                metavar="SPEC",
            )
        ),
    ] = None
    keep_pruned: Annotated[
        bool,
        Field(
            **_info(
                "fine-tune a pruned --init-checkpoint (fedmqtt export --prune A --format state): its zero conv/linear "
                "weights stay zero in every round",
                group=TRAINING,
            )
        ),
    ] = False

    # -- update limits (hostile-field bounds)
    max_update_mb: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False, **_info("largest update frame accepted, in MB (10^6 bytes)", group=LIMITS)),
    ] = 64.0
    max_samples: Annotated[
        int, Field(gt=0, le=MAX_SAMPLES_LIMIT, **_info("largest sample count (FedAvg weight) an update may claim",
                                                       group=LIMITS))
    ] = 10_000_000  # fmt: skip
    max_update_norm: Annotated[
        float | None,
        Field(gt=0, allow_inf_nan=False, **_info("refuse updates whose L2 norm exceeds this (jobs without DP)",
                                                 group=LIMITS)),
    ] = None  # fmt: skip

    # -- durability
    checkpoint_dir: Annotated[Path | None, Field(**_info("directory for checkpoints", group=DURABILITY))] = None
    resume: Annotated[bool, Field(**_info("continue from the last checkpoint", group=DURABILITY))] = False
    # Seconds a last will waits after the coordinator's own reconnect (a restarted broker publishes the wills of
    # clients that never died), and that the deadline is held after a reconnect so queued updates can arrive.
    reconnect_grace: Annotated[
        float,
        Field(ge=0, allow_inf_nan=False, **_info(
            "seconds after a reconnect during which last wills wait and the deadline is held", group=DURABILITY)),
    ] = 10.0  # fmt: skip
    take_over: Annotated[
        bool,
        Field(**_info("start even if another coordinator is alive on this job; the other one stops", group=DURABILITY)),
    ] = False

    # -- scale-out aggregation (fedmqtt.aggregator): 0 = the coordinator takes every update itself
    aggregators: Annotated[
        int,
        Field(ge=0, **_info(
            "aggregator workers (fedmqtt aggregator) that screen, keep and sum the updates; rounds open once this "
            "many are online, and the coordinator merges their partial aggregates (FedAvg family only; 0: the "
            "coordinator takes every update itself)", group=SCALE_OUT, metavar="N")),
    ] = 0  # fmt: skip
    partial_timeout: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False, **_info(
            "seconds a closed round waits for the aggregators' partial aggregates before the attempt fails (and is "
            "retried)", group=SCALE_OUT, metavar="S")),
    ] = 60.0  # fmt: skip

    # -- differential privacy: None = off
    dp: DPSettings | None = None

    quiet: Annotated[bool, Field(**_info("no live progress display"))] = False

    # ------------------------------------------------------------------------------------ checks

    @field_validator("dp", mode="before")
    @classmethod
    def _dp_off(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and str(getattr(value.get("mode"), "value", value.get("mode"))) == "off":
            others = [k for k in value if k != "mode"]
            if others:
                flags = ", ".join(_flag(("dp", k)) for k in others)
                raise ValueError(f"{flags}: need{'s' if len(others) == 1 else ''} --dp-mode device, local or central")
            return None
        if isinstance(value, Mapping) and "mode" not in value:
            flags = ", ".join(_flag(("dp", k)) for k in value)
            raise ValueError(f"{flags}: need{'s' if len(value) == 1 else ''} --dp-mode device, local or central")
        return value

    @field_validator("eval_data", "checkpoint_dir")
    @classmethod
    def _usable_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Refused here, before a model is built or a broker is dialled: "--checkpoint-dir: ckpt is a file, not
        # a directory".
        if value is None:
            return None
        check = {"eval_data": input_dir_problem, "checkpoint_dir": output_dir_problem}
        problem = check[str(info.field_name)](value)
        if problem is not None:
            raise ValueError(f"{value} {problem}")
        return value

    @field_validator("job", "prefix", mode="before")
    @classmethod
    def _topic_level(cls, value: Any, info: ValidationInfo) -> Any:
        from fedmqtt.errors import InvalidIdentifier
        from fedmqtt.topics import validate_id, validate_prefix

        try:  # the topic rules of fedmqtt.topics, stated there once
            validate_id("job id", value) if info.field_name == "job" else validate_prefix(value)
        except InvalidIdentifier as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        names = _model_names()
        if value not in names:
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(names)}")
        return value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        names = _strategy_names()
        if value not in names:
            raise ValueError(f"unknown strategy {value!r}; choose one of {', '.join(names)}")
        return value

    @field_validator("prune_schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        from fedmqtt.pruning import PruneSchedule

        return None if value is None else PruneSchedule.parse(value).spec

    @field_validator("uplink", "downlink")
    @classmethod
    def _codec(cls, value: str, info: ValidationInfo) -> str:
        try:
            codec = CodecSpec.parse(value)
        except MessageError as exc:
            raise ValueError(exc.detail) from None
        if info.field_name == "downlink" and codec.error_feedback:
            raise ValueError(
                f"{value!r}: drop 'ef': a compressed downlink always uses error feedback, on the coordinator "
                "(it tracks the model the devices hold and sends what they lack in the next delta)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CoordinatorConfig:
        from fedmqtt.coordinator.aggregation import build_strategy

        try:  # the strategy's own parameter schema, before any model is built or broker dialled
            strategy = build_strategy(self.strategy, **self.strategy_params)
        except ConfigError as exc:
            raise ValueError(f"--strategy-params: {exc}") from None
        if self.min_devices is not None and self.min_devices < self.min_updates:
            raise ValueError(f"--min-devices: must be >= --min-updates ({self.min_updates}): a round could never close")
        if self.devices_per_round is not None and self.devices_per_round < self.min_updates:
            raise ValueError(
                f"--devices-per-round: must be >= --min-updates ({self.min_updates}): a round could never reach "
                "its quorum"
            )
        if self.min_updates_at_deadline is not None and self.min_updates_at_deadline > self.min_updates:
            raise ValueError(f"--min-updates-at-deadline: must be <= --min-updates ({self.min_updates})")
        # The strategy's own requirement (Krum: n >= 2f + 3; trimmed mean: something to trim), before round 1.
        need = strategy.min_updates
        if self.min_updates < need:
            raise ValueError(f"--min-updates: {self.min_updates} is too few: {strategy.requirement()}")
        if self.min_updates_at_deadline is not None and self.min_updates_at_deadline < need:
            raise ValueError(
                f"--min-updates-at-deadline: {self.min_updates_at_deadline} is too few: {strategy.requirement()}"
            )
        if self.min_updates_at_deadline is None:  # resolved here: every reader sees the number the job uses
            object.__setattr__(self, "min_updates_at_deadline", need)
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume: needs --checkpoint-dir")
        if self.aggregators and strategy.buffers_updates:
            raise ValueError(f"--aggregators: {_partials_refused(strategy)}")
        if self.trainable is not None:  # globs -> the model's tensor names, resolved here once (the plan's set)
            object.__setattr__(self, "trainable", _expand_trainable(self.model, self.trainable))
        initial = self.initial_arrays() if self.init_checkpoint is not None else None  # refused now if it misfits
        if self.prune_schedule is not None or self.keep_pruned:
            self._check_pruning(initial)
        if self.dp is not None:
            self._check_dp(self.dp)
        return self

    def _check_pruning(self, initial: dict[str, Any] | None) -> None:
        from fedmqtt.pruning import mask_of_zeros, masked_count

        flag = "--prune-schedule" if self.prune_schedule is not None else "--keep-pruned"
        scope = self.prune_scope
        if not scope:
            raise ValueError(
                f"{flag}: --trainable ({', '.join(self.trainable or ())}) holds no conv/linear weight to prune; "
                f"the prunable tensors of {self.model}: {', '.join(self.prunable_tensors)}"
            )
        schedule = self.prune_plan
        if schedule is not None and schedule.last > self.rounds:
            raise ValueError(
                f"--prune-schedule: {schedule.spec} prunes until round {schedule.last} but the job has --rounds "
                f"{self.rounds}: end the schedule at round {self.rounds} or earlier (rounds after it fine-tune)"
            )
        if self.keep_pruned:
            if initial is None:
                raise ValueError(
                    "--keep-pruned: needs --init-checkpoint, the pruned model file whose zeros it keeps "
                    "(fedmqtt export --prune AMOUNT --format state)"
                )
            if masked_count(mask_of_zeros(initial, scope)) == 0:
                raise ValueError(
                    f"--keep-pruned: {self.init_checkpoint} has no zero weight in {', '.join(scope)}: nothing to "
                    "keep; prune it first (fedmqtt export --prune AMOUNT --format state) or use --prune-schedule"
                )

    def _check_dp(self, dp: DPSettings) -> None:
        from fedmqtt.privacy import check_adaptive_clip_compatible, check_dp_compatible

        try:
            check_dp_compatible(self.strategy, dp.mode)
            if dp.adaptive_clip is not None:
                check_adaptive_clip_compatible(dp.mode)
        except ConfigError as exc:
            raise ValueError(f"{_flag_of_name(exc.field)}: {exc.message}") from None
        if CodecSpec.parse(self.uplink).error_feedback:
            raise ValueError(
                "--uplink: error feedback ('ef') cannot be combined with DP: the residual would escape the "
                "clipping bound"
            )
        if dp.sample_rate is None:
            # Defaulted from the selection when the population is known; refused up front otherwise.
            if dp.population is None:
                raise ValueError(
                    f"--dp-sample-rate: required with --dp-mode {dp.mode.value} unless --dp-population is given "
                    "(the rate then defaults to --devices-per-round / --dp-population)"
                )
            selected = self.devices_per_round or dp.population
            if selected > dp.population:
                raise ValueError(f"--devices-per-round: {selected} is above --dp-population ({dp.population})")
            object.__setattr__(self, "dp", dp.model_copy(update={"sample_rate": selected / dp.population}))

    # ------------------------------------------------------------------------------------ derived values

    def initial_arrays(self) -> dict[str, Any] | None:
        """Round 1's model from ``--init-checkpoint`` (verified, in the model's order), or None without one.
        Raises ValueError naming the flag when the file is unreadable or holds another model, classes or shapes."""
        if self.init_checkpoint is None:
            return None
        from fedmqtt.model_file import ModelFileError, check_model, load_model_file

        try:
            return check_model(load_model_file(self.init_checkpoint), self.model, path=self.init_checkpoint)
        except ModelFileError as exc:
            raise ValueError(f"--init-checkpoint: {exc}") from None

    @property
    def prunable_tensors(self) -> tuple[str, ...]:
        """The model's conv/linear weights (fedmqtt.pruning's rule)."""
        from fedmqtt.pruning import prunable_names

        return prunable_names(self.model)

    @property
    def prune_scope(self) -> tuple[str, ...]:
        """The tensors --prune-schedule / --keep-pruned may zero: the prunable ones, only trainable ones with
        --trainable (frozen tensors stay bit-identical)."""
        return tuple(n for n in self.prunable_tensors if self.trainable is None or n in self.trainable)

    @property
    def prune_plan(self) -> Any:
        """The parsed --prune-schedule (a fedmqtt.pruning.PruneSchedule), or None."""
        from fedmqtt.pruning import PruneSchedule

        return None if self.prune_schedule is None else PruneSchedule.parse(self.prune_schedule)

    @property
    def uplink_codec(self) -> CodecSpec:
        return CodecSpec.parse(self.uplink)

    @property
    def downlink_codec(self) -> CodecSpec:
        return CodecSpec.parse(self.downlink)

    @property
    def effective_min_devices(self) -> int:
        return self.min_devices or self.min_updates

    @property
    def dp_mode(self) -> DPMode:
        """``dp.mode``, or OFF without a DP section (a read-only convenience; the settings live in ``dp``)."""
        return DPMode.OFF if self.dp is None else self.dp.mode

    @property
    def max_update_bytes(self) -> int:
        return int(self.max_update_mb * S.MB)


SETTINGS: list[S.Setting] = S.settings_of(CoordinatorConfig)


def _flag(path: tuple[str, ...]) -> str:
    return next((s.flag for s in SETTINGS if s.path == path), "--" + "-".join(path).replace("_", "-"))


def _flag_of_name(name: str) -> str:
    return S.flag_spelling(name, SETTINGS)


def load_config(
    toml_path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    flags: Mapping[tuple[str, ...], Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> CoordinatorConfig:
    """Validate a job from its sources: flags > environment (``FEDMQTT_*``; ``env`` defaults to os.environ) >
    TOML file > defaults. ``overrides`` takes flat field names (``dp_clip`` for ``--dp-clip``, None = not given).
    Raises :class:`fedmqtt.settings.SettingsError` naming every bad or missing setting by its flag."""
    given: dict[tuple[str, ...], Any] = dict(flags or {})
    by_name = {s.flag[2:].replace("-", "_"): s for s in SETTINGS} | {s.name: s for s in SETTINGS}
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        setting = by_name.get(name)
        if setting is None:
            raise ConfigError(name, "is not a coordinator setting")
        given[setting.path] = value
    return S.load(
        CoordinatorConfig,
        flags=given,
        env=os.environ if env is None else env,
        toml=toml_path,
        toml_table="coordinator",
        settings=SETTINGS,
        env_skip=("password",),  # BrokerSettings reads $FEDMQTT_PASSWORD itself, after the other sources
    )


def config_from_args(
    args: argparse.Namespace, *, env: Mapping[str, str] | None = None, toml_path: Path | None = None
) -> CoordinatorConfig:
    """The job of parsed flags (dest = setting name, as :func:`fedmqtt.settings.add_flags` makes them)."""
    return load_config(toml_path, flags=S.from_flags(args, SETTINGS), env=env)


def write_config(config: CoordinatorConfig, path: Path, *, exclude: Sequence[str] = ("password",)) -> Path:
    """Write ``config`` as a ``[coordinator]`` TOML file that :func:`load_config` reads back to the same job."""
    path.write_text(S.to_toml(config, "coordinator", exclude=exclude), encoding="utf-8")
    return path


DOC_BEGIN = "<!-- BEGIN generated by fedmqtt.coordinator.config.reference_doc -->"
DOC_END = "<!-- END generated -->"


def reference_doc(text: str) -> str:
    """``text`` (docs/configuration.md) with the table between the markers regenerated from the model.

    ``python -m fedmqtt.coordinator.config docs/configuration.md`` rewrites the file; a test fails when it is stale.
    """
    head, _, rest = text.partition(DOC_BEGIN)
    _, _, tail = rest.partition(DOC_END)
    return f"{head}{DOC_BEGIN}\n{S.reference_table(SETTINGS)}{DOC_END}{tail}"


if __name__ == "__main__":
    import sys

    doc = Path(sys.argv[1])
    doc.write_text(reference_doc(doc.read_text(encoding="utf-8")), encoding="utf-8")
