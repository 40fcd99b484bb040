"""Releases, the pure core (fedmqtt.release) and the server's step (ReleaseServer.handle, no broker): round trip,
every refusal, the order of releases (never backwards), the model file kept and kept unchanged on refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.codecs import encode_frame
from fedmqtt.codecs.downlink import arrays_digest
from fedmqtt.device.serve import ReleaseServer
from fedmqtt.model_file import load_model_file, save_model_file
from fedmqtt.models import build_model, get_arrays
from fedmqtt.mqtt import BrokerSettings
from fedmqtt.release import (
    MAX_CLOCK_SKEW_S,
    HeldRelease,
    RefusedBecause,
    ReleaseRefused,
    compare,
    encode_release,
    held_release,
    read_release,
    serve_path,
)
from fedmqtt.schema import CodecSpec, FrameKind, ReleaseInfo

JOB = "cam"
NOW = 1_800_000_000.0
RUN_A, RUN_B = "a" * 16, "b" * 16


def _arrays(seed: int = 1, model: str = "mlp") -> dict[str, np.ndarray]:
    return get_arrays(build_model(model, seed=seed))


def _release(seed: int = 1, *, round: int = 3, run_id: str | None = RUN_A, at: float = NOW - 10, **kw: object) -> bytes:
    fields: dict[str, object] = {"model": "mlp", "job": JOB, "accuracy": 0.91, "loss": 0.3} | kw
    return encode_release(
        _arrays(seed),
        round=round,
        sender="coordinator",
        released_at=at,
        run_id=run_id,
        **fields,  # type: ignore[arg-type]
    )


def _refusal(frame: bytes, **kw: object) -> RefusedBecause:
    with pytest.raises(ReleaseRefused) as info:
        read_release(frame, job=kw.pop("job", JOB), now=NOW, **kw)  # type: ignore[arg-type]
    assert info.value.detail in str(info.value)
    return info.value.reason


def test_a_release_round_trips_bit_for_bit_with_its_digest_and_accuracy() -> None:
    arrays = _arrays(1)
    release = read_release(_release(1), job=JOB, now=NOW)
    assert release.model == "mlp" and release.round == 3 and release.run_id == RUN_A
    assert list(release.arrays) == list(arrays)
    assert all(np.array_equal(release.arrays[k], arrays[k]) for k in arrays)
    assert release.info.digest == arrays_digest(arrays)
    assert (release.info.accuracy, release.info.loss, release.info.source) == (0.91, 0.3, "job")
    assert read_release(_release(1), job=JOB, now=NOW, model="mlp").info.digest == release.info.digest


def _forged_digest() -> bytes:
    info = ReleaseInfo(digest="0" * 64, released_at=NOW - 10)
    return encode_frame(_arrays(1), kind=FrameKind.RELEASE, job=JOB, round=3, sender="x", codec=CodecSpec(),
                        model_name="mlp", release=info)  # fmt: skip


def test_every_broken_or_foreign_release_is_refused_with_its_reason() -> None:
    frame = _release(1)
    model_frame = encode_frame(_arrays(1), kind=FrameKind.GLOBAL_MODEL, job=JOB, round=3, sender="c",
                               codec=CodecSpec(), model_name="mlp")  # fmt: skip
    no_info = encode_frame(_arrays(1), kind=FrameKind.RELEASE, job=JOB, round=3, sender="c", codec=CodecSpec(),
                           model_name="mlp")  # fmt: skip
    cnn_named_mlp = encode_release(_arrays(1, "cnn"), model="mlp", job=JOB, round=1, sender="c", released_at=NOW)
    cut = bytearray(frame)
    cut[-20] ^= 0xFF  # a flipped body byte
    assert _refusal(b"") is RefusedBecause.MALFORMED
    assert _refusal(b"garbage, not a frame") is RefusedBecause.MALFORMED
    assert _refusal(frame[: len(frame) // 2]) is RefusedBecause.MALFORMED
    assert _refusal(bytes(cut)) is RefusedBecause.MALFORMED
    assert _refusal(no_info) is RefusedBecause.MALFORMED
    assert _refusal(model_frame) is RefusedBecause.WRONG_KIND
    assert _refusal(frame, job="other") is RefusedBecause.WRONG_JOB
    assert _refusal(_release(1, model="resnet-9000")) is RefusedBecause.UNKNOWN_MODEL
    assert _refusal(frame, model="cnn") is RefusedBecause.OTHER_MODEL
    assert _refusal(cnn_named_mlp) is RefusedBecause.MANIFEST
    assert _refusal(_forged_digest()) is RefusedBecause.DIGEST
    assert _refusal(_release(1, at=NOW + MAX_CLOCK_SKEW_S + 60)) is RefusedBecause.FUTURE


def _held(frame: bytes) -> HeldRelease:
    r = read_release(frame, job=JOB, now=NOW)
    return HeldRelease(r.info.digest, r.run_id, r.round, r.info.released_at)


def test_order_same_run_by_round_other_runs_by_time_same_digest_is_same() -> None:
    r3 = read_release(_release(1, round=3, at=NOW - 100), job=JOB, now=NOW)
    r5 = read_release(_release(2, round=5, at=NOW - 200), job=JOB, now=NOW)  # clocks differ: the round decides
    other_run = read_release(_release(3, round=1, run_id=RUN_B, at=NOW - 50), job=JOB, now=NOW)
    by_hand = read_release(_release(4, round=0, run_id=None, at=NOW - 150, source="file"), job=JOB, now=NOW)
    assert compare(r3, None) == "newer"
    assert compare(r5, _held(_release(1, round=3, at=NOW - 100))) == "newer"
    assert compare(r3, _held(_release(2, round=5, at=NOW - 200))) == "older"
    assert compare(other_run, _held(_release(2, round=5, at=NOW - 200))) == "newer"
    assert compare(by_hand, _held(_release(3, round=1, run_id=RUN_B, at=NOW - 50))) == "older"
    assert compare(r3, _held(_release(1, round=9, run_id=RUN_B, at=NOW))) == "same"


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(st.sampled_from([RUN_A, RUN_B, None]), st.integers(0, 5), st.integers(0, 5)),
    st.tuples(st.sampled_from([RUN_A, RUN_B, None]), st.integers(0, 5), st.integers(0, 5)),
)
def test_of_two_different_releases_at_most_one_is_newer_than_the_other(
    a: tuple[str | None, int, int], b: tuple[str | None, int, int]
) -> None:
    """A device holding either never takes the other and then the first again: no going back and forth."""
    from fedmqtt.release import Release

    def make(spec: tuple[str | None, int, int], digest: str) -> Release:
        info = ReleaseInfo(digest=digest, released_at=float(spec[2]))
        return Release(JOB, "mlp", spec[1], spec[0], info, {}, "f" * 64)

    ra, rb = make(a, "a" * 64), make(b, "b" * 64)
    a_over_b = compare(ra, HeldRelease(rb.info.digest, rb.run_id, rb.round, rb.info.released_at))
    b_over_a = compare(rb, HeldRelease(ra.info.digest, ra.run_id, ra.round, ra.info.released_at))
    assert not (a_over_b == "newer" and b_over_a == "newer")
    assert "same" not in (a_over_b, b_over_a)


def _server(tmp_path: Path, **kw: object) -> ReleaseServer:
    broker = BrokerSettings.model_validate({"broker": "mqtt://127.0.0.1:1"})  # never dialled: handle() is pure
    return ReleaseServer(broker, job=JOB, device_id="cam1", serve_dir=tmp_path, clock=lambda: NOW, **kw)  # type: ignore[arg-type]


def test_the_server_keeps_newer_releases_refuses_the_rest_and_the_file_stays_unchanged(tmp_path: Path) -> None:
    server = _server(tmp_path)
    path = serve_path(tmp_path)
    assert server.handle(_release(1, round=3)) is not None
    kept = load_model_file(path)
    assert kept.model == "mlp" and kept.digest == arrays_digest(_arrays(1))
    assert kept.meta["accuracy"] == 0.91 and kept.meta["round"] == 3 and kept.meta["run_id"] == RUN_A
    before = path.read_bytes()
    for bad in (b"garbage", _forged_digest(), _release(2, round=2), _release(3, model="cnn")):
        assert server.handle(bad) is None
        assert path.read_bytes() == before
    assert server.refused == {
        RefusedBecause.MALFORMED: 1, RefusedBecause.DIGEST: 1, RefusedBecause.OLDER: 1, RefusedBecause.MANIFEST: 1
    }  # fmt: skip
    assert server.handle(_release(1, round=3)) is None and server.kept == 1  # the model held: nothing to do
    assert server.handle(_release(4, round=4)) is not None
    assert load_model_file(path).digest == arrays_digest(_arrays(4))

    # A restart knows what it holds: an older release is still refused, a newer run's taken.
    again = _server(tmp_path)
    assert again.held is not None and again.held.round == 4
    assert again.handle(_release(2, round=2)) is None and again.refused[RefusedBecause.OLDER] == 1
    assert again.handle(_release(5, round=1, run_id=RUN_B, at=NOW)) is not None


def test_a_model_file_from_elsewhere_or_damaged_is_replaced_by_the_first_release(tmp_path: Path) -> None:
    save_model_file(serve_path(tmp_path), "mlp", _arrays(7), meta={"source": "pretrain"})
    assert held_release(load_model_file(serve_path(tmp_path))) is None
    assert _server(tmp_path).held is None
    serve_path(tmp_path).write_bytes(b"not a model file")
    server = _server(tmp_path)
    assert server.held is None
    assert server.handle(_release(1, round=1, at=NOW - 10_000)) is not None
    assert load_model_file(serve_path(tmp_path)).digest == arrays_digest(_arrays(1))


def test_serve_model_refuses_other_models(tmp_path: Path) -> None:
    server = _server(tmp_path, model="cnn")
    assert server.handle(_release(1)) is None
    assert server.refused[RefusedBecause.OTHER_MODEL] == 1 and not serve_path(tmp_path).exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--serve-only", "--serve-model", "resnet"], "--serve-model: unknown model 'resnet'"),
        (["--serve-dir", "x"], "--serve-dir and --serve-model go with --serve or --serve-only"),
        (["--serve-only", "--serve-dir", "TMP/file/serve"], "--serve-dir: TMP/file/serve cannot be created"),
    ],
)
def test_bad_serve_flags_are_named(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmqtt.cli import main

    (tmp_path / "file").write_text("a file, not a directory")
    flags = [flag.replace("TMP", str(tmp_path)) for flag in flags]
    assert main(["device", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--id", "cam", *flags]) == 1
    assert message.replace("TMP", str(tmp_path)) in capsys.readouterr().err


def test_release_by_hand_refuses_a_file_that_is_not_a_model_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmqtt.cli import main

    (tmp_path / "m.fedmodel").write_bytes(b"junk")
    argv = ["release", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--model-file", str(tmp_path / "m.fedmodel")]
    assert main(argv) == 1
    assert "is not readable as a fedmqtt model file" in capsys.readouterr().err
