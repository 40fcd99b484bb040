"""The coordinator's MQTT adapter: decodes what arrives, feeds the round machine, carries out its actions.

Threads: paho's network thread only decodes the topic and enqueues; one driver thread (the caller of
:meth:`CoordinatorService.run`) owns the machine, the strategy and every publish. Updates are acknowledged
(MQTT manual ack) only after they are spooled to disk, so an update the broker handed over is never lost: it is
either in the spool (replayed on ``--resume``) or still queued for our persistent session at the broker.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmqtt import arrays as A
from fedmqtt.checkpoint import load_state, save_state, write_atomic
from fedmqtt.codecs import decode_frame, encode_frame, model_hash, peek_header
from fedmqtt.codecs import errors as codec_errors
from fedmqtt.coordinator import machine as M
from fedmqtt.coordinator.aggregation import Strategy, build_strategy
from fedmqtt.coordinator.config import CoordinatorConfig
from fedmqtt.errors import FedmqttError
from fedmqtt.mqtt import ClientSettings, MqttConnection, NotConnected, PublishTimeout, parse_broker_url
from fedmqtt.schema import (
    CodecSpec,
    DeviceStatus,
    DPMode,
    DPPlan,
    Event,
    EventType,
    FrameHeader,
    FrameKind,
    MessageError,
    Metrics,
    Phase,
    Plan,
    PrivacyLedger,
    PrivacySpent,
    RefusalReason,
    RoundSummary,
    Status,
    from_json,
    to_json,
)
from fedmqtt.topics import Topics

log = logging.getLogger("fedmqtt.coordinator")

COORDINATOR_ID = "coordinator"
CHECKPOINT_FILE = "coordinator.npz"
SPOOL_DIR = "spool"
_MAX_DETAIL = 2000  # schema.Event.detail's max_length

# Map decode failures to the refusal reasons the events topic reports.
_FRAME_ERROR_REASONS: dict[type[Exception], RefusalReason] = {
    codec_errors.ManifestMismatch: RefusalReason.MANIFEST_MISMATCH,
    codec_errors.NonFiniteValues: RefusalReason.NON_FINITE,
}


def _refusal_reason(exc: Exception) -> RefusalReason:
    for cls, reason in _FRAME_ERROR_REASONS.items():
        if isinstance(exc, cls):
            return reason
    return RefusalReason.MALFORMED


@dataclass
class _Inbound:
    topic: str
    payload: bytes
    qos: int
    mid: int


@dataclass
class _RoundBook:
    """Per-attempt bookkeeping the machine does not need: bytes, the accepted frames' sizes."""

    round: int
    attempt: int
    opened_at: float
    bytes_up: int = 0
    bytes_down: int = 0


class CoordinatorService:
    """Runs one federated job on a broker until it finishes, stops, or fails fatally."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float] = time.time,
        progress: Callable[[Status], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.progress = progress
        self.topics = Topics(job=config.job, prefix=config.prefix)
        self.codec: CodecSpec = config.uplink_codec
        self._inbox: queue.Queue[_Inbound] = queue.Queue()
        self._conn: MqttConnection | None = None

        # Heavy imports (torch) only when a coordinator is actually built.
        from fedmqtt.models import build_model, get_arrays, model_manifest

        self._model = build_model(config.model, seed=config.seed)
        self.global_arrays: A.ModelArrays = get_arrays(self._model)
        self.manifest = model_manifest(config.model)
        self.numel = A.numel(self.global_arrays)
        self.strategy: Strategy = build_strategy(config.strategy, **config.strategy_params)
        # DP rounds draw devices from a secret seed: a selection anyone could recompute from a known seed would
        # undo the amplification by sampling that the accountant counts on (the state is checkpointed anyway).
        self._selection_seed = config.seed if config.dp_mode is DPMode.OFF else secrets.randbits(63)
        self.machine = M.RoundMachine(self._round_config())
        self.accountant = self._build_accountant()
        self.adaptive_clip = self._build_adaptive_clip()
        self._unclipped = 0  # clip bits of this round's accepted updates (adaptive clipping)
        self._eval_set = self._load_eval_set()

        self.model_frame: bytes = b""
        self.model_hash: str = ""
        self.model_round = 0  # the round the current global model opens
        self.metrics: Metrics | None = None
        self.history: list[dict[str, Any]] = []
        self.book: _RoundBook | None = None
        self.plan: Plan | None = None
        self.exit_code: int | None = None
        self.refused_total = 0
        self._last_status_at = 0.0

    # ------------------------------------------------------------------------------------ setup

    def _round_config(self) -> M.RoundConfig:
        c = self.config
        return M.RoundConfig(
            job=c.job,
            rounds=c.rounds,
            min_updates=c.min_updates,
            round_timeout=c.round_timeout,
            min_devices=c.effective_min_devices,
            devices_per_round=c.devices_per_round,
            min_updates_at_deadline=c.min_updates_at_deadline or 1,
            max_attempts=c.max_attempts,
            seed=self._selection_seed,
            sample_rate=c.dp_sample_rate if c.dp_mode is not DPMode.OFF else None,
        )

    def _build_accountant(self) -> Any:
        c = self.config
        if c.dp_mode is DPMode.OFF:
            return None
        from fedmqtt.privacy import JobAccountant, default_delta

        assert c.dp_noise_multiplier is not None and c.dp_sample_rate is not None
        population = c.dp_population or max(c.effective_min_devices, round(c.min_updates / c.dp_sample_rate))
        delta = c.dp_delta or default_delta(population)
        return JobAccountant(
            noise_multiplier=c.dp_noise_multiplier,
            sample_rate=c.dp_sample_rate,
            delta=delta,
            target_epsilon=c.target_epsilon,
        )

    def _build_adaptive_clip(self) -> Any:
        c = self.config
        if c.dp_adaptive_clip is None:
            return None
        from fedmqtt.privacy import AdaptiveClip, recommended_count_noise_std, update_noise_multiplier

        assert c.dp_clip is not None and c.dp_noise_multiplier is not None
        count_noise_std = recommended_count_noise_std(c.min_updates)
        update_noise_multiplier(c.dp_noise_multiplier, count_noise_std)  # refuses a quorum too small for it
        return AdaptiveClip(c.dp_clip, c.dp_adaptive_clip, count_noise_std=count_noise_std)

    def _update_noise_multiplier(self) -> float:
        """sigma for the update sum: the configured one, less what the clip-bit count uses (adaptive clipping),
        so that the round as a whole still runs at the configured sigma (Andrew et al. 2021)."""
        c = self.config
        assert c.dp_noise_multiplier is not None
        if self.adaptive_clip is None:
            return float(c.dp_noise_multiplier)
        from fedmqtt.privacy import update_noise_multiplier

        return update_noise_multiplier(c.dp_noise_multiplier, self.adaptive_clip.count_noise_std)

    def _load_eval_set(self) -> Any:
        if self.config.eval_data is None:
            return None
        from fedmqtt.data import load_dataset, resolve_data_dir

        c = self.config
        directory = resolve_data_dir(c.eval_data, c.dataset, split="test", flag_name="--eval-data")
        return load_dataset(c.dataset, directory, train=False)

    def _settings(self) -> ClientSettings:
        c = self.config
        url = parse_broker_url(c.broker)
        if c.username is not None:
            url = url.with_credentials(c.username, c.password)
        return ClientSettings(
            url=url.to_url(include_password=True),
            client_id=c.client_id or f"fedmqtt-coordinator-{c.job}",
            protocol=c.mqtt_version,
            clean_start=False,
            tls_ca=str(c.tls_ca) if c.tls_ca else None,
            # No max_message_bytes: the connection would drop an oversized update silently (no event, no count);
            # _handle_update refuses it as malformed and reports it. The broker's max packet size bounds memory.
        )

    # ------------------------------------------------------------------------------------ run

    def run(self, *, connect_timeout: float = 30.0) -> int:
        """Connect, run the job, return the process exit code (0 = finished or stopped by a rule)."""
        conn = MqttConnection(
            self._settings(),
            on_message=self._on_message,
            subscriptions=[(self.topics.updates_filter, 1), (self.topics.device_status_filter, 1)],
            manual_ack=True,
        )
        self._conn = conn
        conn.connect(timeout=connect_timeout)
        try:
            self._startup()
            while self.exit_code is None:
                try:
                    item = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    item = None
                if item is not None:
                    self._handle(item)
                self._execute(self.machine.tick(self.clock()))
                self._maybe_publish_status(force=False)
            return self.exit_code
        finally:
            conn.close()
            self._conn = None

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        # Network thread: enqueue only.
        self._inbox.put(_Inbound(topic, payload, qos, mid))

    def _startup(self) -> None:
        now = self.clock()
        if self.config.resume and self._checkpoint_path().exists():
            self._restore()
            self._publish_global_model()
            if self.machine.done:
                self._end_resumed_job()
                return
            if self.plan is not None:
                self._publish(self.topics.plan, to_json(self.plan), retain=True)
            self._replay_spool()
            self._event(EventType.MODEL_PUBLISHED, detail=f"resumed from checkpoint at round {self.machine.round}")
        else:
            if self.config.checkpoint_dir is not None:
                shutil.rmtree(self._spool_root(), ignore_errors=True)
            self.model_round = 1
            self._publish_global_model()
            if self._budget_exhausted():  # not even round 1 fits under --target-epsilon
                self._execute(self.machine.stop(self._budget_reason(), now))
            else:
                self._execute(self.machine.start(now))
        self._publish_privacy()
        self._maybe_publish_status(force=True)

    def _end_resumed_job(self) -> None:
        # The checkpoint is of a job that already ended: no machine event would ever produce JobFinished or
        # JobStopped again, so the run loop would wait forever. Say so and exit as the job did.
        reason = self.machine.end_reason or "the job had ended"
        log.warning("checkpoint %s: the job already ended (%s); nothing to resume", self._checkpoint_path(), reason)
        if self.machine.phase is Phase.FINISHED:
            self._event(EventType.JOB_FINISHED, detail=f"already finished: {reason}")
            self._finish(0)
        else:
            self._event(EventType.JOB_STOPPED, detail=f"already stopped: {reason}")
            self._finish(0 if self._stopped_by_rule(reason) else 3)

    # ------------------------------------------------------------------------------------ inbound

    def _ack(self, item: _Inbound) -> None:
        if self._conn is not None and item.qos > 0:
            self._conn.ack(item.mid, item.qos)

    def _handle(self, item: _Inbound) -> None:
        try:
            device = self.topics.device_of_status(item.topic)
            if device is not None:
                self._handle_device_status(device, item.payload)
                return
            device = self.topics.device_of_update(item.topic)
            if device is not None:
                self._handle_update(device, item.payload)
        finally:
            self._ack(item)

    def _handle_device_status(self, device: str, payload: bytes) -> None:
        if not payload:  # a cleared retained status
            self._execute(self.machine.device_status(device, "offline", self.clock()))
            return
        try:
            status = from_json(DeviceStatus, payload)
        except MessageError as exc:
            log.warning("ignored malformed status of %s: %s", device, exc)
            return
        if status.device != device:
            log.warning("ignored status on %s's topic claiming to be %s", device, status.device)
            return
        self._execute(self.machine.device_status(device, status.state, self.clock()))

    def _refuse(self, device: str, round_number: int | None, reason: RefusalReason, detail: str) -> None:
        actions = self.machine.refuse_update(device, round_number, reason, detail, self.clock())
        # A refusal changes only refused_total in the status: leave that to the periodic (1/s) status publish
        # instead of a retained QoS 1 publish, and a wait for the broker, per refused frame (a flood of junk
        # would otherwise be amplified into as many status writes, at one broker round trip each).
        self._execute([a for a in actions if not isinstance(a, M.StatusChanged)])

    def _handle_update(self, device: str, payload: bytes, *, from_spool: bool = False) -> None:
        now = self.clock()
        if len(payload) > self.config.max_update_mb * 1e6:
            self._refuse(device, None, RefusalReason.MALFORMED, f"frame of {len(payload)} bytes exceeds the limit")
            return
        try:
            header = peek_header(payload)
        except codec_errors.FrameError as exc:
            self._refuse(device, None, RefusalReason.MALFORMED, str(exc))
            return
        screening = self.machine.screen_update(device, header)
        if screening.redelivery:
            log.debug("ignored QoS 1 redelivery from %s", device)
            return
        if screening.refused:
            assert screening.reason is not None
            self._refuse(device, header.round, screening.reason, screening.detail)
            return
        try:
            frame = decode_frame(
                payload,
                max_body_bytes=self._max_body_bytes(),
                expected_manifest=self.manifest,
            )
        except codec_errors.FrameError as exc:
            self._refuse(device, header.round, _refusal_reason(exc), str(exc))
            return
        refusal = self._check_dp_bound(frame.header, frame.arrays)
        if refusal is not None:
            self._refuse(device, header.round, RefusalReason.NORM_EXCEEDS_CLIP, refusal)
            return
        if not from_spool:
            self._spool(header, device, payload)
        weight = 1.0 if self.config.dp_mode is not DPMode.OFF else float(max(header.num_samples, 1))
        self.strategy.add(frame.arrays, weight)
        if frame.header.dp is not None and frame.header.dp.unclipped:
            self._unclipped += 1
        if self.book is not None:
            self.book.bytes_up += len(payload)
        self._execute(self.machine.accept_update(device, header, now))

    def _max_body_bytes(self) -> int:
        # The decoded tensors alone take 4 bytes per entry, whatever the payload's (compressed) size, and the
        # largest body any codec writes takes under 10 (top-k of float32 values or int8 values with per-channel
        # scales, plus varint indices). A bound of 4 x --max-update-mb alone refused every update of a model
        # larger than that, however small its frame.
        return max(int(self.config.max_update_mb * 4e6), 10 * self.numel)

    def _check_dp_bound(self, header: FrameHeader, update: A.ModelArrays) -> str | None:
        if self.config.dp_mode is DPMode.OFF or self.plan is None or self.plan.dp is None:
            return None
        from fedmqtt.privacy import max_accepted_norm

        dp = self.plan.dp
        bound = max_accepted_norm(dp.clip, dp.device_noise_std, self.numel)
        bound += _quantisation_margin(update, self.codec)
        norm = A.l2_norm(update)
        if norm > bound:
            return f"update norm {norm:.4g} exceeds the clip bound {dp.clip:g} (+ noise margin: {bound:.4g})"
        return None

    # ------------------------------------------------------------------------------------ actions

    def _execute(self, actions: list[Any]) -> None:
        for action in actions:
            if self.exit_code is not None:
                return  # the job ended (e.g. stopped by the privacy budget): the rest of the batch is void
            handler = getattr(self, f"_on_{type(action).__name__}", None)
            if handler is None:
                raise FedmqttError(f"coordinator has no handler for machine action {type(action).__name__}")
            handler(action)

    def _on_OpenRound(self, a: Any) -> None:
        if self.accountant is not None and self.config.target_epsilon is not None and self.accountant.would_exceed():
            # e.g. after an empty Poisson draw was charged: never open a round that would pass the target
            self._execute(self.machine.stop(self._budget_reason(), self.clock()))
            return
        self.strategy.begin_round(self.global_arrays)
        self._unclipped = 0
        self.book = _RoundBook(a.round, a.attempt, a.opened_at)
        if self.model_round != a.round:
            self.model_round = a.round
            self._publish_global_model()
        self.book.bytes_down = len(self.model_frame) * len(a.selected)
        self.plan = self._make_plan(a)
        self._publish(self.topics.plan, to_json(self.plan), retain=True)
        self._event(
            EventType.ROUND_OPENED,
            round=a.round,
            attempt=a.attempt,
            detail=f"selected {len(a.selected)}: {', '.join(a.selected[:20])}"
            + (" ..." if len(a.selected) > 20 else ""),
        )
        self._checkpoint()
        self._maybe_publish_status(force=True)

    def _make_plan(self, a: Any) -> Plan:
        c = self.config
        dp: DPPlan | None = None
        if c.dp_mode is not DPMode.OFF:
            from fedmqtt.privacy import device_noise_std

            assert c.dp_clip is not None and c.dp_noise_multiplier is not None and c.dp_sample_rate is not None
            clip = self._current_clip()
            dp = DPPlan(
                mode=c.dp_mode,
                clip=clip,
                noise_multiplier=c.dp_noise_multiplier,
                device_noise_std=device_noise_std(c.dp_mode, c.dp_noise_multiplier, clip, c.min_updates),
                expected_updates=c.min_updates,
                sample_rate=c.dp_sample_rate,
                delta=self.accountant.delta,
            )
        return Plan(
            job=c.job,
            round=a.round,
            attempt=a.attempt,
            selected=tuple(a.selected),
            deadline=a.deadline,
            issued_at=self.clock(),
            local_epochs=c.local_epochs,
            batch_size=c.batch_size,
            learning_rate=c.lr,
            prox_mu=c.prox_mu,
            uplink=self.codec,
            model_name=c.model,
            model_hash=self.model_hash,
            dp=dp,
            trainable=c.trainable,
        )

    def _current_clip(self) -> float:
        if self.adaptive_clip is not None:
            return float(self.adaptive_clip.clip)
        assert self.config.dp_clip is not None
        return float(self.config.dp_clip)

    def _on_UpdateAccepted(self, a: Any) -> None:
        self._event(EventType.UPDATE_ACCEPTED, round=a.round, device=a.device, detail=f"{a.num_samples} samples")
        self._maybe_publish_status(force=True)

    def _on_UpdateRefused(self, a: Any) -> None:
        self.refused_total += 1
        log.info("refused update from %s: %s (%s)", a.device, a.reason, a.detail)
        self._event(EventType.UPDATE_REFUSED, round=a.round, device=a.device, reason=a.reason, detail=a.detail)

    def _on_DeviceOnline(self, a: Any) -> None:
        self._event(EventType.DEVICE_ONLINE, device=a.device)

    def _on_DeviceOffline(self, a: Any) -> None:
        self._event(EventType.DEVICE_OFFLINE, device=a.device)

    def _on_StatusChanged(self, a: Any) -> None:
        self._maybe_publish_status(force=True)

    def _on_RoundFailed(self, a: Any) -> None:
        self._event(EventType.ROUND_FAILED, round=a.round, attempt=a.attempt, detail=a.reason)
        self.strategy.begin_round(self.global_arrays)
        self._unclipped = 0
        self._clear_spool()
        if a.skipped and self.accountant is not None:
            # An empty Poisson draw still counts as a round of the sampled mechanism: charge it at the planned
            # noise (conservative), so the ledger matches the sampling the accountant assumes.
            self.accountant.step()
            self._publish_privacy()

    def _on_JobFinished(self, a: Any) -> None:
        self._event(EventType.JOB_FINISHED, detail=a.reason)
        self._finish(0)

    def _on_JobStopped(self, a: Any) -> None:
        self._event(EventType.JOB_STOPPED, detail=a.reason)
        self._finish(0 if self._stopped_by_rule(a.reason) else 3)

    def _stopped_by_rule(self, reason: str) -> bool:
        return "privacy budget" in reason

    def _finish(self, code: int) -> None:
        self._maybe_publish_status(force=True)
        self._checkpoint()
        self.exit_code = code

    def _on_CloseRound(self, a: Any) -> None:
        self._maybe_publish_status(force=True, phase=Phase.AGGREGATING)
        started = self.clock()
        count = self.strategy.count
        denominator: float | None = None
        noise: A.ModelArrays | None = None
        c = self.config
        if c.dp_mode is not DPMode.OFF:
            # DP average: uniform weights and a fixed denominator m (sensitivity C/m), never sample weighting.
            denominator = float(c.min_updates)
            noise = self._server_noise(count)
        self.global_arrays = self.strategy.aggregate(denominator=denominator, noise=noise)
        epsilon = self._account(count)
        if self.adaptive_clip is not None:
            from fedmqtt.privacy import secure_rng

            self.adaptive_clip.update(self._unclipped, c.min_updates, secure_rng())
        accuracy, loss = self._evaluate()
        self.metrics = Metrics(accuracy=accuracy, loss=loss) if accuracy is not None else self.metrics
        self.model_round = a.round + 1
        self._publish_global_model()
        closed = self.clock()
        book = self.book or _RoundBook(a.round, a.attempt, a.opened_at)
        summary = RoundSummary(
            job=c.job,
            round=a.round,
            attempts=a.attempt + 1,
            closed_by=a.closed_by,
            participants=tuple(a.participants),
            num_samples=a.num_samples,
            refused={RefusalReason(k): v for k, v in a.refused.items()},
            bytes_up=book.bytes_up,
            bytes_down=book.bytes_down,
            opened_at=a.opened_at,
            closed_at=closed,
            seconds=max(0.0, closed - a.opened_at),
            accuracy=accuracy,
            loss=loss,
            epsilon=epsilon,
        )
        self.history.append(summary.model_dump(mode="json"))
        self._publish(self.topics.round_summary(a.round), to_json(summary), retain=True)
        self._event(
            EventType.ROUND_CLOSED,
            round=a.round,
            attempt=a.attempt,
            detail=f"closed by {a.closed_by} with {len(a.participants)} updates"
            + (f"; accuracy {accuracy:.4f}" if accuracy is not None else "")
            + f"; aggregation {closed - started:.2f}s",
        )
        self._event(EventType.MODEL_PUBLISHED, round=a.round + 1, detail=f"model {self.model_hash[:12]}")
        self._publish_privacy()
        if self._budget_exhausted():
            self._execute(self.machine.stop(self._budget_reason(), self.clock()))  # checkpoints in _finish
        if self.exit_code is None:
            self._execute(self.machine.aggregation_done(a.round, self.clock()))
            self._checkpoint()
        # Only once a checkpoint records the round as closed may its spooled updates go: a crash before this
        # point resumes the open round from the previous checkpoint, and replaying the spool closes it again.
        self._clear_spool()

    # ------------------------------------------------------------------------------------ privacy

    def _server_noise(self, received: int) -> A.ModelArrays | None:
        """Noise the coordinator adds to the sum: sigma*C in central mode; in device mode the top-up that
        restores sigma*C when only k < m updates arrived (so a short round keeps its planned privacy)."""
        c = self.config
        from fedmqtt.privacy import add_gaussian_noise, central_noise_std, secure_generator, topup_noise_std

        assert c.dp_noise_multiplier is not None
        clip = self.plan.dp.clip if self.plan is not None and self.plan.dp is not None else self._current_clip()
        central = central_noise_std(c.dp_mode, self._update_noise_multiplier(), clip)
        topup = topup_noise_std(c.dp_mode, c.dp_noise_multiplier, clip, c.min_updates, received)
        std = float(np.hypot(central, topup))
        if std <= 0:
            return None
        return add_gaussian_noise(A.zeros_like(self.global_arrays), std, secure_generator())

    def _account(self, received: int) -> float | None:
        if self.accountant is None or received == 0:
            return None
        from fedmqtt.privacy import effective_noise_multiplier

        c = self.config
        assert c.dp_noise_multiplier is not None
        z = effective_noise_multiplier(
            c.dp_mode, c.dp_noise_multiplier, c.min_updates, received, topped_up=c.dp_mode is DPMode.DEVICE
        )
        self.accountant.step(noise_multiplier=z)
        epsilon = self.accountant.epsilon
        return None if np.isinf(epsilon) else float(epsilon)

    def _budget_exhausted(self) -> bool:
        if self.accountant is None or self.config.target_epsilon is None:
            return False
        if self.machine.round >= self.config.rounds:
            return False
        return bool(self.accountant.would_exceed())

    def _budget_reason(self) -> str:
        return (
            f"privacy budget: one more round would exceed target epsilon {self.config.target_epsilon:g} "
            f"(spent {self.accountant.epsilon:.3f} at delta {self.accountant.delta:.2e})"
        )

    def _publish_privacy(self) -> None:
        if self.accountant is None:
            return
        c = self.config
        ledger: PrivacyLedger = self.accountant.ledger(
            job=c.job, mode=c.dp_mode, clip=self._current_clip(), now=self.clock()
        )
        self._publish(self.topics.privacy, to_json(ledger), retain=True)

    # ------------------------------------------------------------------------------------ publishing

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        assert self._conn is not None
        # While the broker is away the connection reconnects by itself; the job must outlive the outage.
        try:
            self._conn.publish(topic, payload, qos=qos, retain=retain)
        except PublishTimeout as exc:  # QoS 1: still queued, sent again once the connection is back
            log.warning("%s; carrying on", exc)
        except NotConnected as exc:  # QoS 0 (events): dropped, as QoS 0 allows
            log.warning("%s", exc)

    def _event(self, type_: EventType, **fields: Any) -> None:
        detail = fields.get("detail", "")
        if len(detail) > _MAX_DETAIL:
            # Details quote what devices sent (a frame's header errors name its fields); an over-long one would
            # fail the Event's validation and crash the coordinator.
            fields["detail"] = detail[: _MAX_DETAIL - 30] + f" ... ({len(detail)} characters)"
        event = Event(job=self.config.job, type=type_, ts=self.clock(), **fields)
        self._publish(self.topics.events, to_json(event), qos=0)

    def _publish_global_model(self) -> None:
        self.model_frame = encode_frame(
            self.global_arrays,
            kind=FrameKind.GLOBAL_MODEL,
            job=self.config.job,
            round=self.model_round,
            sender=COORDINATOR_ID,
            codec=self.config.downlink_codec,
            model_name=self.config.model,
        )
        self.model_hash = model_hash(self.model_frame)
        self._publish(self.topics.model, self.model_frame, retain=True)

    def status(self, phase: Phase | None = None) -> Status:
        snap = self.machine.snapshot(self.clock())
        privacy = None
        if self.accountant is not None and self.accountant.rounds > 0 and not np.isinf(self.accountant.epsilon):
            privacy = PrivacySpent(epsilon=float(self.accountant.epsilon), delta=self.accountant.delta)
        update: dict[str, Any] = {"last_metrics": self.metrics, "privacy": privacy, "refused_total": self.refused_total}
        if phase is not None:
            update["phase"] = phase
        return snap.model_copy(update=update)

    def _maybe_publish_status(self, *, force: bool, phase: Phase | None = None) -> None:
        now = self.clock()
        if not force and now - self._last_status_at < 1.0:
            return
        self._last_status_at = now
        status = self.status(phase)
        self._publish(self.topics.status, to_json(status), retain=True)
        if self.progress is not None:
            self.progress(status)

    # ------------------------------------------------------------------------------------ evaluation

    def _evaluate(self) -> tuple[float | None, float | None]:
        if self._eval_set is None:
            return None, None
        from fedmqtt.models import set_arrays
        from fedmqtt.training import evaluate

        set_arrays(self._model, self.global_arrays)
        accuracy, loss = evaluate(self._model, self._eval_set)
        return float(accuracy), float(loss)

    # ------------------------------------------------------------------------------------ durability

    def _checkpoint_path(self) -> Path:
        assert self.config.checkpoint_dir is not None
        return self.config.checkpoint_dir / CHECKPOINT_FILE

    def _spool_root(self) -> Path:
        assert self.config.checkpoint_dir is not None
        return self.config.checkpoint_dir / SPOOL_DIR

    def _spool(self, header: FrameHeader, device: str, payload: bytes) -> None:
        if self.config.checkpoint_dir is None:
            return
        write_atomic(self._spool_root() / f"{header.round}-{self.machine.attempt}" / f"{device}.frame", payload)

    def _clear_spool(self) -> None:
        if self.config.checkpoint_dir is not None:
            shutil.rmtree(self._spool_root(), ignore_errors=True)

    def _replay_spool(self) -> None:
        folder = self._spool_root() / f"{self.machine.round}-{self.machine.attempt}"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.frame")):
            log.info("replaying spooled update %s", path.name)
            self._handle_update(path.stem, path.read_bytes(), from_spool=True)

    def _checkpoint(self) -> None:
        if self.config.checkpoint_dir is None:
            return
        state = {
            "job": self.config.job,
            "model": self.config.model,
            "model_round": self.model_round,
            "global": dict(self.global_arrays),
            "strategy": self.strategy.state_dict(),
            "machine": self.machine.state_dict(),
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "adaptive_clip": self.adaptive_clip.state_dict() if self.adaptive_clip is not None else None,
            "history": self.history,
            "metrics": self.metrics.model_dump(mode="json") if self.metrics else None,
            "plan": self.plan.model_dump(mode="json") if self.plan else None,
            "refused_total": self.refused_total,
            "book": vars(self.book) if self.book else None,
        }
        save_state(self._checkpoint_path(), state)

    def _restore(self) -> None:
        state = load_state(self._checkpoint_path())
        if state.get("job") != self.config.job or state.get("model") != self.config.model:
            raise FedmqttError(
                f"checkpoint {self._checkpoint_path()} belongs to job {state.get('job')!r} "
                f"(model {state.get('model')!r}); resume with the same --job and --model or use another "
                "--checkpoint-dir"
            )
        self.global_arrays = {k: np.asarray(v, dtype=np.float32) for k, v in state["global"].items()}
        self.model_round = int(state["model_round"])
        self.strategy.load_state_dict(state["strategy"])
        self.machine = M.RoundMachine.from_state_dict(self._round_config(), state["machine"])
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        if self.adaptive_clip is not None and state.get("adaptive_clip") is not None:
            self.adaptive_clip.load_state_dict(state["adaptive_clip"])
        self.history = list(state.get("history") or [])
        self.metrics = Metrics.model_validate(state["metrics"]) if state.get("metrics") else None
        self.plan = Plan.model_validate(state["plan"]) if state.get("plan") else None
        self.refused_total = int(state.get("refused_total") or 0)
        self.book = _RoundBook(**state["book"]) if state.get("book") else None
        # Accepted updates of the open round are replayed from the spool into a fresh accumulator.
        self.strategy.begin_round(self.global_arrays)


def _quantisation_margin(update: A.ModelArrays, codec: CodecSpec) -> float:
    """An upper bound on how much lossy value encoding can have grown an update's L2 norm."""
    from fedmqtt.schema import ValueEncoding

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
