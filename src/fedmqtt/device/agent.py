"""The device agent: a thin MQTT adapter around local training, DP and the update codec.

One process hosts one or more *virtual devices* (``--id-prefix/--parts``), each its own MQTT client, identity,
data part, error-feedback state and privacy ledger. Network threads only route messages; one worker thread per
process trains the selected devices one after another, so they share the process's torch threads and one model
copy plus its optimizer.
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
from typing import Any

from fedmqtt import arrays as A
from fedmqtt.checkpoint import load_state, save_state, write_atomic
from fedmqtt.codecs import ErrorFeedback, decode_frame, encode_frame, model_hash
from fedmqtt.codecs import errors as codec_errors
from fedmqtt.errors import FedmqttError
from fedmqtt.mqtt import (
    ClientSettings,
    ConnectionRefused,
    MqttConnection,
    MqttError,
    ProtocolName,
    PublishRefused,
    TlsError,
    Will,
    parse_broker_url,
)
from fedmqtt.schema import (
    DeviceState,
    DeviceStatus,
    DPAnnouncement,
    DPMode,
    FrameKind,
    MessageError,
    Phase,
    Plan,
    Status,
    from_json,
    to_json,
)
from fedmqtt.topics import Topics

log = logging.getLogger("fedmqtt.device")


class DeviceRefusal(FedmqttError):
    """A device declines a round (unknown model, manifest mismatch, privacy budget, ...)."""


@dataclass(frozen=True)
class DeviceOptions:
    broker: str
    job: str
    prefix: str = "fedmqtt"
    mqtt_version: ProtocolName = "auto"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    state_dir: Path | None = None
    privacy_budget: float | None = None
    exit_on_finish: bool = False
    session_expiry: int = 3600


@dataclass
class _Inbound:
    device: VirtualDevice
    kind: str  # "plan" | "status" | "connected"
    payload: bytes = b""


@dataclass
class VirtualDevice:
    """One device identity: its MQTT client, data part and per-device state."""

    device_id: str
    dataset: Any  # fedmqtt.data.ImageDataset (this device's part)
    runtime: DeviceRuntime
    conn: MqttConnection | None = None
    answered: set[tuple[int, int]] = field(default_factory=set)
    feedback: ErrorFeedback | None = None
    ledger: Any = None
    model_frames: queue.Queue[bytes] = field(default_factory=queue.Queue)
    state: DeviceState = "online"

    @property
    def state_path(self) -> Path | None:
        d = self.runtime.options.state_dir
        return d / self.device_id if d is not None else None

    # --------------------------------------------------------------------- connection

    def connect(self, timeout: float) -> None:
        opts = self.runtime.options
        topics = self.runtime.topics
        url = parse_broker_url(opts.broker)
        if opts.username is not None:
            url = url.with_credentials(opts.username, opts.password)
        offline = DeviceStatus(device=self.device_id, state="offline")
        settings = ClientSettings(
            url=url.to_url(include_password=True),
            client_id=f"fedmqtt-{opts.job}-{self.device_id}",
            protocol=opts.mqtt_version,
            clean_start=False,
            session_expiry=opts.session_expiry,
            tls_ca=opts.tls_ca,
            will=Will(topics.device_status(self.device_id), to_json(offline), qos=1, retain=True),
        )
        self.conn = MqttConnection(
            settings,
            on_message=self._on_message,
            subscriptions=[(topics.plan, 1), (topics.status, 1)],
            on_connected=self._on_connected,
        )
        self.conn.connect(timeout=timeout)

    def _on_connected(self, *_: Any) -> None:
        # Network thread: the worker publishes the retained 'online' status (publishing waits for acks).
        self.runtime.inbox.put(_Inbound(self, "connected"))

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        topics = self.runtime.topics
        if topic == topics.plan:
            self.runtime.inbox.put(_Inbound(self, "plan", payload))
        elif topic == topics.status:
            self.runtime.inbox.put(_Inbound(self, "status", payload))
        elif topic == topics.model:
            self.model_frames.put(payload)

    def publish_status(self, state: DeviceState, *, round_number: int | None = None, detail: str | None = None) -> None:
        if self.conn is None:
            return
        self.state = state
        status = DeviceStatus(
            device=self.device_id,
            state=state,
            ts=time.time(),
            round=round_number,
            num_samples=len(self.dataset),
            detail=detail,
        )
        self.conn.publish(self.runtime.topics.device_status(self.device_id), to_json(status), qos=1, retain=True)

    def close(self) -> None:
        if self.conn is None:
            return
        try:
            self.publish_status("offline", detail="device agent stopped")
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
            self.answered = {(int(r), int(a)) for r, a in json.loads((path / "answered.json").read_text())}
        if (path / "feedback.npz").exists():
            self.feedback = ErrorFeedback()
            self.feedback.load_state_dict(load_state(path / "feedback.npz"))

    def save_state(self) -> None:
        path = self.state_path
        if path is None:
            return
        # Only the most recent answers matter (a plan is never re-issued for an old round).
        recent = sorted(self.answered)[-32:]
        write_atomic(path / "answered.json", json.dumps(recent).encode())
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
    ) -> None:
        self.options = options
        self.topics = Topics(job=options.job, prefix=options.prefix)
        self.inbox: queue.Queue[_Inbound] = queue.Queue()
        self.devices: list[VirtualDevice] = []
        self.clock = clock
        self.train_seed = train_seed
        self._stop = threading.Event()
        self._models: dict[str, Any] = {}
        self._cached_global: tuple[str, A.ModelArrays] | None = None
        self.finished_phase: Phase | None = None
        if threads:
            import torch

            torch.set_num_threads(threads)

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
        ``attempts`` tries per device. A refused login or a TLS error is final at once."""
        for device in self.devices:
            for attempt in range(1, attempts + 1):
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

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for device in self.devices:
            device.close()

    # --------------------------------------------------------------------- worker loop

    def run(self) -> int:
        """Serve until stopped (signal) or, with exit_on_finish, until the job is finished."""
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
        if item.kind == "connected":
            item.device.publish_status("online" if item.device.state != "training" else "training")
        elif item.kind == "status":
            self._on_job_status(item.payload)
        elif item.kind == "plan":
            self._on_plan(item.device, item.payload)

    def _on_job_status(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            status = from_json(Status, payload)
        except MessageError:
            return
        if status.phase in (Phase.FINISHED, Phase.STOPPED):
            self.finished_phase = status.phase

    def _on_plan(self, device: VirtualDevice, payload: bytes) -> None:
        if not payload:
            return
        try:
            plan = from_json(Plan, payload)
        except MessageError as exc:
            log.warning("%s: ignored an invalid plan: %s", device.device_id, exc)
            return
        key = (plan.round, plan.attempt)
        if plan.job != self.options.job or device.device_id not in plan.selected or key in device.answered:
            return
        if self.clock() > plan.deadline:
            log.info("%s: plan for round %d expired before it could start", device.device_id, plan.round)
            return
        # A newer plan waiting in the inbox supersedes this one (e.g. after a reconnect): skip stale work.
        from fedmqtt.training import TrainingDiverged

        try:
            self.take_part(device, plan)
        except (DeviceRefusal, TrainingDiverged) as exc:  # one device's failure must not end its process
            log.warning("%s: declined round %d: %s", device.device_id, plan.round, exc)
            device.answered.add(key)
            device.save_state()
            device.publish_status("online", round_number=plan.round, detail=f"declined round {plan.round}: {exc}")

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
        """Subscribe to the retained model, take the frame whose hash the plan names, unsubscribe."""
        if self._cached_global is not None and self._cached_global[0] == plan.model_hash:
            return self._cached_global[1]
        from fedmqtt.models import model_manifest

        assert device.conn is not None
        manifest = model_manifest(plan.model_name)
        while not device.model_frames.empty():
            device.model_frames.get_nowait()
        device.conn.subscribe(self.topics.model, 1)
        try:
            while True:
                remaining = plan.deadline - self.clock()
                if remaining <= 0:
                    raise DeviceRefusal("the model named by the plan did not arrive before the deadline")
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
        from fedmqtt.training import train_local

        dp = plan.dp if plan.dp is not None and plan.dp.mode is not DPMode.OFF else None
        if dp is not None and device.ledger is not None and device.ledger.would_exceed(dp):
            raise DeviceRefusal(
                f"privacy budget: this round would take the device past epsilon {self.options.privacy_budget:g} "
                f"(spent {device.ledger.epsilon:.3f})"
            )
        model = self._model(plan.model_name)
        global_arrays = self.fetch_global(device, plan)
        device.publish_status("training", round_number=plan.round)
        set_arrays(model, global_arrays)
        result = train_local(
            model,
            device.dataset,
            epochs=plan.local_epochs,
            batch_size=plan.batch_size,
            lr=plan.learning_rate,
            prox_mu=plan.prox_mu,
            trainable=plan.trainable,
            seed=self.train_seed,
        )
        update = A.subtract(get_arrays(model), global_arrays)
        announcement = None
        if dp is not None:
            from fedmqtt.privacy import clip_and_noise, secure_generator

            update, norm = clip_and_noise(
                update, clip=dp.clip, noise_std=dp.device_noise_std, generator=secure_generator()
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
            num_samples=result.num_samples,
            base_model_hash=plan.model_hash,
            model_name=plan.model_name,
            dp=announcement,
            feedback=feedback,
        )
        if dp is not None and device.ledger is not None:
            device.ledger.record(dp)  # before sending: a crash after the send must not under-count
        self._publish_update(device, plan, frame)
        device.answered.add((plan.round, plan.attempt))
        device.save_state()
        device.publish_status("online", round_number=plan.round)
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
