"""The device agent: a thin MQTT adapter around local training, DP and the update codec.

One process hosts one or more *virtual devices* (``--id-prefix/--parts``), each its own MQTT client, identity,
data part, error-feedback state and privacy ledger. Network threads only route messages; one worker thread per
process trains the selected devices one after another, so they share the process's torch threads and one model
copy plus its optimizer.

What to do with each plan and coordinator presence is decided by the pure core, :mod:`fedmqtt.device.screening`; this
module carries the decisions out. A plan the device cannot serve is declined with a retained device status that
says why, and the device goes on listening for the next plan.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedmqtt import arrays as A
from fedmqtt.checkpoint import load_state, save_state, write_atomic
from fedmqtt.codecs import ErrorFeedback, decode_frame, encode_frame, model_hash, peek_header
from fedmqtt.codecs import errors as codec_errors
from fedmqtt.codecs.downlink import apply_delta_frame, apply_model_part_frame
from fedmqtt.device.screening import (
    DeviceScreen,
    PlanReason,
    PlanScreening,
    foreign_instance,
    reported_samples,
    run_label,
)
from fedmqtt.device.train_time import TrainTimeEstimator
from fedmqtt.errors import FedmqttError
from fedmqtt.mqtt import (
    BrokerSettings,
    ConnectionRefused,
    MqttConnection,
    MqttError,
    NetworkLoop,
    PublishRefused,
    TlsError,
    Will,
)
from fedmqtt.schema import (
    CoordinatorPresence,
    DeviceState,
    DeviceStatus,
    DownlinkPath,
    DPAnnouncement,
    DPMode,
    FrameKind,
    MessageError,
    Phase,
    Plan,
    from_json,
    new_token,
    to_json,
)
from fedmqtt.topics import Topics

log = logging.getLogger("fedmqtt.device")

# Plan screenings worth a log line at INFO (the others are routine: not selected, already answered, ...).
_TOLD = frozenset({PlanReason.RUN_ENDED, PlanReason.STALE, PlanReason.SUPERSEDED, PlanReason.EXPIRED})
_DETAIL_MAX = 500  # DeviceStatus.detail
# How long a device waits for the retained delta frame after subscribing before it fetches the full model.
DELTA_WAIT_SECONDS = 5.0


#: Devices of one process that connect at the same time on a shared network loop (connect_all).
CONNECT_CONCURRENCY = 16
#: Distinct plan and coordinator-presence payloads whose parsed form a process keeps (DeviceRuntime.parse).
_PARSED_KEPT = 64
_Message = TypeVar("_Message", Plan, CoordinatorPresence)


class DeviceRefusal(FedmqttError):
    """A device declines a round (unknown model, manifest mismatch, privacy budget, ...)."""


class _Abandoned(FedmqttError):
    """The plan being served stopped being wanted (superseded, its run ended, its deadline passed): drop it
    without an answer."""


def check_trainable(model: str, trainable: tuple[str, ...]) -> None:
    """A plan's trainable set must be one the coordinator's config can produce: exact tensor names of ``model``
    in its order, as :func:`fedmqtt.models.expand_trainable` gives them; else :class:`DeviceRefusal`."""
    from fedmqtt.errors import ConfigError
    from fedmqtt.models import expand_trainable

    try:
        valid = expand_trainable(model, trainable) == trainable
    except ConfigError:
        valid = False
    if not valid:
        shown = ", ".join(trainable[:5]) + (" ..." if len(trainable) > 5 else "")
        raise DeviceRefusal(f"the plan's trainable tensors ({shown}) are not a trainable set of {model}")


def duplicate_id_message(device_id: str) -> str:
    return (
        f"another process uses device id {device_id}: both keep kicking each other off the broker; "
        "give each device a unique --id"
    )


@dataclass(frozen=True)
class DeviceOptions:
    broker: BrokerSettings  # the validated broker flags (fedmqtt.mqtt.broker_settings_from_args)
    job: str
    prefix: str = "fedmqtt"
    state_dir: Path | None = None
    privacy_budget: float | None = None
    max_train_seconds: float | None = None  # decline rounds estimated to train longer (device.train_time)
    exit_on_finish: bool = False
    session_expiry: int = 3600


@dataclass(eq=False)
class _Inbound:
    device: VirtualDevice
    kind: str  # "plan" | "presence" (the coordinator's) | "connected"
    payload: bytes = b""
    live: bool = False  # published while we listened (not a retained message replayed on subscribing)


@dataclass(eq=False)
class VirtualDevice:
    """One device identity: its MQTT client, data part and per-device state."""

    device_id: str
    dataset: Any  # fedmqtt.data.ImageDataset (this device's part)
    runtime: DeviceRuntime
    conn: MqttConnection | None = None
    screen: DeviceScreen = field(init=False)
    feedback: ErrorFeedback | None = None
    ledger: Any = None
    model_frames: queue.Queue[bytes] = field(default_factory=queue.Queue)
    state: DeviceState = "online"
    # Plans and coordinator presences received and not yet handled by the worker, oldest first (the inbox holds them
    # too; this list lets the worker see what came *after* the message it handles).
    pending: list[_Inbound] = field(default_factory=list)
    # Said in the next status's detail (e.g. that another process uses this device id).
    notice: str | None = None
    duplicates: int = 0  # signs that another process uses this device id
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.screen = DeviceScreen(job=self.runtime.options.job, device=self.device_id)

    @property
    def state_path(self) -> Path | None:
        d = self.runtime.options.state_dir
        return d / self.device_id if d is not None else None

    # --------------------------------------------------------------------- connection

    def connect(self, timeout: float) -> None:
        opts = self.runtime.options
        topics = self.runtime.topics
        offline = DeviceStatus(device=self.device_id, state="offline", instance=self.runtime.instance)
        settings = opts.broker.client_settings(
            f"fedmqtt-{opts.job}-{self.device_id}",
            clean_start=False,
            session_expiry=opts.session_expiry,
            will=Will(topics.device_status(self.device_id), to_json(offline), qos=1, retain=True),
        )
        self.conn = MqttConnection(
            settings,
            on_message=self._on_message,
            # The coordinator's presence, not the job status: it changes only when the job starts or ends (the
            # status is a heartbeat, n deliveries a second for n devices). Its own status topic too: another
            # process's status there means two processes share this id.
            subscriptions=[(topics.plan, 1), (topics.coordinator, 1), (topics.device_status(self.device_id), 1)],
            on_connected=self._on_connected,
            on_disconnected=self._on_disconnected,
            network_loop=self.runtime.network_loop,
        )
        self.conn.connect(timeout=timeout)

    def _on_connected(self, *_: Any) -> None:
        # Network thread: the worker publishes the retained 'online' status (publishing waits for acks).
        self.runtime.inbox.put(_Inbound(self, "connected"))

    def _on_disconnected(self, reason: str, taken_over: bool) -> None:
        # Network thread. A take-over (MQTT 5 "session taken over") means another connection logged in with this
        # device's client id: two processes share one device id. paho reconnects with its backoff.
        if taken_over:
            self._duplicate("the broker said another connection took the session over")

    def _duplicate(self, evidence: str) -> None:
        """Another process uses this device id: log it (rarely: the two may alternate for hours) and say it in
        the next status."""
        message = duplicate_id_message(self.device_id)
        self.notice = message
        self.duplicates += 1
        if self.duplicates & (self.duplicates - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... time
            log.error("%s (%s; seen %d time(s))", message, evidence, self.duplicates)

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        topics = self.runtime.topics
        if topic == topics.plan or topic == topics.coordinator:
            item = _Inbound(self, "plan" if topic == topics.plan else "presence", payload, live=not retain)
            with self._lock:
                self.pending.append(item)
            self.runtime.inbox.put(item)
        elif topic == topics.model or topic == topics.delta:
            self.model_frames.put(payload)  # one of the two at a time (DeviceRuntime.obtain_global)
        elif topic == topics.device_status(self.device_id) and payload:
            try:
                status = from_json(DeviceStatus, payload)
            except MessageError:
                return
            runtime = self.runtime
            if foreign_instance(status, device=self.device_id, instance=runtime.instance, since=runtime.started_at):
                self._duplicate(f"a status from process instance {status.instance} arrived on this device's topic")

    def take_pending(self, item: _Inbound) -> list[Plan | CoordinatorPresence | None]:
        """Remove ``item`` from the pending list; return what arrived after it (parsed; plans cleared from the
        retained topic as None; unreadable messages left out)."""
        with self._lock:
            for index, other in enumerate(self.pending):
                if other is item:
                    del self.pending[index]
                    break
        return self.queued()

    def queued(self) -> list[Plan | CoordinatorPresence | None]:
        with self._lock:
            later = list(self.pending)
        parsed: list[Plan | CoordinatorPresence | None] = []
        for other in later:
            try:
                if other.kind == "plan":
                    parsed.append(self.runtime.parse(Plan, other.payload) if other.payload else None)
                elif other.payload:
                    parsed.append(self.runtime.parse(CoordinatorPresence, other.payload))
            except MessageError:
                continue
        return parsed

    def publish_status(
        self,
        state: DeviceState,
        *,
        round_number: int | None = None,
        detail: str | None = None,
        run_id: str | None = None,
    ) -> None:
        if self.conn is None:
            return
        self.state = state
        notice, self.notice = self.notice, None
        if notice is not None:
            detail = f"{notice}; {detail}" if detail else notice
        status = DeviceStatus(
            device=self.device_id,
            state=state,
            ts=time.time(),
            round=round_number,
            num_samples=len(self.dataset),
            detail=detail[:_DETAIL_MAX] if detail else None,
            instance=self.runtime.instance,
            run_id=run_id,
        )
        self.conn.publish(self.runtime.topics.device_status(self.device_id), to_json(status), qos=1, retain=True)

    def close(self) -> None:
        if self.conn is None:
            return
        try:
            self.publish_status("offline", detail="device agent stopped", run_id=self.screen.current_run)
        except (MqttError, OSError) as exc:
            log.info("%s: could not publish offline status: %s", self.device_id, exc)
        self.conn.close()
        self.conn = None

    # --------------------------------------------------------------------- persistent state

    def load_state(self) -> None:
        path = self.state_path
        if path is None:
            return
        if (path / "answered.json").exists():
            try:
                self.screen.load_state_dict(json.loads((path / "answered.json").read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("%s: ignored an unreadable %s: %s", self.device_id, path / "answered.json", exc)
        if (path / "feedback.npz").exists():
            self.feedback = ErrorFeedback()
            self.feedback.load_state_dict(load_state(path / "feedback.npz"))

    def save_state(self) -> None:
        path = self.state_path
        if path is None:
            return
        write_atomic(path / "answered.json", json.dumps(self.screen.state_dict()).encode())
        if self.feedback is not None:
            save_state(path / "feedback.npz", self.feedback.state_dict())


class DeviceRuntime:
    """One process: shared dataset, model cache, inbox and the worker loop."""

    def __init__(
        self,
        options: DeviceOptions,
        *,
        threads: int | None = None,
        train_seed: int | None = None,
        clock: Callable[[], float] = time.time,
        shared_loop: bool | None = None,
    ) -> None:
        self.options = options
        # One network thread for all virtual devices (fedmqtt.mqtt.NetworkLoop, epoll: no 250-client cap) instead of
        # paho's thread per client; None: shared when the process hosts more than one device. Made in connect_all.
        self.shared_loop = shared_loop
        self.network_loop: NetworkLoop | None = None
        # Plans and coordinator presences parsed once per distinct payload (see parse()), newest last.
        self._parsed: dict[tuple[type, bytes], Any] = {}
        self.topics = Topics(job=options.job, prefix=options.prefix)
        self.inbox: queue.Queue[_Inbound] = queue.Queue()
        self.devices: list[VirtualDevice] = []
        self.clock = clock
        self.train_seed = train_seed
        # This process: its device statuses carry it, so two processes on one device id can be told apart.
        self.instance = new_token()
        self.started_at = time.time()
        self._stop = threading.Event()
        self._models: dict[str, Any] = {}
        self._cached_global: tuple[str, A.ModelArrays] | None = None
        self.finished_phase: Phase | None = None
        # Seconds per sample per epoch of the last rounds (one rate for the process: its devices share the model
        # and the torch threads), for --max-train-seconds and the deadline check.
        self.train_times = TrainTimeEstimator()
        if threads:
            import torch

            torch.set_num_threads(threads)

    def parse(self, kind: type[_Message], payload: bytes) -> _Message:
        """``from_json(kind, payload)``, once per distinct payload: every virtual device of the process receives
        its own copy of each plan and coordinator presence, and parsing each copy cost O(devices) per message
        (when devices still followed the once-a-second job status, a worker with 250 devices fell behind and a plan
        waited behind minutes of statuses).
        Worker thread only. Raises :class:`MessageError` (remembered too: a hostile payload is parsed once)."""
        key = (kind, payload)
        hit = self._parsed.get(key)
        if hit is None:
            try:
                hit = from_json(kind, payload)
            except MessageError as exc:
                hit = exc
            self._parsed[key] = hit
            if len(self._parsed) > _PARSED_KEPT:
                del self._parsed[next(iter(self._parsed))]
        if isinstance(hit, MessageError):
            raise MessageError(hit.model, hit.detail)  # a fresh one: re-raising one object grows its traceback
        return hit

    def add_device(self, device_id: str, dataset: Any) -> VirtualDevice:
        device = VirtualDevice(device_id=device_id, dataset=dataset, runtime=self)
        if self.options.privacy_budget is not None:
            from fedmqtt.privacy import DeviceLedger

            base = self.options.state_dir / device_id if self.options.state_dir else None
            device.ledger = DeviceLedger(base / "privacy.json" if base else None, self.options.privacy_budget)
        device.load_state()
        self.devices.append(device)
        return device

    def connect_all(self, timeout: float = 30.0, attempts: int = 3) -> None:
        """Connect every device; a broker that is slow to answer (a loaded embedded broker, say) gets
        ``attempts`` tries per device. A refused login or a TLS error is final at once. With a shared network loop
        the devices connect :data:`CONNECT_CONCURRENCY` at a time (each waits for its CONNACK and SUBACK)."""
        shared = self.shared_loop if self.shared_loop is not None else len(self.devices) > 1
        if shared and self.network_loop is None:
            self.network_loop = NetworkLoop(name="fedmqtt-devices-netloop")

        def connect(device: VirtualDevice) -> None:
            for attempt in range(1, attempts + 1):
                if self._stop.is_set():  # stopped (a signal) while the others connected
                    return
                try:
                    device.connect(timeout)
                    break
                except (ConnectionRefused, TlsError):
                    raise
                except MqttError as exc:
                    if device.conn is not None:
                        device.conn.close()
                        device.conn = None
                    if attempt == attempts or self._stop.is_set():
                        raise
                    log.warning("%s: %s; trying again (%d/%d)", device.device_id, exc, attempt + 1, attempts)

        if self.network_loop is None or len(self.devices) < 2:
            for device in self.devices:
                connect(device)
            return
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        with ThreadPoolExecutor(CONNECT_CONCURRENCY, thread_name_prefix="fedmqtt-connect") as pool:
            futures = [pool.submit(connect, device) for device in self.devices]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                failed.result()  # raises the first failure

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for device in self.devices:
            device.close()
        if self.network_loop is not None:
            self.network_loop.stop()
            self.network_loop = None

    # --------------------------------------------------------------------- worker loop

    def run(self) -> int:
        """Serve until stopped (signal) or, with exit_on_finish, until the run the devices serve is over."""
        while not self._stop.is_set():
            try:
                item = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._handle(item)
            except (MqttError, OSError) as exc:
                log.warning("%s: %s (will retry on the next plan)", item.device.device_id, exc)
            if self.finished_phase is not None and self.options.exit_on_finish:
                log.info("job %s is %s; exiting", self.options.job, self.finished_phase.value)
                return 0
        return 0

    def _handle(self, item: _Inbound) -> None:
        device = item.device
        if item.kind == "connected":
            state: DeviceState = "online" if device.state != "training" else "training"
            device.publish_status(state, run_id=device.screen.current_run)
            return
        queued = device.take_pending(item)
        if item.kind == "presence":
            self._on_presence(device, item)
        elif item.kind == "plan":
            self._on_plan(device, item, queued)

    def _on_presence(self, device: VirtualDevice, item: _Inbound) -> None:
        """The coordinator's presence: whether the run this device serves ended (screening.on_presence)."""
        if not item.payload:
            return
        try:
            presence = self.parse(CoordinatorPresence, item.payload)
        except MessageError as exc:
            log.warning("%s: ignored an invalid coordinator presence: %s", device.device_id, exc)
            return
        if device.screen.on_presence(presence, live=item.live):
            self.finished_phase = presence.phase
        elif presence.phase is not None and self.options.exit_on_finish:
            log.info(
                "%s: the coordinator says run %s is %s; not the run this device serves, waiting for plans",
                device.device_id, run_label(presence.run_id), presence.phase.value,
            )  # fmt: skip
        elif presence.state == "offline" and item.live and presence.job == self.options.job:
            log.info(
                "%s: the coordinator of run %s went offline (its last will); waiting for it to come back",
                device.device_id, run_label(presence.run_id),
            )  # fmt: skip

    def _on_plan(self, device: VirtualDevice, item: _Inbound, queued: list[Plan | CoordinatorPresence | None]) -> None:
        if not item.payload:
            return  # the retained plan was cleared (a new run starts)
        try:
            plan = self.parse(Plan, item.payload)
        except MessageError as exc:
            log.warning("%s: ignored an invalid plan: %s", device.device_id, exc)
            return
        from fedmqtt.models import MODEL_NAMES

        screening = self._screen(device, plan, queued, known_models=MODEL_NAMES, timed=True)
        device.screen.observe(plan, live=item.live)
        if screening.ignored:
            if screening.reason in _TOLD:
                log.info("%s: ignored a plan: %s", device.device_id, screening.detail)
            return
        if screening.declined:
            self._decline(device, plan, screening.detail)
            return
        from fedmqtt.privacy.errors import BudgetExceeded
        from fedmqtt.training import TrainingDiverged

        try:
            self.take_part(device, plan)
        except _Abandoned as exc:
            log.info("%s: dropped round %d (attempt %d): %s", device.device_id, plan.round, plan.attempt, exc)
        except (DeviceRefusal, TrainingDiverged, BudgetExceeded) as exc:  # one failure must not end the process
            self._decline(device, plan, str(exc))

    def _screen(
        self,
        device: VirtualDevice,
        plan: Plan,
        queued: list[Plan | CoordinatorPresence | None],
        known_models: tuple[str, ...] | None = None,
        timed: bool = False,
    ) -> PlanScreening:
        """``timed``: also check the estimated training time (before starting a plan, not while serving it)."""
        return device.screen.screen(
            plan,
            now=self.clock(),
            queued=queued,
            known_models=known_models,
            ledger=device.ledger,
            train_estimate=self.train_times.estimate(plan, len(device.dataset)) if timed else None,
            max_train_seconds=self.options.max_train_seconds,
        )

    def _decline(self, device: VirtualDevice, plan: Plan, why: str) -> None:
        log.warning(
            "%s: declined round %d (attempt %d) of run %s: %s",
            device.device_id, plan.round, plan.attempt, run_label(plan.run_id), why,
        )  # fmt: skip
        device.screen.answer(plan)
        device.save_state()
        device.publish_status(
            "online", round_number=plan.round, detail=f"declined round {plan.round}: {why}", run_id=plan.run_id
        )

    def _check_wanted(self, device: VirtualDevice, plan: Plan) -> None:
        """Raise :class:`_Abandoned` when a newer plan, the end of the plan's run or its deadline has come
        while the device was busy with it."""
        screening = self._screen(device, plan, device.queued())
        if screening.ignored:
            raise _Abandoned(screening.detail)

    # --------------------------------------------------------------------- one round

    def _model(self, name: str) -> Any:
        from fedmqtt.models import MODEL_NAMES, build_model

        if name not in MODEL_NAMES:
            raise DeviceRefusal(f"unknown model {name!r}; this device knows {', '.join(MODEL_NAMES)}")
        if name not in self._models:
            self._models.clear()  # one model copy per process
            self._models[name] = build_model(name)
        return self._models[name]

    def fetch_global(self, device: VirtualDevice, plan: Plan) -> A.ModelArrays:
        """The global model the plan names (see :meth:`obtain_global`)."""
        return self.obtain_global(device, plan)[0]

    def obtain_global(self, device: VirtualDevice, plan: Plan) -> tuple[A.ModelArrays, DownlinkPath]:
        """The global model the plan names, and how it came: the process already holds it (the last model it
        trained on, or another virtual device fetched it); else, when the plan names a digest (a compressed
        downlink), the retained delta frame applied to the held model; else, or when the delta does not apply,
        the retained full model."""
        held = self._cached_global
        if held is not None and held[0] == plan.model_hash:
            return held[1], DownlinkPath.HELD
        path = DownlinkPath.FULL
        if held is not None and plan.model_digest is not None:
            arrays, received = self._fetch_delta(device, plan, held)
            if arrays is not None:
                self._cached_global = (plan.model_hash, arrays)
                return arrays, DownlinkPath.DELTA
            if received:
                path = DownlinkPath.DELTA_THEN_FULL
        return self._fetch_full(device, plan), path

    def _take_frames(self, device: VirtualDevice, topic: str) -> None:
        while not device.model_frames.empty():
            device.model_frames.get_nowait()
        assert device.conn is not None
        device.conn.subscribe(topic, 1)

    def _fetch_delta(
        self, device: VirtualDevice, plan: Plan, held: tuple[str, A.ModelArrays]
    ) -> tuple[A.ModelArrays | None, bool]:
        """Subscribe to the retained delta, apply it to the held model and check the result against the plan's
        digest; unsubscribe. Returns (the model or None, whether a delta frame arrived)."""
        from fedmqtt.models import model_manifest

        assert plan.model_digest is not None
        manifest = model_manifest(plan.model_name)
        if plan.trainable is not None:  # a --trainable job's deltas carry only the trainable tensors
            manifest = tuple(entry for entry in manifest if entry.name in plan.trainable)
        self._take_frames(device, self.topics.delta)
        try:
            until = min(plan.deadline, self.clock() + DELTA_WAIT_SECONDS)
            while True:
                remaining = until - self.clock()
                if remaining <= 0:
                    log.info("%s: no delta for round %d came; fetching the full model", device.device_id, plan.round)
                    return None, False
                if self._stop.is_set():
                    raise _Abandoned("the device is stopping")
                self._check_wanted(device, plan)
                try:
                    frame = device.model_frames.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    continue
                if not frame:
                    return None, False  # no delta leads to this model (the first one of a run)
                try:
                    if peek_header(frame).kind is FrameKind.MODEL_PART:  # a --trainable job's lossless downlink
                        arrays = apply_model_part_frame(
                            frame,
                            held=held[1],
                            job=plan.job,
                            round=plan.round,
                            run_id=plan.run_id,
                            digest=plan.model_digest,
                            manifest=manifest,
                        )
                    else:
                        arrays = apply_delta_frame(
                            frame,
                            held=held[1],
                            held_hash=held[0],
                            job=plan.job,
                            round=plan.round,
                            run_id=plan.run_id,
                            digest=plan.model_digest,
                            manifest=manifest,
                        )
                except codec_errors.DeltaBaseMismatch as exc:  # it missed a round: routine
                    log.info("%s: %s; fetching the full model", device.device_id, exc)
                    return None, True
                except codec_errors.FrameError as exc:
                    log.warning(
                        "%s: refused the delta frame for round %d: %s; fetching the full model",
                        device.device_id, plan.round, exc,
                    )  # fmt: skip
                    return None, True
                return arrays, True
        finally:
            if device.conn is not None:
                device.conn.unsubscribe(self.topics.delta)

    def _fetch_full(self, device: VirtualDevice, plan: Plan) -> A.ModelArrays:
        """Subscribe to the retained model, take the frame whose hash the plan names, unsubscribe."""
        from fedmqtt.models import model_manifest

        manifest = model_manifest(plan.model_name)
        self._take_frames(device, self.topics.model)
        try:
            while True:
                remaining = plan.deadline - self.clock()
                if remaining <= 0:
                    raise DeviceRefusal("the model named by the plan did not arrive before the deadline")
                if self._stop.is_set():
                    raise _Abandoned("the device is stopping")
                self._check_wanted(device, plan)  # a plan naming a model that never comes must not wedge us
                try:
                    frame = device.model_frames.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    continue
                if model_hash(frame) != plan.model_hash:
                    continue  # an older retained model; the plan's one follows
                try:
                    decoded = decode_frame(frame, expected_manifest=manifest)
                except codec_errors.ManifestMismatch as exc:
                    raise DeviceRefusal(
                        f"the coordinator's model does not match this device's {plan.model_name}: {exc}"
                    ) from None
                except codec_errors.FrameError as exc:
                    raise DeviceRefusal(f"the global model frame is invalid: {exc}") from None
                self._cached_global = (plan.model_hash, decoded.arrays)
                return decoded.arrays
        finally:
            if device.conn is not None:
                device.conn.unsubscribe(self.topics.model)

    def take_part(self, device: VirtualDevice, plan: Plan) -> None:
        from fedmqtt.models import get_arrays, set_arrays
        from fedmqtt.training import round_seed, train_local

        # Screening (device.screening) has checked the job, selection, deadline, model name and privacy budget.
        dp = plan.dp if plan.dp is not None and plan.dp.mode is not DPMode.OFF else None
        model = self._model(plan.model_name)
        if plan.trainable is not None:
            check_trainable(plan.model_name, plan.trainable)
        global_arrays, downlink = self.obtain_global(device, plan)
        device.publish_status("training", round_number=plan.round, run_id=plan.run_id)
        set_arrays(model, global_arrays)
        result = train_local(
            model,
            device.dataset,
            epochs=plan.local_epochs,
            batch_size=plan.batch_size,
            lr=plan.learning_rate,
            prox_mu=plan.prox_mu,
            trainable=plan.trainable,
            seed=None if self.train_seed is None else round_seed(self.train_seed, device.device_id, plan.round),
        )
        self.train_times.record(plan, samples=result.num_samples, seconds=result.seconds)
        update = A.subtract(get_arrays(model), global_arrays)
        if plan.trainable is not None:  # the frozen tensors did not move: the update carries only the trained ones
            update = {key: value for key, value in update.items() if key in plan.trainable}
        announcement = None
        if dp is not None:
            from fedmqtt.privacy import clip_and_noise, secure_generator

            update, norm = clip_and_noise(
                update,
                clip=dp.clip,
                noise_std=dp.device_noise_std,
                generator=secure_generator(),
                trainable=plan.trainable,  # head-only: the norm, clip and noise cover the trained tensors only
            )
            # The clip bit feeds adaptive clipping (central mode only: it reaches the coordinator unnoised).
            announcement = DPAnnouncement(
                mode=dp.mode.value,  # type: ignore[arg-type]  # DPMode minus OFF, checked above
                clip=dp.clip,
                noise_std=dp.device_noise_std,
                unclipped=(norm <= dp.clip) if dp.mode is DPMode.CENTRAL else None,
            )
        feedback = None
        if plan.uplink.error_feedback:
            device.feedback = device.feedback or ErrorFeedback()
            feedback = device.feedback
        frame = encode_frame(
            update,
            kind=FrameKind.UPDATE,
            job=plan.job,
            round=plan.round,
            sender=device.device_id,
            codec=plan.uplink,
            num_samples=reported_samples(plan, result.num_samples),
            base_model_hash=plan.model_hash,
            model_name=plan.model_name,
            dp=announcement,
            downlink=downlink,
            feedback=feedback,
            compact=True,  # the coordinator expands the header against the update manifest it holds
        )
        if dp is not None and device.ledger is not None:
            device.ledger.record(dp)  # before sending: a crash after the send must not under-count
        self._publish_update(device, plan, frame)
        device.screen.answer(plan)
        device.save_state()
        device.publish_status("online", round_number=plan.round, run_id=plan.run_id)
        log.info(
            "%s: round %d sent %d bytes (%d samples, loss %.4f, %.1fs)",
            device.device_id, plan.round, len(frame), result.num_samples, result.loss, result.seconds,
        )  # fmt: skip

    def _publish_update(self, device: VirtualDevice, plan: Plan, frame: bytes) -> None:
        """Publish QoS 1 and wait for the broker's ack; retry across reconnects until the deadline."""
        assert device.conn is not None
        while True:
            try:
                device.conn.publish(self.topics.update(device.device_id), frame, qos=1, timeout=30.0)
                return
            except PublishRefused:
                raise  # the broker's ACL said no: retrying cannot help
            except MqttError as exc:
                if self.clock() > plan.deadline or self._stop.is_set():
                    raise
                log.info("%s: publish failed (%s); retrying", device.device_id, exc)
                time.sleep(1.0)
