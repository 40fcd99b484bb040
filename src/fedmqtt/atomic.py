"""Atomic file writes that survive a crash or a power cut: the one temp-file-then-rename writer of fedmqtt.

A file is written to a hidden temporary name in its own directory, flushed and fsynced, given its permission
bits, renamed over the real name, and then the directory itself is fsynced, so the rename is on the disk too
(on an SD card after a power loss, an unsynced rename can leave the old file, or none). Readers see either the
old file or the whole new one, never a torn one. Whatever goes wrong, the temporary file is removed.

Checkpoints, the coordinator's spool and quarantine, device state, the device privacy ledger, generated
Mosquitto files (mode 0600) and downloaded datasets (mode 0644) all go through :func:`atomic_file`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PRIVATE = 0o600  # only the owner reads it (secrets, state): the default
PUBLIC = 0o644  # anyone may read it (public data)


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable. A no-op where directories cannot be opened."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # not POSIX (Windows): renames are journalled by the file system
        return
    fd = os.open(directory, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without directory fsync
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path | str, *, mode: int = PRIVATE) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on a clean exit it becomes ``path``.

    ``mode``: the file's permission bits (not subject to the umask); default 0600. If the block raises, the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_atomic(path: Path | str, data: bytes, *, mode: int = PRIVATE) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_file`)."""
    with atomic_file(path, mode=mode) as handle:
        handle.write(data)
