"""fedmqtt.atomic: the one temp-file-then-rename writer (checkpoints, spool, ledger, broker files, downloads)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmqtt.atomic import PRIVATE, PUBLIC, atomic_file, fsync_directory, write_atomic
from fedmqtt.broker.accounts import write_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_writes_bytes_with_the_mode_asked_for(tmp_path: Path) -> None:
    private = tmp_path / "deep" / "er" / "secret"
    write_atomic(private, b"s3cret")
    assert private.read_bytes() == b"s3cret" and _mode(private) == PRIVATE
    public = tmp_path / "data.gz"
    old_umask = os.umask(0o077)  # the mode is exact, whatever the umask
    try:
        write_atomic(public, b"x" * 10, mode=PUBLIC)
    finally:
        os.umask(old_umask)
    assert _mode(public) == PUBLIC
    write_atomic(public, b"new", mode=PUBLIC)  # replaces
    assert public.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.gz", "deep"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="cut"), atomic_file(path) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("cut")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_write_private_is_atomic_and_0600(tmp_path: Path) -> None:
    path = tmp_path / "mosquitto.conf"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    write_private(path, "listener 1883\n")
    assert path.read_text() == "listener 1883\n" and _mode(path) == 0o600


def test_fsync_directory_needs_a_directory(tmp_path: Path) -> None:
    fsync_directory(tmp_path)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsync_directory(tmp_path / "f")


_WRITER = """
import sys
from pathlib import Path
from fedmqtt.atomic import write_atomic
path = Path(sys.argv[1])
i = 0
while True:
    i += 1
    write_atomic(path, bytes([i % 251]) * 200_000)
"""


def test_readers_never_see_a_torn_file_even_when_the_writer_is_killed(tmp_path: Path) -> None:
    """A real process rewrites a file in a loop and is killed with SIGKILL: every read, before and after,
    sees one whole version (200,000 equal bytes)."""
    path = tmp_path / "state"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)])
    try:
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        reads = 0
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            data = path.read_bytes()
            assert len(data) == 200_000 and data == data[:1] * 200_000
            reads += 1
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    finally:
        if writer.poll() is None:
            writer.kill()
    data = path.read_bytes()
    assert reads > 10 and len(data) == 200_000 and data == data[:1] * 200_000
