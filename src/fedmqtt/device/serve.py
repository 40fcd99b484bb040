"""``fedmqtt device --serve``: keep the job's latest released model on disk for local inference.

A thin MQTT adapter around :mod:`fedmqtt.release`: one connection (its own client id, the device's account)
subscribed to the retained ``PREFIX/JOB/release``; the network thread only stores the newest frame, a worker thread
verifies it (:func:`fedmqtt.release.read_release`), orders it against the release held
(:func:`fedmqtt.release.compare`) and writes a newer one atomically as a model file at ``SERVE_DIR/model.fedmodel``
(``fedmqtt predict --model`` reads it). A release that fails a check, or is older than the one held, is refused with
one log line and counted per reason (:attr:`ReleaseServer.refused`); the file on disk stays as it was, and nothing
a release holds can end the process. What is held survives a restart: the file's metadata says which release it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fedmqtt.model_file import ModelFileError, load_model_file, save_model_file
from fedmqtt.mqtt import BrokerSettings, MqttConnection
from fedmqtt.release import (
    HeldRelease,
    RefusedBecause,
    Release,
    ReleaseRefused,
    compare,
    held_release,
    read_release,
    release_meta,
    serve_path,
)
from fedmqtt.topics import Topics

log = logging.getLogger("fedmqtt.device.serve")

__all__ = ["ReleaseServer"]


class ReleaseServer:
    """Keeps the newest valid release of one job as a model file (see the module's docstring)."""

    def __init__(
        self,
        broker: BrokerSettings,
        *,
        job: str,
        device_id: str,
        serve_dir: Path,
        prefix: str = "fedmqtt",
        model: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.topics = Topics(job=job, prefix=prefix)
        self.device_id = device_id
        self.path = serve_path(serve_dir)
        self.model = model
        self.clock = clock
        self.refused: Counter[RefusedBecause] = Counter()
        self.kept = 0
        self.held: HeldRelease | None = self._held_on_disk()
        self._conn: MqttConnection | None = None
        self._latest: bytes | None = None  # the newest frame not yet handled (older ones are superseded)
        self._arrived_at = 0.0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._busy = False
        self._worker: threading.Thread | None = None

    def _held_on_disk(self) -> HeldRelease | None:
        if not self.path.exists():
            return None
        try:
            held = held_release(load_model_file(self.path))
        except ModelFileError as exc:
            log.warning("%s; it is replaced by the next release", exc)
            return None
        if held is None:
            log.warning("%s was not written by --serve; it is replaced by the next release", self.path)
        return held

    # --------------------------------------------------------------------- the pure step

    def handle(self, frame: bytes) -> Release | None:
        """Verify ``frame`` and keep it if it is newer than what is held; return the release kept, else None
        (refusals are logged and counted, never raised)."""
        try:
            release = read_release(frame, job=self.topics.job, now=self.clock(), model=self.model)
            order = compare(release, self.held)
            if order == "older":
                assert self.held is not None
                raise ReleaseRefused(
                    RefusedBecause.OLDER,
                    f"{release.describe()} is older than the release held (round {self.held.round}, run "
                    f"{self.held.run_id or '-'}); {self.path} stays",
                )
        except ReleaseRefused as exc:
            self.refused[exc.reason] += 1
            log.warning("%s: %s; the model held stays (%d refused so far)", self.device_id, exc, self.refused.total())
            return None
        if order == "same":
            log.info("%s: release %s is the model held", self.device_id, release.info.digest[:12])
            return None
        try:
            save_model_file(
                self.path,
                release.model,
                release.arrays,
                num_classes=release.info.num_classes,
                meta=release_meta(release),
            )
        except ModelFileError as exc:
            log.error("%s: %s; the release is not kept", self.device_id, exc)
            return None
        self.held = HeldRelease(release.info.digest, release.run_id, release.round, release.info.released_at)
        self.kept += 1
        log.warning("%s: kept release %s at %s", self.device_id, release.describe(), self.path)
        return release

    # --------------------------------------------------------------------- the MQTT adapter

    def connect(self, timeout: float = 30.0) -> None:
        settings = self.broker.client_settings(f"fedmqtt-{self.topics.job}-{self.device_id}-serve", clean_start=True)
        self._conn = MqttConnection(settings, on_message=self._on_message, subscriptions=[(self.topics.release, 1)])
        self._worker = threading.Thread(target=self._work, name="fedmqtt-serve", daemon=True)
        self._worker.start()
        self._conn.connect(timeout=timeout)
        log.info("%s: serving the releases of job %s at %s", self.device_id, self.topics.job, self.path)

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        if topic != self.topics.release:
            return
        with self._cond:
            self._latest = payload
            self._arrived_at = time.monotonic()
            self._cond.notify_all()

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._latest is not None or self._stop.is_set(), timeout=0.5)
                frame, self._latest = self._latest, None
                self._busy = frame is not None
            if frame is None:
                continue
            try:
                self.handle(frame)
            except Exception:  # nothing a release holds may end the process
                log.exception("%s: a release could not be handled; the model held stays", self.device_id)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def wait_idle(self, quiet: float = 2.0, timeout: float = 30.0) -> None:
        """Return once no release is pending or being handled and none arrived for ``quiet`` seconds (at most
        ``timeout``): a device that exits when its job ends first keeps the release the job ended with."""
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while time.monotonic() < deadline:
                last = max(self._arrived_at, start)
                if self._latest is None and not self._busy and time.monotonic() - last >= quiet:
                    return
                self._cond.wait(timeout=0.1)

    def run_until_stopped(self) -> None:
        """``--serve-only``: serve until :meth:`stop` (a signal)."""
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Safe from a signal handler: the worker ends at its next check."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
