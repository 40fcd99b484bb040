"""The coordinator's job configuration: one pydantic model, filled from a TOML file and/or CLI flags.

Flags override the file. Everything is validated before the coordinator connects to a broker, and a bad value
is refused with :class:`fedmqtt.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedmqtt.errors import ConfigError
from fedmqtt.paths import input_dir_problem, input_file_problem, output_dir_problem
from fedmqtt.schema import ID_PATTERN, MAX_SAMPLES_LIMIT, CodecSpec, DPMode, MessageError
from fedmqtt.topics import DEFAULT_PREFIX

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "median", "trimmed-mean", "krum")
ROBUST_STRATEGIES = ("median", "trimmed-mean", "krum")


class CoordinatorConfig(BaseModel):
    """Everything a coordinator needs to run one federated job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker: str = "mqtt://127.0.0.1:1883"
    job: Annotated[str, Field(pattern=ID_PATTERN)]
    prefix: str = DEFAULT_PREFIX
    mqtt_version: Literal["5", "3.1.1", "auto"] = "auto"
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    client_id: str | None = None

    rounds: Annotated[int, Field(gt=0)]
    min_updates: Annotated[int, Field(gt=0)]
    round_timeout: Annotated[float, Field(gt=0)] = 120.0
    devices_per_round: Annotated[int, Field(gt=0)] | None = None
    min_devices: Annotated[int, Field(gt=0)] | None = None
    min_updates_at_deadline: Annotated[int, Field(gt=0)] | None = None
    max_attempts: Annotated[int, Field(gt=0)] = 3
    seed: int = 0

    strategy: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "median", "trimmed-mean", "krum"] = "fedavg"
    # bool | int | float keeps TOML's types (nesterov = true, f = 1); the strategy validates each one itself.
    strategy_params: dict[str, bool | int | float] = Field(default_factory=dict)
    model: str = "cnn"
    dataset: Literal["mnist", "fashion-mnist"] = "mnist"
    eval_data: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False

    local_epochs: Annotated[int, Field(gt=0)] = 1
    batch_size: Annotated[int, Field(gt=0)] = 50
    lr: Annotated[float, Field(gt=0)] = 0.05
    prox_mu: Annotated[float, Field(ge=0)] | None = None
    uplink: str = "int8"
    downlink: str = "float32"
    trainable: tuple[str, ...] | None = None
    max_update_mb: Annotated[float, Field(gt=0)] = 64.0
    # Hostile-field bounds: the largest sample count (FedAvg weight) one update may claim, and an optional L2 bound
    # on update norms for jobs without DP (DP jobs are bounded by the clip).
    max_samples: Annotated[int, Field(gt=0, le=MAX_SAMPLES_LIMIT)] = 10_000_000
    max_update_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    # Seconds a last will waits after the coordinator's own reconnect (a restarted broker publishes the wills of
    # clients that never died), and that the deadline is held after a reconnect so queued updates can arrive.
    reconnect_grace: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 10.0
    take_over: bool = False

    dp_mode: DPMode = DPMode.OFF
    dp_clip: Annotated[float, Field(gt=0)] | None = None
    dp_noise_multiplier: Annotated[float, Field(ge=0)] | None = None
    dp_delta: Annotated[float, Field(gt=0, lt=1)] | None = None
    target_epsilon: Annotated[float, Field(gt=0)] | None = None
    dp_sample_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    dp_population: Annotated[int, Field(gt=0)] | None = None
    dp_adaptive_clip: Annotated[float, Field(gt=0, lt=1)] | None = None

    quiet: bool = False

    @field_validator("tls_ca", "eval_data", "checkpoint_dir")
    @classmethod
    def _usable_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Refused here, before a model is built or a broker is dialled: "checkpoint_dir: --checkpoint-dir ckpt
        # is a file, not a directory".
        if value is None:
            return None
        from fedmqtt.mqtt import tls_ca_problem

        check = {"tls_ca": tls_ca_problem, "eval_data": input_dir_problem, "checkpoint_dir": output_dir_problem}
        problem = check[str(info.field_name)](value)
        if problem is not None:
            raise ValueError(f"--{str(info.field_name).replace('_', '-')} {value} {problem}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CoordinatorConfig:
        try:
            codec = CodecSpec.parse(self.uplink)
        except MessageError as exc:
            raise ValueError(f"uplink: {exc.detail}") from None
        try:
            down = CodecSpec.parse(self.downlink)
        except MessageError as exc:
            raise ValueError(f"downlink: {exc.detail}") from None
        if down.topk is not None or down.error_feedback:
            raise ValueError("downlink: a global model is sent whole: use float32, float16 or int8 (no topk, no ef)")
        from fedmqtt.coordinator.aggregation import build_strategy

        try:  # the strategy's own parameter schema, before any model is built or broker dialled
            build_strategy(self.strategy, **self.strategy_params)
        except ConfigError as exc:
            raise ValueError(f"strategy_params: {exc}") from None
        if self.min_devices is not None and self.min_devices < self.min_updates:
            raise ValueError("min_devices: must be >= min_updates (a round could never close)")
        if self.devices_per_round is not None and self.devices_per_round < self.min_updates:
            raise ValueError("devices_per_round: must be >= min_updates (a round could never reach its quorum)")
        if self.min_updates_at_deadline is not None and self.min_updates_at_deadline > self.min_updates:
            raise ValueError("min_updates_at_deadline: must be <= min_updates")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("checkpoint_dir: --resume needs a checkpoint_dir")
        if self.dp_mode is not DPMode.OFF:
            if self.dp_clip is None or self.dp_noise_multiplier is None:
                raise ValueError("dp_clip: dp_mode needs dp_clip and dp_noise_multiplier")
            if self.dp_noise_multiplier <= 0:
                raise ValueError("dp_noise_multiplier: must be > 0 with DP on (sigma = 0 gives no finite epsilon)")
            if self.dp_adaptive_clip is not None and self.dp_mode is not DPMode.CENTRAL:
                raise ValueError(
                    "dp_adaptive_clip: needs dp_mode central (the clip bit reaches the coordinator unnoised)"
                )
            if self.dp_sample_rate is None:
                raise ValueError(
                    "dp_sample_rate: dp_mode needs dp_sample_rate: DP rounds select devices by Poisson sampling with rate q"
                )
            if self.trainable is not None:
                raise ValueError(
                    "trainable: head-only training cannot be combined with DP yet (devices would noise the "
                    "frozen tensors too); see the privacy benchmark for the simulated head-only results"
                )
            if self.strategy in ROBUST_STRATEGIES:
                raise ValueError(f"strategy: {self.strategy} is not compatible with DP (unbounded sensitivity)")
            if codec.error_feedback:
                raise ValueError(
                    "uplink: error feedback ('ef') cannot be combined with DP: the residual would "
                    "escape the clipping bound"
                )
        elif self.target_epsilon is not None or self.dp_adaptive_clip is not None:
            raise ValueError("dp_mode: target_epsilon / dp_adaptive_clip need dp_mode device, local or central")
        return self

    @property
    def uplink_codec(self) -> CodecSpec:
        return CodecSpec.parse(self.uplink)

    @property
    def downlink_codec(self) -> CodecSpec:
        return CodecSpec.parse(self.downlink)

    @property
    def effective_min_devices(self) -> int:
        return self.min_devices or self.min_updates


def load_config(toml_path: Path | None, overrides: dict[str, Any]) -> CoordinatorConfig:
    """Merge a TOML file (optional) with CLI overrides (None values are 'not given') and validate."""
    data: dict[str, Any] = {}
    if toml_path is not None:
        problem = input_file_problem(toml_path)
        if problem is not None:
            raise ConfigError("config", f"--config {toml_path} {problem}")
        try:
            with open(toml_path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError("config", f"--config {toml_path} cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ConfigError("config", f"--config {toml_path} is not valid TOML: it is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"--config {toml_path} is not valid TOML: {exc}") from None
        # Accept either top-level keys or a [coordinator] table; dashes or underscores.
        table = raw.get("coordinator", raw)
        if not isinstance(table, dict):
            raise ConfigError("config", f"--config {toml_path}: 'coordinator' must be a table ([coordinator])")
        data.update({k.replace("-", "_"): v for k, v in table.items()})
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CoordinatorConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "config"
        msg = first["msg"].removeprefix("Value error, ")
        named = re.match(r"^([a-z_]+): (.*)$", msg, re.S)
        if field == "config" and named:  # a check across fields names the field it blames
            field, msg = named.group(1), named.group(2)
        raise ConfigError(field, msg) from None
