"""The coordinator's MQTT adapter: decodes what arrives, feeds the round machine, carries out its actions.

Threads: paho's network thread only decodes the topic and enqueues; one driver thread (the caller of
:meth:`CoordinatorService.run`) owns the machine, the strategy and every publish. Updates are acknowledged
(MQTT manual ack) only after they are spooled to disk, so an update the broker handed over is never lost: it is
either in the spool (replayed on ``--resume``) or still queued for our persistent session at the broker.

With ``--aggregators N`` (scale-out aggregation, fedmqtt.aggregator) the coordinator sees no update: it subscribes
to the workers' presence and progress (``aggregators/+/+``) and to their partial aggregates (``partials/+``) instead
of ``updates/+``, and :class:`~fedmqtt.coordinator.scaleout.ScaleOut` handles them (the round gate, the holdings,
the collection of the partials). The holdings are not checkpointed: a coordinator that resumes in the middle of an
attempt abandons it (a new attempt opens), so no update is counted twice.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmqtt import arrays as A
from fedmqtt.codecs import decode_frame, encode_frame, model_hash
from fedmqtt.codecs.downlink import (
    DownlinkTracker,
    arrays_digest,
    encode_model_part,
    full_model_codec,
    sends_deltas,
)
from fedmqtt.coordinator import intake, numeric
from fedmqtt.coordinator import machine as M
from fedmqtt.coordinator.aggregation import Strategy, build_strategy
from fedmqtt.coordinator.config import CoordinatorConfig
from fedmqtt.coordinator.durability import CHECKPOINT_FILE, QUARANTINE_DIR, REPLAY_MARKER, SPOOL_DIR, Durability
from fedmqtt.coordinator.errors import AggregationError, CoordinatorConflict
from fedmqtt.coordinator.evaluation import Evaluation, Evaluator, evaluation_due, model_evaluation, unevaluated
from fedmqtt.coordinator.presence import InstanceTracker, PresenceBatch, live_rival
from fedmqtt.coordinator.scaleout import Host, ScaleOut
from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.mqtt import (
    ClientSettings,
    MqttConnection,
    NotConnected,
    PublishTimeout,
    Will,
)
from fedmqtt.privacy.policy import RoundPrivacy
from fedmqtt.pruning import PruneState, mask_of_zeros
from fedmqtt.schema import (
    END_PHASES,
    CodecSpec,
    CoordinatorPresence,
    DeviceStatus,
    DownlinkPath,
    Event,
    EventType,
    FrameHeader,
    FrameKind,
    MessageError,
    Metrics,
    Phase,
    Plan,
    RefusalReason,
    RoundSummary,
    Status,
    from_json,
    new_token,
    to_json,
)
from fedmqtt.topics import Topics

log = logging.getLogger("fedmqtt.coordinator")

# The process exit code of a job that stopped before its last round, by cause (a finished job exits 0).
EXIT_CODES: dict[M.StopCause, int] = {
    M.StopCause.PRIVACY_BUDGET: 0,  # a rule of the job: it ended as configured
    M.StopCause.TARGET_ACCURACY: 0,  # likewise: --target-accuracy was reached
    M.StopCause.ROUND_FAILURES: 3,
    M.StopCause.EXTERNAL: 3,
    # A pause asked for by a signal: 128 + the signal's number, as a shell reports it (143 for SIGTERM, 130 for
    # SIGINT), after the checkpoint; --resume continues the job. See CoordinatorService.request_stop.
    M.StopCause.SIGNAL: 128 + signal.SIGTERM,
}

__all__ = ["CHECKPOINT_FILE", "COORDINATOR_ID", "QUARANTINE_DIR", "REPLAY_MARKER", "SPOOL_DIR", "CoordinatorService"]

COORDINATOR_ID = "coordinator"
# How long the coordinator listens for the job's retained presence and status before it decides whether
# another coordinator runs the job.
PROBE_SECONDS = 1.5
# How long a last will waits before it shrinks a round, even when our own connection looks fine.
WILL_SETTLE_SECONDS = 2.0
_MAX_DETAIL = 2000  # schema.Event.detail's max_length

# What a device's status alone leads to (batched: see _execute_presence), and the actions whose events must follow
# the presence changes before them.
_PRESENCE_ACTIONS = (M.DeviceOnline, M.DeviceOffline, M.StatusChanged)
_ROUND_ACTIONS = (M.OpenRound, M.CloseRound, M.RoundFailed, M.JobFinished, M.JobStopped)


def _presence_detail(count: int, devices: tuple[str, ...], shown: int = 5) -> str:
    listed = ", ".join(devices[:shown])
    return f"{count} device{'s' if count != 1 else ''}: {listed}" + (" ..." if count > shown else "")


@dataclass
class _Inbound:
    topic: str
    payload: bytes
    qos: int
    mid: int
    received_at: float = 0.0
    retained: bool = False


class _Link:
    """The state of the coordinator's own broker connection, written by paho's network thread."""

    def __init__(self) -> None:
        self.up = True
        self.down_since: float | None = None
        self.up_at: float | None = None  # the last reconnect (None until the first one)


class PoisonFrame(FedmqttError):
    """An update that ended the previous coordinator process: refused and quarantined instead of handled."""


@dataclass
class _Progress:
    """How far the handling of one update got (what an internal error must undo)."""

    round: int | None = None
    folded: bool = False
    accepted: bool = False


@dataclass
class _RoundBook:
    """Per-attempt bookkeeping the machine does not need: bytes, the accepted frames' sizes."""

    round: int
    attempt: int
    opened_at: float
    bytes_up: int = 0
    bytes_down: int = 0  # bytes_down_delta + bytes_down_full
    bytes_down_delta: int = 0
    bytes_down_full: int = 0


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
        try:
            initial = config.initial_arrays()
        except ValueError as exc:  # checked with the config; the file changed since
            raise FedmqttError(str(exc)) from None
        if initial is not None:  # --init-checkpoint: round 1's model (a --resume checkpoint wins: _restore)
            self.global_arrays = {k: np.array(v, dtype=np.float32, copy=True) for k, v in initial.items()}
        self.manifest = model_manifest(config.model)
        # --trainable (expanded by the config): updates carry exactly these tensors, aggregation and the deltas
        # cover only them, and every other tensor stays as round 1 had it, bit for bit.
        self.trained: tuple[str, ...] | None = config.trainable
        self.update_manifest = (
            self.manifest if self.trained is None else tuple(e for e in self.manifest if e.name in self.trained)
        )
        # Delta frames on the downlink with a compressed codec (a --trainable job's deltas carry its tensors only);
        # with a lossless one, a --trainable job publishes model parts: its trainable tensors whole, which complete
        # any model a device holds of this job (the frozen tensors never change), however many rounds it missed.
        self._sends_deltas = sends_deltas(config.downlink_codec)
        self._sends_parts = self.trained is not None and not self._sends_deltas
        self.numel = A.numel(self.global_arrays)
        # --prune-schedule / --keep-pruned: the mask applied to every new global model (after aggregation and
        # server noise: post-processing, epsilon unchanged); --keep-pruned's mask is the init checkpoint's zeros.
        self.pruning: PruneState | None = None
        if config.prune_schedule is not None or config.keep_pruned:
            scope = config.prune_scope
            kept = mask_of_zeros(self.global_arrays, scope) if config.keep_pruned else None
            self.pruning = PruneState(scope, config.prune_plan, kept)
            self.global_arrays = self.pruning.held(self.global_arrays)
        self.strategy: Strategy = build_strategy(config.strategy, **config.strategy_params)
        # DP rounds draw devices from a secret seed: a selection anyone could recompute from a known seed would
        # undo the amplification by sampling that the accountant counts on (the state is checkpointed anyway).
        self._selection_seed = config.seed if config.dp is None else secrets.randbits(63)
        self.machine = M.RoundMachine(self._round_config())
        # DP jobs: plan, norm bound, server noise, accounting, adaptive clip and budget (fedmqtt.privacy.policy).
        self.privacy: RoundPrivacy | None = None
        if config.dp is not None:
            self.privacy = RoundPrivacy.from_settings(
                config.dp, expected_updates=config.min_updates, min_devices=config.effective_min_devices
            )
        self.files = Durability(config.checkpoint_dir)  # checkpoint, spool, quarantine (no-ops without a dir)
        self._unclipped = 0  # clip bits of this round's accepted updates (adaptive clipping)
        self._eval_set = self._load_eval_set()
        if config.target_accuracy is not None and self._eval_set is None:
            raise ConfigError("--target-accuracy", "needs --eval-data: the accuracy is measured on its test split")
        # Pipelined rounds: the model of a closed round is evaluated by a worker thread while the next round runs.
        self._evaluator: Evaluator | None = None
        if self._eval_set is not None:
            self._evaluator = Evaluator(model_evaluation(config.model, self._eval_set))
        self._target_pending: str | None = None  # reached while a round was being aggregated

        self.model_frame: bytes = b""
        self.model_hash: str = ""
        self.model_round = 0  # the round the current global model opens
        # A compressed downlink (--downlink float16, int8, topk...): the model devices hold (x_hat), its digest
        # for the plan, and the retained delta frame that led to it (fedmqtt.codecs.downlink).
        self._downlink: DownlinkTracker | None = None
        self.model_digest: str | None = None
        self.delta_frame: bytes = b""
        self.metrics: Metrics | None = None
        self.history: list[dict[str, Any]] = []
        self.book: _RoundBook | None = None
        self.plan: Plan | None = None
        self.exit_code: int | None = None
        self.stop_signal: int | None = None  # set by request_stop (a signal handler)
        self.connecting = False  # in MqttConnection.connect, which a stop request cannot shorten
        self.refused_total = 0
        self._last_status_at = 0.0
        self.instance = new_token()
        self.started_at = clock()
        self.run_id: str | None = None
        self.taken_over_by: str | None = None
        self._link = _Link()
        self._instances = InstanceTracker()
        self._presence_batch = PresenceBatch()  # presence transitions not yet published (batched events)
        self._tainted: str | None = None  # why the open attempt's accumulator cannot be trusted
        # (round, strategy state before the step) of the last attempt whose aggregate was not finite
        self._failed_state: tuple[int, dict[str, Any]] | None = None
        self._progress = _Progress()
        self._ended_last_process: set[str] = set()  # digests of updates that ended the last process
        self._announced = False  # our presence is published (republished after each reconnect)
        self._retained_status: Status | None = None
        self._retained_presence: CoordinatorPresence | None = None
        self._retained_rounds: set[int] = set()
        # Scale-out aggregation (--aggregators N): the workers, the open attempt's holdings, the collection.
        self.scaleout: ScaleOut | None = self._scale_out() if config.aggregators else None

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
            sample_rate=c.dp.sample_rate if c.dp is not None else None,
            max_samples=c.max_samples,
        )

    def _set_round_budget(self) -> None:
        """Tell the machine how many more rounds fit under --target-epsilon (it stops the job before one that
        would not); the privacy policy decides."""
        budget = self.privacy.budget(self.config.rounds - self.machine.round) if self.privacy is not None else None
        self.machine.set_round_budget(budget.rounds if budget else None, budget.reason if budget else "")

    def _weight(self, header: FrameHeader) -> float:
        return intake.update_weight(header, dp=self.privacy is not None)

    def _scale_out(self) -> ScaleOut:
        host = Host(
            clock=self.clock,
            machine=lambda: self.machine,
            run_id=lambda: self.run_id,
            model_hash=lambda: self.plan.model_hash if self.plan is not None else None,
            ended=lambda: self.exit_code is not None,
            publish=self._publish,
            event=self._event,
            execute=self._execute,
            refuse=self._refuse,
            weight=self._weight,
            count_accepted=self._count_accepted,
            grace_until=self._grace_until,
            link_in_doubt=self._holding_deadline,
            status_changed=lambda: self._maybe_publish_status(force=True),
            aggregate=self._aggregate_round,
        )
        return ScaleOut(
            self.config,
            self.topics,
            host,
            strategy=self.strategy,
            update_manifest=self.update_manifest,
            max_body_bytes=self._max_body_bytes(),
        )

    def _update_gate(self) -> None:
        """With --aggregators, rounds open only while the workers are online (a last will takes effect once its
        grace is over)."""
        if self.scaleout is not None:
            self.scaleout.update_gate()

    def _load_eval_set(self) -> Any:
        if self.config.eval_data is None:
            return None
        from fedmqtt.data import load_dataset, resolve_data_dir

        c = self.config
        directory = resolve_data_dir(c.eval_data, c.dataset, split="test", flag_name="--eval-data")
        return load_dataset(c.dataset, directory, train=False)

    def _settings(self) -> ClientSettings:
        c = self.config  # a BrokerSettings: the broker URL, credentials, CA file and protocol, checked once
        return c.client_settings(
            c.client_id or f"fedmqtt-coordinator-{c.job}",
            clean_start=False,
            will=Will(self.topics.coordinator, to_json(self._presence("offline")), qos=1, retain=True),
            # No max_message_bytes: the connection would drop an oversized update silently (no event, no count);
            # _handle_update refuses it as malformed and reports it. The broker's max packet size bounds memory.
        )

    # ------------------------------------------------------------------------------------ run

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the job to pause (safe to call from a signal handler, which must do no more): the driver thread
        stops the machine (``StopCause.SIGNAL``), publishes ``job_stopped`` (event and status), checkpoints the
        state the job stopped from and returns ``128 + signum``. ``--resume`` then continues the job."""
        self.stop_signal = signum

    def _stop_on_request(self) -> None:
        signum = self.stop_signal
        assert signum is not None
        name = signal.Signals(signum).name
        where = f"; --resume with {self.files.checkpoint_path} continues it" if self.files.enabled else ""
        log.warning("%s: stopping job %s at round %d%s", name, self.config.job, self.machine.round, where)
        reason = f"stopped by {name} at round {self.machine.round}" + ("; --resume continues the job" if where else "")
        self._execute(self.machine.stop(reason, self.clock(), cause=M.StopCause.SIGNAL))

    def _exit_code(self, cause: M.StopCause) -> int:
        if cause is M.StopCause.SIGNAL and self.stop_signal is not None:
            return 128 + self.stop_signal
        return EXIT_CODES[cause]

    def run(self, *, connect_timeout: float = 30.0) -> int:
        """Connect, run the job, return the process exit code (0 = finished or stopped by a rule; 128 + the
        signal's number after :meth:`request_stop`)."""
        if self.stop_signal is not None:  # asked to stop before it started: nothing to publish or checkpoint
            return 128 + self.stop_signal
        self.run_id = self._checkpointed_run_id() or new_token()
        ended = self.files.take_in_hand()
        if ended is not None:
            # The broker delivers that unacknowledged update again: it is refused and quarantined, not handled.
            log.error("the last coordinator process ended while handling update %s; it will be quarantined", ended)
            self._ended_last_process.add(ended)
        # With aggregator workers the updates go to them (a subscription here would get a copy of each one).
        inbound = (
            [(self.topics.aggregators_filter, 1), (self.topics.partials_filter, 1)]
            if self.config.aggregators
            else [(self.topics.updates_filter, 1)]
        )
        conn = MqttConnection(
            self._settings(),
            on_message=self._on_message,
            subscriptions=[
                *inbound,
                (self.topics.device_status_filter, 1),
                (self.topics.coordinator, 1),
                (self.topics.status, 1),
                (self.topics.rounds_filter, 1),
            ],
            manual_ack=True,
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
        )
        self._conn = conn
        self.connecting = True
        try:
            conn.connect(timeout=connect_timeout)
        finally:
            self.connecting = False
        try:
            deferred = self._probe_job()
            self._publish(self.topics.coordinator, to_json(self._presence("online")), retain=True)
            self._announced = True
            self._startup()
            for item in deferred:
                self._handle(item)
            while self.exit_code is None:
                next_item: _Inbound | None
                try:
                    next_item = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    next_item = None
                if next_item is not None:
                    self._handle(next_item)
                if self.exit_code is None:
                    self._collect_evaluations()
                if self.exit_code is None and self.stop_signal is not None:
                    self._stop_on_request()
                if self.exit_code is None:
                    hold = self._holding_deadline() or self._backlog_before_deadline()
                    self._update_gate()
                    self._execute(self.machine.tick(self.clock(), hold_deadline=hold))
                    if self.scaleout is not None:
                        self.scaleout.check_collection()
                    self._flush_presence()
                    self._maybe_publish_status(force=False)
            return self.exit_code
        finally:
            if self._evaluator is not None:
                self._evaluator.close()
            conn.close()
            self._conn = None

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        # Network thread: enqueue only. The arrival time decides whether an update came in time.
        self._inbox.put(_Inbound(topic, payload, qos, mid, self.clock(), retain))

    def _on_connected(self, session_present: bool) -> None:
        # Network thread: record only (the driver republishes presence when it sees the item).
        link = self._link
        if not link.up:
            link.up_at = self.clock()
        link.up = True
        self._inbox.put(_Inbound("", b"connected", 0, 0, self.clock()))

    def _on_disconnected(self, reason: str, taken_over: bool) -> None:
        self._link.up = False
        self._link.down_since = self.clock()
        if taken_over:
            log.warning("another connection took over this coordinator's MQTT session (same client id)")

    # ------------------------------------------------------------------------------------ broker presence

    def _grace_until(self, received_at: float) -> float | None:
        """When a last will received at ``received_at`` may take effect, if the link was in doubt then."""
        grace = self.config.reconnect_grace
        link = self._link
        if grace <= 0:
            return None
        if not link.up:
            return received_at + grace
        if link.up_at is not None and received_at <= link.up_at + grace:
            return link.up_at + grace
        # A broker that shuts down publishes the wills of every client first and only then closes our socket:
        # each will settles briefly, and does not take effect while our own link is in doubt (see tick).
        return received_at + min(WILL_SETTLE_SECONDS, grace)

    def _holding_deadline(self) -> bool:
        link = self._link
        if not link.up:
            return True
        return link.up_at is not None and self.clock() < link.up_at + self.config.reconnect_grace

    def _backlog_before_deadline(self) -> bool:
        """Messages that reached us before the deadline are still queued: they are handled first."""
        deadline = self.machine.deadline
        if deadline is None:
            return False
        with self._inbox.mutex:
            oldest = self._inbox.queue[0] if self._inbox.queue else None
        return oldest is not None and oldest.received_at < deadline

    def _presence(self, state: str, phase: Phase | None = None) -> CoordinatorPresence:
        """The retained presence. Published on lifecycle transitions only (start, reconnect, :meth:`_finish`; the
        will): devices follow it instead of the status heartbeat, so it must never be republished periodically."""
        return CoordinatorPresence(
            job=self.config.job,
            instance=self.instance,
            run_id=self.run_id,
            state=state,  # type: ignore[arg-type]
            started_at=self.started_at,
            ts=self.clock(),
            take_over=self.config.take_over,
            phase=phase,
        )

    def _probe_job(self) -> list[_Inbound]:
        """Read the job's retained presence, status and round summaries; refuse to run beside a live coordinator.

        Returns the other messages that arrived meanwhile (handled once the job has started)."""
        deferred: list[_Inbound] = []
        until = time.monotonic() + PROBE_SECONDS
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if self._observe_job_message(item):
                self._ack(item)
            else:
                deferred.append(item)
        rival = live_rival(self._retained_status, self._retained_presence, self.instance, self.clock())
        if rival is not None and not self.config.take_over:
            raise CoordinatorConflict(
                f"another coordinator is running job {self.config.job!r} on this broker ({rival}); stop it first, "
                "or start this one with --take-over to make it stop"
            )
        if rival is not None:
            log.warning("taking over job %s from %s", self.config.job, rival)
        return deferred

    def _observe_job_message(self, item: _Inbound) -> bool:
        """Presence, status and round summaries of this job (ours or another coordinator's). True if handled."""
        if item.topic == self.topics.coordinator:
            try:
                presence = from_json(CoordinatorPresence, item.payload) if item.payload else None
            except MessageError as exc:
                log.warning("ignored a malformed coordinator presence: %s", exc)
                return True
            if presence is not None and presence.instance != self.instance:
                self._retained_presence = presence
                if self.exit_code is None and self._superseded_by(presence):
                    self._stop_taken_over(presence)
            return True
        if item.topic == self.topics.status:
            try:
                status = from_json(Status, item.payload) if item.payload else None
            except MessageError:
                return True
            if status is not None and status.instance != self.instance:
                self._retained_status = status
                if self._announced and self.exit_code is None:
                    self._check_duel(status)
            return True
        round_number = self.topics.round_of_summary(item.topic)
        if round_number is not None:
            if item.retained and item.payload:
                self._retained_rounds.add(round_number)
            return True
        if item.topic == "" and item.payload == b"connected":
            if self.exit_code is None and self.taken_over_by is None and self._announced:
                self._publish(self.topics.coordinator, to_json(self._presence("online")), retain=True)
            return True
        return False

    def _check_duel(self, status: Status) -> None:
        """Another coordinator publishes this job's status while we run (both started while one could not see
        the other, e.g. across a broker restart): the one that started later yields, unless it was told to take
        over. Rounds never go backwards for the one that stays."""
        presence = self._retained_presence
        rival = live_rival(status, presence, self.instance, self.clock())
        if rival is None or self.config.take_over:
            return
        if presence is None or presence.instance != status.instance or presence.started_at >= self.started_at:
            return  # it started after us (it yields), or we cannot tell yet
        self._event(
            EventType.COORDINATOR_CONFLICT, detail=f"another coordinator runs this job ({rival}); this one stops"
        )
        log.error("another coordinator runs job %s (%s); this one, started later, stops", self.config.job, rival)
        self.taken_over_by = status.instance
        self.exit_code = 1

    def _superseded_by(self, presence: CoordinatorPresence) -> bool:
        return presence.take_over and presence.started_at > self.started_at

    def _stop_taken_over(self, presence: CoordinatorPresence) -> None:
        # Another coordinator took the job over: stop at once, publish nothing more and do not checkpoint (it
        # may resume from the same checkpoint directory; writing ours now would move it backwards).
        self.taken_over_by = presence.instance
        log.warning(
            "coordinator instance %s (started %s) took over job %s; this one stops",
            presence.instance,
            time.strftime("%H:%M:%S", time.localtime(presence.started_at)),
            self.config.job,
        )
        self.exit_code = 0

    def _checkpointed_run_id(self) -> str | None:
        if not self.config.resume or not self.files.has_checkpoint():
            return None
        run_id = self.files.load().get("run_id")
        return str(run_id) if run_id else None

    def _clear_previous_run(self) -> None:
        """A new run: clear the retained messages of any earlier run of this job before the first plan, so
        devices and watchers never mistake them for this run's."""
        rounds = set(self._retained_rounds)
        old = self._retained_status
        if old is not None:
            rounds.update(range(1, max(old.round, old.rounds_total) + 1))
        for n in sorted(rounds):
            self._publish(self.topics.round_summary(n), b"", retain=True)
        if old is None and not rounds:
            return  # no earlier run on this broker
        for topic in (self.topics.plan, self.topics.privacy, self.topics.collect):
            self._publish(topic, b"", retain=True)
        if old is not None or rounds:
            log.info("cleared %d retained round summaries of an earlier run of job %s", len(rounds), self.config.job)

    def _startup(self) -> None:
        now = self.clock()
        if self.config.resume and self.files.has_checkpoint():
            self._restore()
            self._update_gate()
            old = self._retained_status
            if old is not None and old.run_id == self.run_id and old.round > self.machine.round:
                raise CoordinatorConflict(
                    f"checkpoint {self.files.checkpoint_path} is at round {self.machine.round}, but run {self.run_id} of "
                    f"job {self.config.job!r} already reached round {old.round} on the broker; resuming would move "
                    "the job backwards: resume from the newer checkpoint"
                )
            self._publish_global_model(advance=False)  # the very model (and delta) the checkpointed plan names
            self._resume_evaluations()
            if self.machine.done:
                self._end_resumed_job()
                return
            if self.plan is not None:
                self._publish(self.topics.plan, to_json(self.plan), retain=True)
            if self.scaleout is not None and self.machine.stage in (M.Stage.TRAINING, M.Stage.AGGREGATING):
                self.scaleout.abandon_resumed_attempt()
            elif self.machine.accepted:
                # A checkpoint written in the middle of a round (a pause by signal) counts accepted updates the
                # fresh accumulator lacks: fold them from the spool (replaying them is then a redelivery).
                self._refold_from_spool("resuming a round paused with accepted updates")
            self._replay_spool()
            self._event(EventType.MODEL_PUBLISHED, detail=f"resumed from checkpoint at round {self.machine.round}")
        else:
            self.files.clear_spool()
            self._clear_previous_run()
            self._event(EventType.RUN_STARTED, detail=f"run {self.run_id} of job {self.config.job}")
            self.model_round = 1
            self._publish_global_model()
            self._update_gate()  # with --aggregators, round 1 waits for the workers
            self._set_round_budget()  # the machine stops at once if not even round 1 fits
            self._execute(self.machine.start(now))
        self._publish_privacy()
        self._maybe_publish_status(force=True)

    def _end_resumed_job(self) -> None:
        # The checkpoint is of a job that already ended: no machine event would ever produce JobFinished or
        # JobStopped again, so the run loop would wait forever. Say so and exit as the job did.
        reason = self.machine.end_reason or "the job had ended"
        log.warning("checkpoint %s: the job already ended (%s); nothing to resume", self.files.checkpoint_path, reason)
        if self.machine.phase is Phase.FINISHED:
            self._finish(0, EventType.JOB_FINISHED, f"already finished: {reason}")
        else:
            cause = self.machine.end_cause or M.StopCause.EXTERNAL
            self._finish(EXIT_CODES[cause], EventType.JOB_STOPPED, f"already stopped: {reason}")

    # ------------------------------------------------------------------------------------ inbound

    def _ack(self, item: _Inbound) -> None:
        if self._conn is not None and item.qos > 0:
            self._conn.ack(item.mid, item.qos)

    def _handle(self, item: _Inbound) -> None:
        try:
            if self._observe_job_message(item):
                return
            device = self.topics.device_of_status(item.topic)
            if device is not None:
                self._handle_device_status(device, item)
                return
            if self.scaleout is not None and self.scaleout.handle(item.topic, item.payload, item.received_at):
                return
            device = self.topics.device_of_update(item.topic)
            if device is not None:
                self._progress = _Progress()
                digest = hashlib.blake2b(item.payload, digest_size=16).hexdigest()
                if digest in self._ended_last_process:
                    self._ended_last_process.discard(digest)
                    raise PoisonFrame("the coordinator ended while handling this very update last time")
                self.files.hold(digest)
                self._handle_update(device, item.payload, received_at=item.received_at)
        except Exception as exc:  # no poison pills: one message never ends the coordinator
            self._internal_error(item, exc)
        finally:
            self.files.release()  # handled (or refused): only a process that dies leaves the marker behind
            self._ack(item)

    def _handle_device_status(self, device: str, item: _Inbound) -> None:
        now = self.clock()
        grace = self._grace_until(item.received_at)
        if not item.payload:  # a cleared retained status
            self._execute_presence(self.machine.device_status(device, "offline", now, grace_until=grace))
            return
        try:
            status = from_json(DeviceStatus, item.payload)
        except MessageError as exc:  # refused, counted and reported in the next presence batch
            self._presence_batch.refuse(device, f"unreadable status on {device}'s topic: {exc}")
            return
        if status.device != device:
            self._presence_batch.refuse(device, f"a status on {device}'s topic claims to be {status.device}")
            return
        if self._instances.observe(device, status.instance, now):
            instances = ", ".join(self._instances.instances(device))
            log.error("two processes use device id %s (instances %s): give each device its own id", device, instances)
            self._event(
                EventType.DEVICE_DUPLICATE,
                device=device,
                detail=f"device id {device} is used by more than one process (instances {instances}); they keep "
                "taking each other's broker session: give each device a unique id",
            )
        if status.detail and status.detail.startswith("declined"):
            self._event(EventType.DEVICE_DECLINED, device=device, round=status.round, detail=status.detail)
        self._execute_presence(self.machine.device_status(device, status.state, now, grace_until=grace))

    def _execute_presence(self, actions: list[M.Action]) -> None:
        """Carry out what a device's status led to. A change of presence alone publishes nothing now: the status
        heartbeat (once a second) carries ``devices_online``, :meth:`_flush_presence` the batched events. What
        else it led to (a round opens, or closes without the device) is carried out at once."""
        if all(isinstance(a, _PRESENCE_ACTIONS) for a in actions):
            actions = [a for a in actions if not isinstance(a, M.StatusChanged)]
        self._execute(actions)

    def _flush_presence(self, *, at_once: bool = False) -> None:
        """Publish the presence changes batched since the last call that published them: at most one
        ``devices_online``, one ``devices_offline`` and one ``device_statuses_refused`` event per
        PRESENCE_BATCH_SECONDS (``at_once``: now, so that a round's events follow the arrivals that opened it)."""
        batch = self._presence_batch
        now = self.clock()
        if self.exit_code is not None or not batch.pending or not (at_once or batch.due(now)):
            return
        report = batch.take(now)
        for type_, count, devices in (
            (EventType.DEVICES_ONLINE, report.online_count, report.online),
            (EventType.DEVICES_OFFLINE, report.offline_count, report.offline),
        ):
            if count:
                self._event(type_, count=count, devices=devices, detail=_presence_detail(count, devices))
        if report.refused_count:
            log.warning("refused %d device status(es); the first: %s", report.refused_count, report.refused_first)
            self._event(
                EventType.DEVICE_STATUSES_REFUSED,
                count=report.refused_count,
                devices=report.refused,
                detail=f"{report.refused_count} refused; the first: {report.refused_first}",
            )
        if report.transitions > report.online_count + report.offline_count:
            log.info(
                "presence: %d status changes; net %d came online, %d went offline (the others came and went)",
                report.transitions, report.online_count, report.offline_count,
            )  # fmt: skip

    def _internal_error(self, item: _Inbound, exc: Exception) -> None:
        summary = f"{type(exc).__name__}: {exc}"
        log.error(
            "internal error while handling a message on %s: %s",
            item.topic,
            summary,
            exc_info=None if isinstance(exc, PoisonFrame) else exc,  # a known refusal: no traceback to read
        )
        device = self.topics.device_of_update(item.topic)
        if device is None:
            return  # a status or presence message: dropped (logged); nothing was counted from it
        progress = self._progress
        if progress.accepted:
            return  # the round machine counted it and the strategy holds it: it stays accepted
        where = self._quarantine(device, item.payload, summary)
        if progress.folded:
            self._refold_from_spool(f"an internal error interrupted folding {device}'s update ({summary})")
        try:
            self._refuse(
                device,
                progress.round,
                RefusalReason.INTERNAL_ERROR,
                f"{summary}" + (f"; frame quarantined in {where}" if where else ""),
            )
        except Exception:
            log.exception("could not report the internal error for %s", device)

    def _quarantine(self, device: str, payload: bytes, reason: str) -> Path | None:
        """Move (or write) a frame that broke the coordinator to the quarantine directory; never replayed."""
        m = self.machine
        return self.files.quarantine(device, payload, reason, round=m.round, attempt=m.attempt, now=self.clock())

    def _trained_part(self, arrays: A.ModelArrays) -> A.ModelArrays:
        """The tensors updates carry and aggregation covers: the --trainable ones (all without it)."""
        return arrays if self.trained is None else {k: arrays[k] for k in self.trained}

    def _refold_from_spool(self, why: str) -> None:
        """Rebuild the open attempt's accumulator from the spooled frames of its accepted updates."""
        self.strategy.begin_round(self._trained_part(self.global_arrays))
        self._unclipped = 0
        if not self.files.enabled:
            self._tainted = why + "; without --checkpoint-dir the accepted updates cannot be folded again"
            return
        try:
            for device in self.machine.accepted:
                frame = decode_frame(
                    self.files.spooled(self.machine.round, self.machine.attempt, device),
                    max_body_bytes=self._max_body_bytes(),
                    expected_manifest=self.update_manifest,
                )
                self.strategy.add(frame.arrays, self._weight(frame.header))
                if frame.header.dp is not None and frame.header.dp.unclipped:
                    self._unclipped += 1
        except Exception as exc:
            self._tainted = f"{why}; folding the spooled updates again failed too ({type(exc).__name__}: {exc})"

    def _refuse(self, device: str, round_number: int | None, reason: RefusalReason, detail: str) -> None:
        actions = self.machine.refuse_update(device, round_number, reason, detail, self.clock())
        # A refusal changes only refused_total in the status: leave that to the periodic (1/s) status publish
        # instead of a retained QoS 1 publish, and a wait for the broker, per refused frame (a flood of junk
        # would otherwise be amplified into as many status writes, at one broker round trip each).
        self._execute([a for a in actions if not isinstance(a, M.StatusChanged)])

    def _handle_update(
        self, device: str, payload: bytes, *, from_spool: bool = False, received_at: float | None = None
    ) -> None:
        now = self.clock()
        progress = self._progress
        rules = self._intake_rules()
        header = intake.check_header(payload, rules)
        if isinstance(header, intake.Refusal):
            self._refuse(device, None, header.reason, header.detail)
            return
        progress.round = header.round
        screening = self.machine.screen_update(
            device, header, model_hash=self.plan.model_hash if self.plan is not None else None
        )
        if screening.redelivery:
            log.debug("ignored QoS 1 redelivery from %s", device)
            return
        if screening.refused:
            assert screening.reason is not None
            self._refuse(device, header.round, screening.reason, screening.detail)
            return
        dp = self.plan.dp if self.plan is not None else None
        frame = intake.check_frame(payload, header, rules, dp=dp, values_check=self._overflow_check(header))
        if isinstance(frame, intake.Refusal):
            self._refuse(device, header.round, frame.reason, frame.detail)
            return
        if not from_spool:
            self.files.spool(header.round, self.machine.attempt, device, payload)
        progress.folded = True
        self.strategy.add(frame.arrays, self._weight(header))
        self._count_accepted(len(payload), frame.header)
        progress.accepted = True
        self._execute(self.machine.accept_update(device, header, received_at if received_at is not None else now))

    def _intake_rules(self) -> intake.IntakeRules:
        """What an update frame is checked against (fedmqtt.coordinator.intake, shared with the aggregators)."""
        return intake.IntakeRules(
            max_update_bytes=self.config.max_update_bytes,
            update_manifest=self.update_manifest,
            model_numel=self.numel,
            codec=self.codec,
            trained=self.trained,
            max_update_norm=self.config.max_update_norm,
        )

    def _overflow_check(self, header: FrameHeader) -> Callable[[A.ModelArrays], intake.Refusal | None] | None:
        """After an attempt of this round failed to aggregate: the check that refuses an update that alone would
        make the model non-finite (None otherwise)."""
        if self._failed_state is None or self._failed_state[0] != header.round:
            return None
        weight = self._weight(header)

        def check(arrays: A.ModelArrays) -> intake.Refusal | None:
            verdict = self._overflows_alone(arrays, weight)
            return intake.Refusal(*verdict) if verdict is not None else None

        return check

    def _max_body_bytes(self) -> int:
        return intake.body_limit(self.config.max_update_bytes, self.numel)

    # ------------------------------------------------------------------------------------ actions

    def _execute(self, actions: list[M.Action]) -> None:
        for action in actions:
            if self.exit_code is not None:
                return  # the job ended (e.g. stopped by the privacy budget): the rest of the batch is void
            if isinstance(action, _ROUND_ACTIONS):
                self._flush_presence(at_once=True)  # the arrivals that opened (or ended) a round come first
            match action:
                case M.OpenRound():
                    self._open_round(action)
                case M.UpdateAccepted():
                    self._event(
                        EventType.UPDATE_ACCEPTED,
                        round=action.round,
                        device=action.device,
                        detail=f"{action.num_samples} samples",
                    )
                    self._maybe_publish_status(force=True)
                case M.UpdateRefused():
                    self.refused_total += 1
                    log.info("refused update from %s: %s (%s)", action.device, action.reason, action.detail)
                    self._event(
                        EventType.UPDATE_REFUSED,
                        round=action.round,
                        device=action.device,
                        reason=action.reason,
                        detail=action.detail,
                    )
                case M.CloseRound():
                    self._close_round(action)
                case M.RoundFailed():
                    self._round_failed(action)
                case M.JobFinished():
                    self._finish(0, EventType.JOB_FINISHED, action.reason)
                case M.JobStopped():
                    self._finish(
                        self._exit_code(action.cause),
                        EventType.JOB_STOPPED,
                        action.reason,
                        evaluations=not action.cause.resumable,
                    )
                case M.DeviceOnline():
                    self._presence_batch.add(action.device, online=True)
                case M.DeviceOffline():
                    self._presence_batch.add(action.device, online=False)
                case M.StatusChanged():
                    self._maybe_publish_status(force=True)
                case _:
                    raise FedmqttError(f"coordinator has no handler for machine action {type(action).__name__}")

    def _open_round(self, a: M.OpenRound) -> None:
        self.strategy.begin_round(self._trained_part(self.global_arrays))
        self._unclipped = 0
        self._tainted = None
        self.book = _RoundBook(a.round, a.attempt, a.opened_at)
        if self.scaleout is not None:
            self.scaleout.open_attempt(a)
        if self.model_round != a.round:
            self.model_round = a.round
            self._publish_global_model()
        # Bytes down are counted per path as the selected devices' updates arrive (_count_down).
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

    def _make_plan(self, a: M.OpenRound) -> Plan:
        c = self.config
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
            model_digest=self.model_digest,
            dp=self.privacy.plan() if self.privacy is not None else None,
            trainable=c.trainable,
            run_id=self.run_id,
            max_samples=c.max_samples,
        )

    def _round_failed(self, a: M.RoundFailed) -> None:
        self._event(EventType.ROUND_FAILED, round=a.round, attempt=a.attempt, detail=a.reason)
        if self.scaleout is not None:
            self.scaleout.end_collection()
        self.strategy.begin_round(self._trained_part(self.global_arrays))
        self._unclipped = 0
        self._tainted = None
        self.files.clear_spool()
        if a.skipped and self.privacy is not None:
            # An empty Poisson draw is a round of the sampled mechanism (the machine took it off the budget).
            self.privacy.record_empty_draw()
            self._publish_privacy()

    def _finish(self, code: int, event: EventType, reason: str, *, evaluations: bool = True) -> None:
        # The job ends once every evaluation is attached, so the last summary carries its accuracy and the end
        # event follows the last round_evaluated. A pause (signal) does not wait: --resume evaluates the
        # checkpoint's model again.
        self._collect_evaluations(wait=evaluations)
        self._event(event, detail=reason)
        if code == 0:  # finished, or stopped by a rule of the job (target accuracy, privacy budget)
            self._release()
        self._maybe_publish_status(force=True)
        # The devices' news that the run is over (--exit-on-finish): the machine's end phase, finished or stopped.
        end = self.machine.phase
        ended = to_json(self._presence("stopped", end if end in END_PHASES else None))
        self._publish(self.topics.coordinator, ended, retain=True)
        self._checkpoint()
        self.exit_code = code

    def _release(self) -> None:
        """Publish the final global model on the retained release topic (fedmqtt.release), with the accuracy the
        evaluation of that very model reached. A job that closed no round releases nothing."""
        from fedmqtt.release import encode_release

        if not self.history:
            return
        last = self.history[-1]
        evaluated = last.get("evaluated_model") == self.model_hash
        frame = encode_release(
            self.global_arrays,
            model=self.config.model,
            job=self.config.job,
            round=int(last["round"]),
            sender=COORDINATOR_ID,
            released_at=self.clock(),
            run_id=self.run_id,
            accuracy=last.get("accuracy") if evaluated else None,
            loss=last.get("loss") if evaluated else None,
            evaluated_model=self.model_hash if evaluated else None,
        )
        self._publish(self.topics.release, frame, retain=True)
        log.info("released the model of round %d on %s (%d bytes)", last["round"], self.topics.release, len(frame))

    def _close_round(self, a: M.CloseRound) -> None:
        self._maybe_publish_status(force=True, phase=Phase.AGGREGATING)
        if self.scaleout is not None:
            self.scaleout.collect(a)  # it has _aggregate_round aggregate once every partial is in
            return
        self._aggregate_round(a)

    def _aggregate_round(self, a: M.CloseRound) -> None:
        """Aggregate the closed round (every update, or every partial, folded), publish the model and summary."""
        started = self.clock()
        count = self.strategy.count
        denominator: float | None = None
        noise: A.ModelArrays | None = None
        c = self.config
        if self.privacy is not None:
            # DP average: uniform weights, the fixed denominator m (sensitivity C/m) and the policy's server noise
            # for the clip the round was planned with.
            denominator = self.privacy.denominator
            clip = self.plan.dp.clip if self.plan is not None and self.plan.dp is not None else None
            noise = self.privacy.server_noise(count, self._trained_part(self.global_arrays), clip=clip)
        aggregate = self._aggregate_checked(a, denominator, noise)
        if aggregate is None:
            return  # the attempt failed (reported); the machine retries the round or stops the job
        self.global_arrays = {**self.global_arrays, **aggregate}  # frozen tensors: the very same arrays
        if self.pruning is not None:  # the schedule's step (if any), then the mask: pruned weights are zero
            self.global_arrays = self.pruning.after_round(self.global_arrays, a.round)
        epsilon = self.privacy.record_round(count, self._unclipped) if self.privacy is not None else None
        # Pipelined rounds: this model is evaluated by the worker while the next round trains; its accuracy is
        # attached to this summary (published again) when it arrives (_attach_evaluation).
        accuracy: float | None = None
        loss: float | None = None
        self.model_round = a.round + 1
        self._publish_global_model()
        closed = self.clock()
        # Summaries stay in round order: the previous round's evaluation, if still running, is attached first.
        self._collect_evaluations(wait=True)
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
            bytes_down_delta=book.bytes_down_delta,
            bytes_down_full=book.bytes_down_full,
            opened_at=a.opened_at,
            closed_at=closed,
            seconds=max(0.0, closed - a.opened_at),
            accuracy=accuracy,
            loss=loss,
            epsilon=epsilon,
            run_id=self.run_id,
            sparsity=None if self.pruning is None else self.pruning.sparsity,
        )
        self.history.append(summary.model_dump(mode="json"))
        self._publish(self.topics.round_summary(a.round), to_json(summary), retain=True)
        self._event(
            EventType.ROUND_CLOSED,
            round=a.round,
            attempt=a.attempt,
            detail=f"closed by {a.closed_by} with {len(a.participants)} updates"
            + f"; aggregation {closed - started:.2f}s"
            + ("" if self.pruning is None else f"; {self.pruning.pruned:,} weights pruned ({summary.sparsity:.1%})"),
        )
        self._event(EventType.MODEL_PUBLISHED, round=a.round + 1, detail=f"model {self.model_hash[:12]}")
        if self._evaluator is not None and self._evaluation_due(a.round):
            self._evaluator.submit(a.round, self.model_hash, self.global_arrays)
        self._publish_privacy()
        self._set_round_budget()  # out of budget: the machine stops the job instead of opening the next round
        if self.exit_code is None:
            # An earlier round's model that reached --target-accuracy while this round was aggregated stops the job.
            reached, self._target_pending = self._target_pending, None
            self._execute(self.machine.aggregation_done(a.round, self.clock(), target_reached=reached))
            self._checkpoint()
        # Only once a checkpoint records the round as closed may its spooled updates go: a crash before this
        # point resumes the open round from the previous checkpoint, and replaying the spool closes it again.
        self.files.clear_spool()

    def _target_reached(self, accuracy: float | None, round_number: int) -> str | None:
        """The stop reason when the model of round ``round_number`` reached --target-accuracy (None: go on)."""
        target = self.config.target_accuracy
        if target is None or accuracy is None or accuracy < target:
            return None
        return f"target accuracy {target:g} reached: {accuracy:.4f} after round {round_number}"

    def _aggregate_checked(
        self, a: Any, denominator: float | None, noise: A.ModelArrays | None
    ) -> A.ModelArrays | None:
        """The new global model, or None after failing the attempt: an accumulator an internal error tainted,
        a strategy that cannot aggregate what arrived, or a non-finite result never reach evaluation or the wire."""
        problem = self._tainted
        saved = self.strategy.state_dict() if problem is None else None
        result: A.ModelArrays | None = None
        if problem is None:
            try:
                result = self.strategy.aggregate(denominator=denominator, noise=noise)
                problem = numeric.check_aggregate(result)
            except (AggregationError, ArithmeticError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return result
        if saved is not None:
            self.strategy.load_state_dict(saved)  # server-optimizer moments must not keep a failed step
            # Until the round closes, every new update of it must aggregate to a finite model on its own: an
            # update that alone overflows (the one that made this attempt fail) is refused in the retries.
            self._failed_state = (a.round, saved)
        log.error("round %d attempt %d cannot be aggregated: %s", a.round, a.attempt, problem)
        self._execute(self.machine.aggregation_failed(a.round, problem, self.clock()))
        return None

    def _overflows_alone(self, arrays: A.ModelArrays, weight: float) -> tuple[RefusalReason, str] | None:
        """After an attempt of this round failed to aggregate: would this update alone make the model
        non-finite? (Tried on a copy of the strategy as it was before the failed step.)"""
        assert self._failed_state is not None
        probe = build_strategy(self.config.strategy, **self.config.strategy_params)
        try:
            probe.load_state_dict(self._failed_state[1])
            probe.begin_round(self._trained_part(self.global_arrays))
            probe.add(arrays, weight)
            problem = numeric.check_aggregate(probe.aggregate(denominator=None, noise=None))
        except (AggregationError, ArithmeticError, ValueError):
            return None  # the strategy cannot aggregate one update alone (Krum): no verdict
        if problem is None:
            return None
        return RefusalReason.NORM_TOO_LARGE, f"applied alone, this update makes the model non-finite ({problem})"

    # ------------------------------------------------------------------------------------ privacy

    def _publish_privacy(self) -> None:
        if self.privacy is not None:
            ledger = self.privacy.ledger(self.config.job, self.clock(), self.run_id)
            self._publish(self.topics.privacy, to_json(ledger), retain=True)

    # ------------------------------------------------------------------------------------ publishing

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        assert self._conn is not None
        # While the broker is away the connection reconnects by itself; the job must outlive the outage. The
        # driver never waits for an acknowledgement: paho queues QoS 1 messages and resends them after a reconnect.
        try:
            self._conn.publish(topic, payload, qos=qos, retain=retain, wait=False)
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
        event = Event(job=self.config.job, type=type_, ts=self.clock(), run_id=self.run_id, **fields)
        self._publish(self.topics.events, to_json(event), qos=0)

    def _publish_global_model(self, *, advance: bool = True) -> None:
        """Publish the model of ``model_round`` (retained). With a compressed downlink, first the delta frame
        that moves the devices' model (x_hat) towards the global model, then x_hat whole and lossless for devices
        that lack the base. ``advance=False`` (a resume) republishes the checkpointed x_hat and delta as they were."""
        codec = self.config.downlink_codec
        held: A.ModelArrays = self.global_arrays
        first_frame: bytes | None = None
        if self._sends_deltas:
            tracker = self._downlink
            if tracker is None:
                # The first model goes out whole, in the codec's values (x_hat is what its frame decodes to); no
                # delta leads to it (a stale one of an earlier run is cleared).
                tracker, first_frame = DownlinkTracker.start(
                    codec, self.global_arrays, self.trained, **self._model_frame_fields()
                )
                self._downlink = tracker
                self.delta_frame = b""
                self._publish(self.topics.delta, b"", retain=True)
            elif not advance and not self.delta_frame:
                # Resumed at the run's first model: the very frame it went out in, or the devices that hold it would
                # find the next delta on another base.
                first_frame = tracker.first_frame_again(self.global_arrays, **self._model_frame_fields())
            elif advance:
                self.delta_frame = tracker.delta_frame(
                    self.global_arrays, base_model_hash=self.model_hash, **self._model_frame_fields()
                )
            held = tracker.held
        elif self._sends_parts:
            assert self.trained is not None
            self.delta_frame = encode_model_part(held, self.trained, codec=codec, **self._model_frame_fields())
        self.model_frame = first_frame or encode_frame(
            held, kind=FrameKind.GLOBAL_MODEL, codec=full_model_codec(codec), **self._model_frame_fields()
        )
        self.model_hash = model_hash(self.model_frame)
        self.model_digest = arrays_digest(held) if self._downlink is not None or self._sends_parts else None
        self._publish(self.topics.model, self.model_frame, retain=True)
        if self.delta_frame:
            self._publish(self.topics.delta, self.delta_frame, retain=True)

    def _model_frame_fields(self) -> dict[str, Any]:
        """The header fields of the model (and delta) frames of ``model_round``."""
        return {
            "job": self.config.job,
            "round": self.model_round,
            "sender": COORDINATOR_ID,
            "model_name": self.config.model,
            "run_id": self.run_id,
        }

    def _count_accepted(self, size: int, header: FrameHeader) -> None:
        """An accepted update (here, or held by an aggregator): its DP clip bit, its bytes up and down."""
        if header.dp is not None and header.dp.unclipped:
            self._unclipped += 1
        if self.book is not None:
            self.book.bytes_up += size
            self._count_down(header.downlink)

    def _count_down(self, path: DownlinkPath | None) -> None:
        """Bytes down of one accepted update, by the path its device says it took (none said: the full model)."""
        if self.book is None or path is DownlinkPath.HELD:
            return
        if path in (DownlinkPath.DELTA, DownlinkPath.DELTA_THEN_FULL):
            self.book.bytes_down_delta += len(self.delta_frame)
        if path is not DownlinkPath.DELTA:
            self.book.bytes_down_full += len(self.model_frame)
        self.book.bytes_down = self.book.bytes_down_delta + self.book.bytes_down_full

    def status(self, phase: Phase | None = None) -> Status:
        snap = self.machine.snapshot(self.clock())
        privacy = self.privacy.spent() if self.privacy is not None else None
        update: dict[str, Any] = {
            "last_metrics": self.metrics,
            "privacy": privacy,
            "refused_total": self.refused_total,
            "run_id": self.run_id,
            "instance": self.instance,
        }
        if self.scaleout is not None:
            update.update(self.scaleout.status_fields())
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

    def _collect_evaluations(self, *, wait: bool = False) -> None:
        """Attach the evaluations that are ready (``wait``: every one submitted) to their rounds' records."""
        evaluator = self._evaluator
        if evaluator is None or not evaluator.pending:
            return
        for result in evaluator.wait() if wait else evaluator.poll():
            self._attach_evaluation(result)

    def _attach_evaluation(self, result: Evaluation) -> None:
        """Publish round ``result.round``'s summary again with its accuracy (every other field kept), update the
        history and the status's last metrics, say ``round_evaluated``, judge --target-accuracy, checkpoint."""
        if result.error is not None:
            log.error("round %d: %s", result.round, result.detail)
        index = next(
            (i for i in range(len(self.history) - 1, -1, -1) if self.history[i]["round"] == result.round), None
        )
        if index is None:
            log.warning("round %d was evaluated but has no record; its accuracy is dropped", result.round)
        else:
            evaluated = result.model_hash if result.error is None else None
            summary = RoundSummary.model_validate(
                {**self.history[index], "accuracy": result.accuracy, "loss": result.loss, "evaluated_model": evaluated}
            )
            self.history[index] = summary.model_dump(mode="json")
            self._publish(self.topics.round_summary(result.round), to_json(summary), retain=True)
        if result.accuracy is not None:
            self.metrics = Metrics(accuracy=result.accuracy, loss=result.loss)
        self._event(EventType.ROUND_EVALUATED, round=result.round, detail=result.detail)
        reason = self._target_reached(result.accuracy, result.round)
        if reason is not None and self.machine.stage is M.Stage.AGGREGATING:
            self._target_pending = reason  # _close_round passes it to aggregation_done
        elif reason is not None and not self.machine.done:
            self._execute(self.machine.target_reached(reason, self.clock()))  # the round after is open: stop
        if self.exit_code is None:
            self._maybe_publish_status(force=True)
            if self.machine.stage is not M.Stage.AGGREGATING:  # _close_round checkpoints once the round is closed
                self._checkpoint()

    def _evaluation_due(self, round_number: int) -> bool:
        return evaluation_due(round_number, self.config.eval_every, self.config.rounds)

    def _resume_evaluations(self) -> None:
        """After a restart: evaluate the checkpoint's model if its round lacks an accuracy; earlier rounds that lack
        one keep None (a checkpoint holds only the latest model)."""
        if self._evaluator is None:
            return
        current, lost = unevaluated(self.history, self._evaluation_due)
        if lost:
            log.warning(
                "round(s) %s have no accuracy: their evaluation did not complete, and the checkpoint holds only the "
                "latest model, so it stays unknown",
                ", ".join(map(str, lost)),
            )
        if current is not None:
            log.info("round %d's model (the checkpoint's) was not evaluated: evaluating it now", current)
            self._evaluator.submit(current, self.model_hash, self.global_arrays)

    # ------------------------------------------------------------------------------------ durability

    def _replay_spool(self) -> None:
        r, attempt = self.machine.round, self.machine.attempt
        culprit = self.files.last_replay_culprit(r, attempt)
        if culprit is not None:
            # The last process ended while replaying this frame: it would end this one too (a poison pill).
            device, payload = culprit
            log.error("quarantining spooled update %s.frame: the last replay of it ended the coordinator", device)
            self._quarantine(device, payload, "the coordinator ended while replaying this frame")
            self._event(
                EventType.UPDATE_REFUSED,
                round=r,
                device=device,
                reason=RefusalReason.INTERNAL_ERROR,
                detail="the coordinator ended while replaying this update; it is quarantined",
            )
        for device, payload in self.files.replay(r, attempt):
            log.info("replaying spooled update %s.frame", device)
            item = _Inbound(self.topics.update(device), payload, 0, 0, self.clock())
            try:
                self._progress = _Progress()
                self._handle_update(device, payload, from_spool=True)
            except Exception as exc:
                self._internal_error(item, exc)

    def _checkpoint(self) -> None:
        if not self.files.enabled:
            return
        privacy = self.privacy.state_dict() if self.privacy is not None else {"accountant": None, "adaptive_clip": None}
        state = {
            "job": self.config.job,
            "run_id": self.run_id,
            "model": self.config.model,
            "model_round": self.model_round,
            "global": dict(self.global_arrays),
            "downlink": None
            if self._downlink is None
            else {**self._downlink.state_dict(), "delta_frame": np.frombuffer(self.delta_frame, dtype=np.uint8)},
            "strategy": self.strategy.state_dict(),
            "machine": self.machine.state_dict(),
            **privacy,
            "history": self.history,
            "metrics": self.metrics.model_dump(mode="json") if self.metrics else None,
            "plan": self.plan.model_dump(mode="json") if self.plan else None,
            "refused_total": self.refused_total,
            "book": vars(self.book) if self.book else None,
            # What the job trains and prunes: a resume must continue the same (see _check_resumed_shape).
            "trainable": None if self.trained is None else list(self.trained),
            "prune_schedule": self.config.prune_schedule,
            "keep_pruned": self.config.keep_pruned,
            "pruning": None if self.pruning is None else self.pruning.state_dict(),
        }
        self.files.save(state)

    def _check_resumed_shape(self, state: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint with another --trainable set or other pruning flags than it was made with:
        the server optimizer's state, the downlink's held model and the pruning mask cover exactly the checkpoint's
        tensors, and a pruned job resumed without its mask would let its zeros grow back."""
        if "trainable" in state:
            saved = state["trainable"]
        else:  # a checkpoint written before these keys: its plan names the trainable set
            plan = state.get("plan") or {}
            saved = plan.get("trainable") if plan else self.trained
        before = None if saved is None else tuple(saved)
        where = f"checkpoint {self.files.checkpoint_path}"
        if before != self.trained:

            def listed(names: tuple[str, ...] | None) -> str:
                return "all tensors (no --trainable)" if names is None else ", ".join(names)

            raise FedmqttError(
                f"{where} trains {listed(before)}; this coordinator's --trainable gives {listed(self.trained)}. "
                "Resume with the checkpoint's --trainable, or start a new job (another --job or --checkpoint-dir) "
                "from this one's model with --init-checkpoint (fedmqtt export --checkpoint-dir DIR --format state "
                "--out model.fedmodel) and the new --trainable"
            )
        saved_flags = (state.get("prune_schedule"), bool(state.get("keep_pruned")))
        flags = (self.config.prune_schedule, self.config.keep_pruned)
        if saved_flags != flags or (self.pruning is not None and not state.get("pruning")):

            def spelled(schedule: str | None, keep: bool) -> str:
                parts = ([f"--prune-schedule {schedule}"] if schedule else []) + (["--keep-pruned"] if keep else [])
                return " ".join(parts) or "no pruning"

            raise FedmqttError(
                f"{where} was made with {spelled(*saved_flags)}; this coordinator has {spelled(*flags)}. Resume "
                "with the checkpoint's pruning flags (its mask is checkpointed and continues), or start a new job"
            )

    def _restore(self) -> None:
        state = self.files.load()
        if state.get("job") != self.config.job or state.get("model") != self.config.model:
            raise FedmqttError(
                f"checkpoint {self.files.checkpoint_path} belongs to job {state.get('job')!r} "
                f"(model {state.get('model')!r}); resume with the same --job and --model or use another "
                "--checkpoint-dir"
            )
        self._check_resumed_shape(state)
        self.global_arrays = {k: np.asarray(v, dtype=np.float32) for k, v in state["global"].items()}
        if self.pruning is not None:  # the checkpointed mask itself (exact), not the zeros of the model
            self.pruning.load_state_dict(state["pruning"])
            self.pruning.held(self.global_arrays)
        self.model_round = int(state["model_round"])
        downlink = state.get("downlink")
        if downlink is not None and self._sends_deltas:
            self._downlink = DownlinkTracker.from_state_dict(self.config.downlink_codec, downlink, self.trained)
            self.delta_frame = bytes(np.asarray(downlink["delta_frame"], dtype=np.uint8))
        elif self._sends_deltas:
            # A checkpoint of a job that sent whole models: the devices hold the global model itself.
            self._downlink = DownlinkTracker(self.config.downlink_codec, self.global_arrays, self.trained)
        self.strategy.load_state_dict(state["strategy"])
        self.machine = M.RoundMachine.from_state_dict(self._round_config(), state["machine"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state)
        self._set_round_budget()
        self.history = list(state.get("history") or [])
        self.metrics = Metrics.model_validate(state["metrics"]) if state.get("metrics") else None
        self.plan = Plan.model_validate(state["plan"]) if state.get("plan") else None
        self.refused_total = int(state.get("refused_total") or 0)
        self.book = _RoundBook(**state["book"]) if state.get("book") else None
        # Accepted updates of the open round are replayed from the spool into a fresh accumulator.
        self.strategy.begin_round(self._trained_part(self.global_arrays))
