"""Releases: the model a job ends with, published on the retained topic ``PREFIX/JOB/release`` for the devices.

The pure core of both ends (no network): :func:`encode_release` builds the frame (``FrameKind.RELEASE``, the
tensors in float32, lossless, and a header whose :class:`~fedmqtt.schema.ReleaseInfo` gives the digest of the
tensors, the accuracy and loss the model reached, and when it was released); :func:`read_release` verifies one
that came from the network (frame checks, kind, job, model name and manifest, digest, date) and :func:`compare`
says whether it is newer than the release a device holds. ``fedmqtt device --serve`` (fedmqtt.device.serve) keeps
the newest one as a model file (fedmqtt.model_file) at ``SERVE_DIR/model.fedmodel``, where ``fedmqtt predict``
reads it; ``fedmqtt release`` publishes a model file by hand.

Order of releases: a device never goes back. Within one run a later round is newer; across runs (and for releases
by hand) a later ``released_at`` (the releasing clock) is newer; the same digest is the model already held. A
release dated more than :data:`MAX_CLOCK_SKEW_S` ahead of the device's clock is refused, so a hostile one cannot
pin a device to itself forever.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmqtt.arrays import ModelArrays
from fedmqtt.codecs import decode_frame, encode_frame, model_hash, peek_header
from fedmqtt.codecs import errors as codec_errors
from fedmqtt.codecs.downlink import arrays_digest
from fedmqtt.errors import FedmqttError
from fedmqtt.model_file import ModelFile
from fedmqtt.schema import CodecSpec, FrameKind, ReleaseInfo

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "SERVE_FILE",
    "HeldRelease",
    "RefusedBecause",
    "Release",
    "ReleaseRefused",
    "compare",
    "encode_release",
    "held_release",
    "read_release",
    "release_meta",
    "serve_path",
]

SERVE_FILE = "model.fedmodel"  # the stable name ``--serve`` keeps the released model under
MAX_CLOCK_SKEW_S = 3600.0
RELEASE_CODEC = CodecSpec()  # float32 + zstd: the released tensors arrive bit for bit
_META_SOURCE = "release"  # a model file's meta["source"] when --serve wrote it


def serve_path(serve_dir: Path) -> Path:
    """Where ``fedmqtt device --serve --serve-dir DIR`` keeps the released model (``DIR/model.fedmodel``)."""
    return Path(serve_dir) / SERVE_FILE


class RefusedBecause(StrEnum):
    """Why a device refused a release (counted per reason by fedmqtt.device.serve)."""

    MALFORMED = "malformed"  # not a readable frame, or a frame without release information
    WRONG_KIND = "wrong_kind"  # a frame of another kind (a global model, an update) on the release topic
    WRONG_JOB = "wrong_job"
    UNKNOWN_MODEL = "unknown_model"  # a model name this fedmqtt does not know
    OTHER_MODEL = "other_model"  # not the model this device serves (--serve-model)
    MANIFEST = "manifest_mismatch"  # tensors that do not fit the named model
    DIGEST = "digest_mismatch"  # tensors that differ from the digest the header states
    FUTURE = "from_the_future"  # released_at far ahead of the device's clock
    OLDER = "older"  # older than the release the device holds


class ReleaseRefused(FedmqttError):
    """A release from the network that a device does not keep; ``reason`` says why (one of :class:`RefusedBecause`)."""

    def __init__(self, reason: RefusedBecause, detail: str) -> None:
        super().__init__(f"release refused ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Release:
    """A verified release: the model, its tensors (in the model's order) and what the frame said of them."""

    job: str
    model: str
    round: int
    run_id: str | None
    info: ReleaseInfo
    arrays: ModelArrays
    frame_hash: str  # sha256 of the whole frame

    def describe(self) -> str:
        accuracy = f"accuracy {self.info.accuracy:.4f}" if self.info.accuracy is not None else "not evaluated"
        run = f"run {self.run_id}" if self.run_id else "by hand" if self.info.source == "file" else "no run id"
        return f"{self.model} of job {self.job} round {self.round} ({run}, {accuracy}, digest {self.info.digest[:12]})"


@dataclass(frozen=True)
class HeldRelease:
    """What a device needs to know of the release it holds to order a new one."""

    digest: str
    run_id: str | None
    round: int
    released_at: float


def encode_release(
    arrays: Mapping[str, np.ndarray],
    *,
    model: str,
    job: str,
    round: int,
    sender: str,
    released_at: float,
    run_id: str | None = None,
    accuracy: float | None = None,
    loss: float | None = None,
    num_classes: int = 10,
    evaluated_model: str | None = None,
    source: Literal["job", "file"] = "job",
) -> bytes:
    """The release frame of ``arrays`` (float32 tensors in the model's order)."""
    tensors = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in arrays.items()}
    info = ReleaseInfo(
        digest=arrays_digest(tensors),
        num_classes=num_classes,
        accuracy=accuracy,
        loss=loss,
        released_at=released_at,
        evaluated_model=evaluated_model,
        source=source,
    )
    return encode_frame(
        tensors,
        kind=FrameKind.RELEASE,
        job=job,
        round=round,
        sender=sender,
        codec=RELEASE_CODEC,
        model_name=model,
        run_id=run_id,
        release=info,
    )


def read_release(frame: bytes, *, job: str, now: float, model: str | None = None) -> Release:
    """Verify a release frame from the network; raise :class:`ReleaseRefused` naming the first problem.

    Checked, in order: the frame's prefix and header; its kind and job; that it names a model this fedmqtt knows
    (and ``model``, when the device serves one model only); the tensors against that model's manifest (before the
    body is decompressed, which is bounded by the model's own size); the body checksum; the tensors' digest
    against the header's; ``released_at`` not more than :data:`MAX_CLOCK_SKEW_S` ahead of ``now``.
    """
    from fedmqtt.models import MODEL_NAMES, model_manifest

    if not frame:
        raise ReleaseRefused(RefusedBecause.MALFORMED, "the release was cleared (an empty retained message)")
    try:
        header = peek_header(frame)
    except codec_errors.FrameError as exc:
        raise ReleaseRefused(RefusedBecause.MALFORMED, str(exc)) from None
    if header.kind is not FrameKind.RELEASE:
        raise ReleaseRefused(RefusedBecause.WRONG_KIND, f"a {header.kind.value} frame, not a release")
    if header.job != job:
        raise ReleaseRefused(RefusedBecause.WRONG_JOB, f"the frame is of job {header.job!r}, not {job!r}")
    info = header.release
    if info is None:
        raise ReleaseRefused(RefusedBecause.MALFORMED, "the frame's header has no release information")
    name = header.model_name
    if name not in MODEL_NAMES:
        raise ReleaseRefused(
            RefusedBecause.UNKNOWN_MODEL, f"model {name!r} is unknown here; this fedmqtt knows {', '.join(MODEL_NAMES)}"
        )
    assert name is not None
    if model is not None and name != model:
        raise ReleaseRefused(RefusedBecause.OTHER_MODEL, f"a {name!r} model; this device serves {model!r}")
    manifest = model_manifest(name, num_classes=info.num_classes)
    limit = max(4 * sum(entry.numel for entry in manifest), 1)
    try:
        decoded = decode_frame(frame, expected_manifest=manifest, max_body_bytes=limit)
    except codec_errors.ManifestMismatch as exc:
        raise ReleaseRefused(RefusedBecause.MANIFEST, f"its tensors do not fit {name}: {exc}") from None
    except codec_errors.FrameError as exc:
        raise ReleaseRefused(RefusedBecause.MALFORMED, str(exc)) from None
    digest = arrays_digest(decoded.arrays)
    if digest != info.digest:
        raise ReleaseRefused(
            RefusedBecause.DIGEST, f"its tensors' digest is {digest[:12]}…, the header states {info.digest[:12]}…"
        )
    if info.released_at > now + MAX_CLOCK_SKEW_S:
        raise ReleaseRefused(
            RefusedBecause.FUTURE,
            f"released at {info.released_at:.0f}, more than {MAX_CLOCK_SKEW_S:.0f} s after this device's clock "
            f"({now:.0f}); check the clocks",
        )
    return Release(
        job=header.job,
        model=name,
        round=header.round,
        run_id=header.run_id,
        info=info,
        arrays=decoded.arrays,
        frame_hash=model_hash(frame),
    )


Order = Literal["newer", "same", "older"]


def compare(release: Release, held: HeldRelease | None) -> Order:
    """Whether ``release`` is newer than the release a device holds, the same model, or older."""
    if held is None:
        return "newer"
    if release.info.digest == held.digest:
        return "same"
    if release.run_id is not None and release.run_id == held.run_id and release.round != held.round:
        return "newer" if release.round > held.round else "older"
    return "newer" if release.info.released_at > held.released_at else "older"


def release_meta(release: Release) -> dict[str, Any]:
    """The model file's metadata for a kept release (read back by :func:`held_release`)."""
    info = release.info
    return {
        "source": _META_SOURCE,
        "job": release.job,
        "run_id": release.run_id,
        "round": release.round,
        "accuracy": info.accuracy,
        "loss": info.loss,
        "released_at": info.released_at,
        "evaluated_model": info.evaluated_model,
        "release_source": info.source,
        "frame_sha256": release.frame_hash,
    }


def held_release(model_file: ModelFile) -> HeldRelease | None:
    """The release a model file written by ``--serve`` holds (None for a model file from elsewhere)."""
    meta = model_file.meta
    if meta.get("source") != _META_SOURCE:
        return None
    round_number, released_at, run_id = meta.get("round"), meta.get("released_at"), meta.get("run_id")
    if not isinstance(round_number, int) or not isinstance(released_at, int | float):
        return None
    return HeldRelease(
        digest=model_file.digest,
        run_id=run_id if isinstance(run_id, str) else None,
        round=round_number,
        released_at=float(released_at),
    )


# ---------------------------------------------------------------------------------------------------
# ``fedmqtt release``: publish a model file as the job's release, by hand
# ---------------------------------------------------------------------------------------------------

RELEASE_SENDER = "release"


def register(subparsers: Any) -> None:
    from fedmqtt.mqtt.settings import add_broker_flags
    from fedmqtt.topics import DEFAULT_PREFIX

    p = subparsers.add_parser(
        "release",
        help="publish a model file as a job's release (what `fedmqtt device --serve` keeps)",
        description="Publish a model file (fedmqtt's own format: `fedmqtt pretrain`, `fedmqtt export --format state`, "
        "or a file `fedmqtt device --serve` kept) on the retained topic PREFIX/JOB/release. Devices serving the job "
        "take it when it is newer than what they hold (it is dated now), e.g. to roll back to an earlier model. The "
        "coordinator releases its final model by itself when a job ends. With auth on, use the coordinator's account: "
        "only it may write the release topic.",
    )
    add_broker_flags(p.add_argument_group("broker"), broker_required=True)
    p.add_argument("--job", required=True, help="job id (one topic level) (required)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default: %(default)s)")
    p.add_argument("--model-file", type=Path, required=True, help="the model file to release (required)")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.set_defaults(func=run_release)


def run_release(args: argparse.Namespace) -> int:
    from fedmqtt.errors import ConfigError
    from fedmqtt.model_file import ModelFileError, check_model, load_model_file
    from fedmqtt.mqtt import MqttConnection
    from fedmqtt.mqtt.settings import broker_settings_from_args
    from fedmqtt.paths import require_input_file
    from fedmqtt.topics import Topics

    broker = broker_settings_from_args(args)
    topics = Topics(job=args.job, prefix=args.prefix)
    require_input_file("--model-file", args.model_file)
    try:
        model_file = load_model_file(args.model_file)
        arrays = check_model(model_file, model_file.model, path=args.model_file, num_classes=model_file.num_classes)
    except ModelFileError as exc:
        raise ConfigError("--model-file", str(exc)) from None
    meta = model_file.meta
    accuracy, loss = meta.get("accuracy"), meta.get("loss")
    frame = encode_release(
        arrays,
        model=model_file.model,
        job=args.job,
        round=int(meta["round"]) if isinstance(meta.get("round"), int) and meta["round"] >= 0 else 0,
        sender=RELEASE_SENDER,
        released_at=time.time(),
        accuracy=float(accuracy) if isinstance(accuracy, int | float) and 0.0 <= accuracy <= 1.0 else None,
        loss=float(loss) if isinstance(loss, int | float) and 0.0 <= loss < float("inf") else None,
        num_classes=model_file.num_classes,
        source="file",
    )
    conn = MqttConnection(broker.client_settings(f"fedmqtt-release-{args.job}-{int(time.time())}", clean_start=True))
    conn.connect(timeout=args.connect_timeout)
    try:
        conn.publish(topics.release, frame, qos=1, retain=True, timeout=args.connect_timeout)
    finally:
        conn.close()
    print(f"released {args.model_file} ({model_file.model}, digest {model_file.digest[:12]}) on {topics.release}")
    return 0
