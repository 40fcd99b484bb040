"""What the coordinator keeps on disk under ``--checkpoint-dir``: checkpoint, spool, quarantine, replay marker.

::

    CHECKPOINT_DIR/
      coordinator.npz            the job's state after the last round opened or closed (fedmqtt.checkpoint)
      spool/ROUND-ATTEMPT/D.frame every update accepted in the open attempt, written before it is acknowledged
      spool/replaying            names the spooled frame being replayed on --resume (a crash leaves it behind)
      in-hand                    the digest of the update being handled live (a crash leaves it behind)
      quarantine/STAMP.frame     frames that broke the coordinator, never replayed, with STAMP.txt saying why

Every file is written atomically and durably (:mod:`fedmqtt.atomic`). No network and no job logic: the service
decides when to spool, replay, quarantine and checkpoint; :class:`Durability` only knows where and how. Without a
directory (no ``--checkpoint-dir``) every write is a no-op and there is nothing to replay.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmqtt.atomic import write_atomic
from fedmqtt.checkpoint import load_state, save_state

CHECKPOINT_FILE = "coordinator.npz"
SPOOL_DIR = "spool"
QUARANTINE_DIR = "quarantine"
# Names the spooled frame being replayed: found at start-up, it is the frame that ended the last process.
REPLAY_MARKER = "replaying"
# The digest of the update being handled live: found at start-up, the broker will deliver that update again (it was
# never acknowledged), and it is refused instead of ending this process too.
IN_HAND_MARKER = "in-hand"
FRAME_SUFFIX = ".frame"


class Durability:
    """The coordinator's checkpoint directory (or none)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _dir(self) -> Path:
        if self.directory is None:
            raise RuntimeError("this coordinator has no --checkpoint-dir")
        return self.directory

    # ------------------------------------------------------------------------------------ checkpoint

    @property
    def checkpoint_path(self) -> Path:
        return self._dir() / CHECKPOINT_FILE

    def has_checkpoint(self) -> bool:
        return self.directory is not None and self.checkpoint_path.exists()

    def save(self, state: dict[str, Any]) -> None:
        """Write the checkpoint (no-op without a directory)."""
        if self.directory is not None:
            save_state(self.checkpoint_path, state)

    def load(self) -> dict[str, Any]:
        """Read the checkpoint; raises :class:`fedmqtt.checkpoint.CheckpointError` if missing or unreadable."""
        return load_state(self.checkpoint_path)

    # ------------------------------------------------------------------------------------ spool

    @property
    def spool_root(self) -> Path:
        return self._dir() / SPOOL_DIR

    def spool_folder(self, round: int, attempt: int) -> Path:
        return self.spool_root / f"{round}-{attempt}"

    def spool(self, round: int, attempt: int, device: str, payload: bytes) -> None:
        """Keep an accepted update's frame until a checkpoint records its round as closed."""
        if self.directory is not None:
            write_atomic(self.spool_folder(round, attempt) / f"{device}{FRAME_SUFFIX}", payload)

    def spooled(self, round: int, attempt: int, device: str) -> bytes:
        """The spooled frame of ``device`` (raises ``OSError`` if there is none)."""
        return (self.spool_folder(round, attempt) / f"{device}{FRAME_SUFFIX}").read_bytes()

    def clear_spool(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.spool_root, ignore_errors=True)

    # ------------------------------------------------------------------------------------ replay

    def last_replay_culprit(self, round: int, attempt: int) -> tuple[str, bytes] | None:
        """The spooled frame (device, payload) that a replay marker names: the last process ended while
        replaying it, so replaying it again would end this one too (a poison pill). The marker is removed; the
        frame stays until :meth:`quarantine` moves it."""
        if self.directory is None:
            return None
        marker = self.spool_root / REPLAY_MARKER
        if not marker.exists():
            return None
        folder = self.spool_folder(round, attempt)
        culprit = folder / marker.read_text().strip()
        marker.unlink(missing_ok=True)
        if culprit.suffix != FRAME_SUFFIX or culprit.parent != folder or not culprit.is_file():
            return None
        return culprit.stem, culprit.read_bytes()

    def replay(self, round: int, attempt: int) -> Iterator[tuple[str, bytes]]:
        """The spooled frames of an attempt as (device, payload), in device order. The replay marker names each
        frame while the caller handles it and is removed once all are handled."""
        if self.directory is None:
            return
        folder = self.spool_folder(round, attempt)
        marker = self.spool_root / REPLAY_MARKER
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{FRAME_SUFFIX}")):
                write_atomic(marker, path.name.encode())
                yield path.stem, path.read_bytes()
        marker.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------ live updates in hand

    def hold(self, digest: str) -> None:
        """Note the update about to be handled. Not fsynced: it guards against the process dying (the page cache
        survives that), and costs one small write per update."""
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / IN_HAND_MARKER).write_text(digest)

    def release(self) -> None:
        if self.directory is not None:
            (self.directory / IN_HAND_MARKER).unlink(missing_ok=True)

    def take_in_hand(self) -> str | None:
        """The digest of the update the last process was handling when it ended (None if it ended cleanly)."""
        if self.directory is None:
            return None
        marker = self.directory / IN_HAND_MARKER
        if not marker.is_file():
            return None
        digest = marker.read_text().strip()
        marker.unlink(missing_ok=True)
        return digest or None

    # ------------------------------------------------------------------------------------ quarantine

    def quarantine(
        self, device: str, payload: bytes, reason: str, *, round: int, attempt: int, now: float
    ) -> Path | None:
        """Keep a frame that broke the coordinator (with why) where it is never replayed; drop its spooled
        copy. Returns the quarantined file, ``ROUND-ATTEMPT-DEVICE-MILLISECONDS.frame`` (None without a
        directory)."""
        if self.directory is None:
            return None
        folder = self.directory / QUARANTINE_DIR
        stamp = f"{round}-{attempt}-{device}-{int(now * 1000)}"
        target = folder / f"{stamp}{FRAME_SUFFIX}"
        write_atomic(target, payload)
        write_atomic(folder / f"{stamp}.txt", (reason + "\n").encode())
        spooled = self.spool_folder(round, attempt) / f"{device}{FRAME_SUFFIX}"
        if spooled.exists() and spooled.read_bytes() == payload:
            spooled.unlink()
        return target
