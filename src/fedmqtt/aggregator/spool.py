"""What an aggregator worker keeps on disk: the update frames it accepted, per run, round and attempt.

::

    SPOOL_DIR/
      RUN/ROUND-ATTEMPT/DEVICE.frame   an accepted update, written (atomically, fsynced) before it is acknowledged
      plan.json, manifest.json         the last plan and the global model's tensor list: a restarted worker checks
                                       the updates its broker session queued before the retained ones arrive again

``RUN`` is the plan's run id (``_`` for a plan without one). A worker restarted with the same ``--spool`` answers
a collect request for the updates it acknowledged before it died. Folders of other rounds are removed once a
later plan shows their round is done. (The coordinator's :class:`fedmqtt.coordinator.durability.Durability` keys
its spool by round and attempt only, beside a checkpoint; a worker has no checkpoint and must not mix runs.)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fedmqtt.atomic import write_atomic
from fedmqtt.errors import FedmqttError
from fedmqtt.topics import validate_id

FRAME_SUFFIX = ".frame"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
_NO_RUN = "_"


def _is_id(name: str) -> bool:
    """A device id (the one identifier rule of fedmqtt.topics): safe as a file name, never a path."""
    try:
        validate_id("device id", name)
    except FedmqttError:
        return False
    return True


@dataclass(frozen=True, order=True)
class BucketKey:
    """One attempt of one round of one run: the unit a plan opens and a collect request closes."""

    run_id: str | None
    round: int
    attempt: int

    def __str__(self) -> str:
        return f"run {self.run_id or '-'} round {self.round} attempt {self.attempt}"


class WorkerSpool:
    """The spool directory of one worker."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, key: BucketKey) -> Path:
        return self.root / (key.run_id or _NO_RUN) / f"{key.round}-{key.attempt}"

    def put(self, key: BucketKey, device: str, payload: bytes) -> None:
        if not _is_id(device):  # the topic's device id, checked by the caller: never a path
            raise ValueError(f"not a device id: {device!r}")
        write_atomic(self.folder(key) / f"{device}{FRAME_SUFFIX}", payload)

    def get(self, key: BucketKey, device: str) -> bytes | None:
        if not _is_id(device):
            return None
        try:
            return (self.folder(key) / f"{device}{FRAME_SUFFIX}").read_bytes()
        except FileNotFoundError:
            return None

    def devices(self, key: BucketKey) -> list[str]:
        """The devices whose updates this attempt holds, sorted."""
        folder = self.folder(key)
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob(f"*{FRAME_SUFFIX}") if _is_id(p.stem))

    def save(self, name: str, payload: bytes) -> None:
        """Keep a small state file (``plan.json``, ``manifest.json``) beside the attempts' folders."""
        write_atomic(self.root / name, payload)

    def load(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except OSError:
            return None

    def keep_only(self, key: BucketKey | None) -> None:
        """Remove every attempt's folder but ``key``'s (None: all of them, and the state files)."""
        if not self.root.is_dir():
            return
        keep = self.folder(key) if key is not None else None
        for run in self.root.iterdir():
            if not run.is_dir():
                continue
            for attempt in run.iterdir():
                if attempt != keep:
                    shutil.rmtree(attempt, ignore_errors=True)
            if keep is None or keep.parent != run:
                shutil.rmtree(run, ignore_errors=True)
        if key is None:
            for name in (PLAN_FILE, MANIFEST_FILE):
                (self.root / name).unlink(missing_ok=True)
