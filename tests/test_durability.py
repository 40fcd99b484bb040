"""coordinator.durability: checkpoint, spool, replay marker and quarantine on a real directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmqtt.checkpoint import CheckpointError
from fedmqtt.coordinator.durability import QUARANTINE_DIR, REPLAY_MARKER, SPOOL_DIR, Durability


def test_without_a_directory_nothing_is_written_and_nothing_replayed() -> None:
    files = Durability(None)
    assert not files.enabled and not files.has_checkpoint()
    files.save({"x": 1})
    files.spool(1, 0, "d1", b"frame")
    files.clear_spool()
    assert list(files.replay(1, 0)) == []
    assert files.last_replay_culprit(1, 0) is None
    assert files.quarantine("d1", b"frame", "why", round=1, attempt=0, now=1.0) is None


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    files = Durability(tmp_path / "ckpt")
    assert not files.has_checkpoint()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        files.load()
    files.save({"round": 2, "global": {"w": np.ones(3, np.float32)}})
    assert files.has_checkpoint() and files.load()["round"] == 2


def test_spool_replay_names_each_frame_while_it_is_handled(tmp_path: Path) -> None:
    files = Durability(tmp_path)
    files.spool(2, 1, "d2", b"two")
    files.spool(2, 1, "d1", b"one")
    files.spool(2, 0, "d9", b"other attempt")
    assert files.spooled(2, 1, "d1") == b"one"
    marker = tmp_path / SPOOL_DIR / REPLAY_MARKER
    seen = []
    for device, payload in files.replay(2, 1):
        seen.append((device, payload, marker.read_text()))
    assert seen == [("d1", b"one", "d1.frame"), ("d2", b"two", "d2.frame")]
    assert not marker.exists()
    files.clear_spool()
    assert not (tmp_path / SPOOL_DIR).exists()


def test_the_frame_a_replay_died_on_is_named_once_and_then_quarantined(tmp_path: Path) -> None:
    files = Durability(tmp_path)
    files.spool(1, 0, "d1", b"poison")
    files.spool(1, 0, "d2", b"fine")
    replay = files.replay(1, 0)
    next(replay)  # the process "dies" while handling d1: the marker stays behind
    del replay
    marker = tmp_path / SPOOL_DIR / REPLAY_MARKER
    marker.write_text("d1.frame")
    assert files.last_replay_culprit(1, 0) == ("d1", b"poison")
    assert not marker.exists() and files.last_replay_culprit(1, 0) is None
    where = files.quarantine("d1", b"poison", "ended the coordinator", round=1, attempt=0, now=12.345)
    assert where == tmp_path / QUARANTINE_DIR / "1-0-d1-12345.frame" and where.read_bytes() == b"poison"
    assert where.with_suffix(".txt").read_text() == "ended the coordinator\n"
    assert [d for d, _ in files.replay(1, 0)] == ["d2"]  # never replayed again


def test_a_marker_naming_anything_but_a_frame_of_the_open_attempt_is_ignored(tmp_path: Path) -> None:
    files = Durability(tmp_path)
    files.spool(1, 0, "d1", b"x")
    outside = tmp_path / "secret.frame"
    outside.write_bytes(b"not a spooled frame")
    marker = tmp_path / SPOOL_DIR / REPLAY_MARKER
    for name in ("../../secret.frame", "d9.frame", "d1.txt", ""):
        marker.write_text(name)
        assert files.last_replay_culprit(1, 0) is None, name
        assert not marker.exists()


def test_quarantine_keeps_a_different_spooled_frame(tmp_path: Path) -> None:
    files = Durability(tmp_path)
    files.spool(1, 0, "d1", b"accepted earlier")
    files.quarantine("d1", b"a later, broken one", "why", round=1, attempt=0, now=1.0)
    assert files.spooled(1, 0, "d1") == b"accepted earlier"
