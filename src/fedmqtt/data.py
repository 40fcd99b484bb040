"""Image data sets in IDX format (MNIST, Fashion-MNIST), and how a data set is split across devices.

Everything here is pure and synchronous: files in, tensors and index arrays out. A simulated device
trains on one part of a partition, and its process reads only its parts' images (:func:`load_parts`: all the
labels, then the wanted rows of the image file, memory-mapped or streamed from the ``.gz``); a real board trains
on all of its own data (:func:`load_dataset`, also the coordinator's test set).

The IDX reader is ours, not torchvision's: torchvision 0.29's ``read_sn3_pascalvincent_tensor`` opens
plain files only (no ``.gz``) and checks headers with ``assert``, which gives a bare ``AssertionError``
(or nothing, under ``python -O``) on a damaged file. MNIST's IDX header is eight to sixteen bytes, so a
strict reader that names the problem is short.

Where the files come from (:func:`resolve_data_dir`, used by the device, the coordinator's ``--eval-data``,
``fedmqtt simulate`` and the benchmarks): ``--data-dir``, else ``$FEDMQTT_DATA``, else the user cache
(``$XDG_CACHE_HOME/fedmqtt/<dataset>``, ``~/.cache`` by default), which :func:`download_dataset` fills with
the original gzipped IDX files (from ``$FEDMQTT_DATA_MIRROR`` if set), each checked against its published
sha256 and md5 before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import math
import os
import re
import struct
import sys
import urllib.request
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedmqtt.atomic import PUBLIC, atomic_file
from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.extras import optional, require

DATASETS = ("mnist", "fashion-mnist")
NUM_CLASSES = 10
IMAGE_SIZE = 28

# Mean and standard deviation of the training pixels (scaled to [0, 1]): the customary constants.
NORMALISATION: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
}

TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_FILES = TRAIN_FILES + TEST_FILES

# Where torchvision's own download puts the raw files (root/MNIST/raw), so such a root works too.
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

_IDX_UBYTE = 0x08

DATA_ENV = "FEDMQTT_DATA"
MIRROR_ENV = "FEDMQTT_DATA_MIRROR"


@dataclass(frozen=True)
class RemoteFile:
    """One original file as its authors published it (gzipped IDX), with its published checksums."""

    name: str
    size: int
    sha256: str
    md5: str


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set's originals can be downloaded (base URLs, tried in order) and what they must be."""

    urls: tuple[str, ...]
    files: tuple[RemoteFile, ...]


# md5: torchvision's MNIST / FashionMNIST resource lists and the Fashion-MNIST README; sha256: as recorded by
# TensorFlow Datasets, Chainer and others. ../shared/data/SOURCES.md has the provenance of the copies these
# were checked against (byte-identical to the originals).
SOURCES: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", 9912422,
                       "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                       "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile("train-labels-idx1-ubyte.gz", 28881,
                       "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                       "d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile("t10k-images-idx3-ubyte.gz", 1648877,
                       "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                       "9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", 4542,
                       "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                       "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "fashion-mnist": DatasetSource(
        urls=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", 26421880,
                       "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                       "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile("train-labels-idx1-ubyte.gz", 29515,
                       "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                       "25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile("t10k-images-idx3-ubyte.gz", 4422102,
                       "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                       "bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", 5148,
                       "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                       "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Errors (each message says what is wrong and what to do: a person at a terminal reads it)


class DatasetError(FedmqttError):
    """A data set cannot be found, downloaded or read."""


class DatasetNotFound(DatasetError):
    """The IDX files of a data set are not where fedmqtt looked, and could not be downloaded."""

    def __init__(self, dataset: str, searched: Sequence[Path], missing: Sequence[str], hint: str = "") -> None:
        where = ", ".join(str(p) for p in searched) or "(nowhere)"
        files = ", ".join(missing)
        message = (
            f"{dataset} data set not found: missing {files} (each may be gzipped, ending in .gz); "
            f"searched {where}. Put the IDX files in a directory and pass it with --data-dir, or set "
            f"${DATA_ENV} to it (a directory holding the files, or a parent holding mnist/ and "
            f"fashion-mnist/ subdirectories)."
        )
        if hint:
            message += f" {hint}"
        super().__init__(message)
        self.dataset = dataset
        self.searched = tuple(searched)
        self.missing = tuple(missing)


class DatasetDownloadFailed(DatasetNotFound):
    """No source could deliver a missing file (network errors, HTTP errors, a cut transfer)."""

    def __init__(self, dataset: str, directory: Path, missing: Sequence[str], errors: Sequence[str]) -> None:
        super().__init__(
            dataset,
            [directory],
            missing,
            hint=f"Downloading them into {directory} failed: {'; '.join(errors)}. Check the network, or set "
            f"${MIRROR_ENV} to a base URL serving <dataset>/<file>.gz (e.g. a copy of the files behind any web "
            f"server, or file:///path/to/dir).",
        )
        self.errors = tuple(errors)


class DatasetChecksumMismatch(DatasetError):
    """A downloaded file is not the published original; it was deleted, not kept."""

    def __init__(self, remote: RemoteFile, url: str, size: int, sha256: str, md5: str) -> None:
        super().__init__(
            f"{remote.name} downloaded from {url} is not the published file: sha256 {sha256}, expected "
            f"{remote.sha256} (md5 {md5}, expected {remote.md5}; {size} bytes, expected {remote.size}). "
            f"It was not kept. Use another source (${MIRROR_ENV}), or put the original files in a "
            f"directory and pass --data-dir."
        )
        self.filename = remote.name
        self.url = url
        self.expected_sha256 = remote.sha256
        self.actual_sha256 = sha256


class DatasetCorrupt(DatasetError):
    """An IDX file exists but is not a valid MNIST-style IDX file (wrong magic, truncated, bad gzip)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"{path} is not a valid IDX file: {problem}. Delete it and fetch the original file again "
            f"(or point --data-dir / ${DATA_ENV} at a good copy)."
        )
        self.path = path
        self.problem = problem


# --------------------------------------------------------------------------------------------------
# The data set


class ImageDataset:
    """Normalised images (float32, N×C×H×W) and their labels (int64, N), all in memory.

    A device's whole training set fits easily (MNIST's 60,000 images are 188 MB as float32, and a
    device holds a small part of it); holding plain tensors keeps training free of DataLoader overhead.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int = NUM_CLASSES) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a vector of {images.shape[0]} entries, got shape {tuple(labels.shape)}")
        if images.dtype != torch.float32 or labels.dtype != torch.int64:
            raise ValueError(f"images must be float32 and labels int64, got {images.dtype} and {labels.dtype}")
        self.images = images
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images of {tuple(self.images.shape[1:])}, {self.num_classes} classes)"

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageDataset:
        """The samples at ``indices`` (a copy, in that order)."""
        index = np.asarray(indices)
        if index.size == 0:
            index = index.astype(np.int64)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"indices must be a 1-D array of integers, got {index.dtype} of shape {index.shape}")
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}), got {index.min()}..{index.max()}")
        selector = torch.from_numpy(index.astype(np.int64, copy=False))
        return ImageDataset(self.images[selector], self.labels[selector], num_classes=self.num_classes)

    def label_counts(self) -> np.ndarray:
        """How many samples of each class (length ``num_classes``)."""
        return np.bincount(self.labels.numpy(), minlength=self.num_classes)


# --------------------------------------------------------------------------------------------------
# IDX files


def _check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError("dataset", f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetCorrupt(path, f"cannot decompress it ({exc})") from exc


def _idx_header(path: Path, head: bytes, ndim: int) -> tuple[tuple[int, ...], int]:
    """Shape and header size of an unsigned-byte IDX file with ``ndim`` dimensions, from ``head``: its first
    ``4 + 4 * ndim`` bytes (fewer only when the file is shorter)."""
    if len(head) < 4:
        raise DatasetCorrupt(path, f"it is {len(head)} bytes long, shorter than the 4-byte magic number")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(head[:4], "big")
    if magic != expected_magic:
        raise DatasetCorrupt(
            path,
            f"magic number is 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})",
        )
    header_size = 4 + 4 * ndim
    if len(head) < header_size:
        raise DatasetCorrupt(path, f"its header is truncated ({len(head)} of {header_size} bytes)")
    return struct.unpack(f">{ndim}I", head[4:header_size]), header_size


def _check_idx_length(path: Path, dims: tuple[int, ...], present: int) -> None:
    """``present`` bytes of data follow the header: exactly what ``dims`` promises, else DatasetCorrupt."""
    expected = math.prod(dims)
    if present < expected:
        raise DatasetCorrupt(
            path,
            f"it is truncated: the header promises {expected} bytes of data for shape {dims}, the file holds {present}",
        )
    if present > expected:
        raise DatasetCorrupt(path, f"it has {present - expected} unexpected bytes after the data")


def read_idx_file(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file (plain or gzipped) with ``ndim`` dimensions, as a uint8 array."""
    data = _read_bytes(path)
    dims, header_size = _idx_header(path, data[: 4 + 4 * ndim], ndim)
    _check_idx_length(path, dims, len(data) - header_size)
    return np.frombuffer(data, dtype=np.uint8, count=math.prod(dims), offset=header_size).reshape(dims)


_ROWS_CHUNK = 1 << 20  # bytes of a gzipped IDX file decompressed at a time when picking rows from it


@dataclass(frozen=True)
class _IdxFile:
    """An IDX file whose header was read and checked (and, for a plain file, its length): its rows not yet."""

    path: Path
    dims: tuple[int, ...]
    header_size: int

    @classmethod
    def open(cls, path: Path, ndim: int) -> _IdxFile:
        try:
            with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as stream:
                head = stream.read(4 + 4 * ndim)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DatasetCorrupt(path, f"cannot decompress it ({exc})") from exc
        dims, header_size = _idx_header(path, head, ndim)
        if path.suffix != ".gz":  # a gzipped file's length is checked while its rows stream past
            _check_idx_length(path, dims, path.stat().st_size - header_size)
        return cls(path, dims, header_size)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (sorted, distinct, in range) as a uint8 array: only those rows are ever in memory.

        A plain file is memory-mapped and the rows copied out; a gzipped one is decompressed in chunks of
        about a MiB and each chunk's wanted rows are kept, checking the whole file as the old read did.
        The caller has checked the row shape (28×28), so a chunk holds at least one row.
        """
        count, row_bytes = self.dims[0], math.prod(self.dims[1:])
        out = np.empty((rows.size, row_bytes), dtype=np.uint8)
        if self.path.suffix != ".gz":
            if rows.size and row_bytes:
                mapped = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.header_size,
                                   shape=(count, row_bytes))  # fmt: skip
                out[:] = mapped[rows]
                del mapped
            return out.reshape((rows.size, *self.dims[1:]))
        chunk_rows = max(1, _ROWS_CHUNK // max(row_bytes, 1))
        buffer = np.empty(chunk_rows * row_bytes, dtype=np.uint8)
        try:
            with gzip.open(self.path, "rb") as stream:
                stream.read(self.header_size)
                start = 0
                while start < count:
                    take = min(chunk_rows, count - start)
                    view = buffer.data[: take * row_bytes]
                    got = 0
                    while got < len(view) and (n := stream.readinto(view[got:])):
                        got += n
                    if got < len(view):
                        _check_idx_length(self.path, self.dims, start * row_bytes + got)
                    low, high = np.searchsorted(rows, (start, start + take))
                    out[low:high] = buffer[: take * row_bytes].reshape(take, row_bytes)[rows[low:high] - start]
                    start += take
                trailing = 0
                while chunk := stream.read(_ROWS_CHUNK):
                    trailing += len(chunk)
                _check_idx_length(self.path, self.dims, count * row_bytes + trailing)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DatasetCorrupt(self.path, f"cannot decompress it ({exc})") from exc
        return out.reshape((rows.size, *self.dims[1:]))


def write_idx_file(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file; gzipped (reproducibly: mtime 0) when ``path`` ends in ``.gz``."""
    values = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", (_IDX_UBYTE << 8) | values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
    payload = header + values.tobytes()
    if path.suffix == ".gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as stream:
            stream.write(payload)
        payload = buffer.getvalue()
    path.write_bytes(payload)
    return path


def _find_file(directory: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``directory`` (the plain file wins: it loads faster)."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _candidate_dirs(base: Path, dataset: str) -> list[Path]:
    return [base, base / dataset, base / _TORCHVISION_FOLDERS[dataset] / "raw"]


def _locate(base: Path, dataset: str, stems: Sequence[str]) -> list[Path] | None:
    """The files ``stems`` from the first candidate directory under ``base`` that holds them all."""
    for directory in _candidate_dirs(base, dataset):
        found = [path for path in (_find_file(directory, stem) for stem in stems) if path is not None]
        if len(found) == len(stems):
            return found
    return None


def _dir_holding(base: Path, dataset: str, stems: Sequence[str]) -> Path | None:
    found = _locate(base, dataset, stems)
    return found[0].parent if found else None


def _split_files(name: str, data_dir: str | os.PathLike[str], train: bool) -> tuple[Path, Path]:
    """The images and labels files of a split under ``data_dir`` (see :func:`load_dataset` for the layouts)."""
    _check_dataset_name(name)
    stems = TRAIN_FILES if train else TEST_FILES
    base = Path(data_dir).expanduser()
    found = _locate(base, name, stems)
    if found is None:
        raise DatasetNotFound(name, _candidate_dirs(base, name), list(stems))
    images_path, labels_path = found
    return images_path, labels_path


def _check_split(
    name: str, images_path: Path, image_dims: tuple[int, ...], labels_path: Path, labels: np.ndarray
) -> None:
    """Images of the data set's size, one label per image, labels in range: else DatasetCorrupt."""
    if image_dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetCorrupt(
            images_path, f"images are {image_dims[1]}×{image_dims[2]}, {name} has {IMAGE_SIZE}×{IMAGE_SIZE}"
        )
    if image_dims[0] != labels.shape[0]:
        raise DatasetCorrupt(
            labels_path, f"it holds {labels.shape[0]} labels but {images_path.name} holds {image_dims[0]} images"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DatasetCorrupt(labels_path, f"label {int(labels.max())} is out of range 0..{NUM_CLASSES - 1}")


def _as_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> ImageDataset:
    """uint8 images (N×28×28) and labels as an :class:`ImageDataset`, normalised with ``NORMALISATION[name]``."""
    mean, std = NORMALISATION[name]
    pixels = torch.from_numpy(images.astype(np.float32))
    pixels.div_(255.0).sub_(mean).div_(std)
    return ImageDataset(pixels.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), num_classes=NUM_CLASSES)


def load_dataset(name: str, data_dir: str | os.PathLike[str], *, train: bool) -> ImageDataset:
    """The training (``train=True``) or test split of ``name`` from ``data_dir``, all of it.

    ``data_dir`` may hold the IDX files itself, or hold them in a ``<name>/`` subdirectory (the layout
    of ``$FEDMQTT_DATA``), or be a torchvision root (``MNIST/raw``). Each file may be gzipped.
    A device that trains on a part of the split loads only that part with :func:`load_parts`.
    """
    images_path, labels_path = _split_files(name, data_dir, train)
    images = read_idx_file(images_path, 3)
    labels = read_idx_file(labels_path, 1)
    _check_split(name, images_path, images.shape, labels_path, labels)
    return _as_dataset(name, images, labels)


def load_parts(
    name: str,
    data_dir: str | os.PathLike[str],
    spec: PartitionSpec | str,
    num_parts: int,
    parts: Sequence[int],
    seed: int | None,
    *,
    train: bool = True,
) -> list[ImageDataset]:
    """Parts ``parts`` of a split cut by :func:`partition`, reading and normalising only their images.

    Each part is what ``select_part(load_dataset(name, data_dir, train=train), spec, num_parts, part, seed)``
    gives (same samples, order and values), but the whole split's images are never in memory: the labels
    (all of them: the partition needs them) are read, then only the rows of the wanted parts (see
    :meth:`_IdxFile.read_rows`). The files are checked as :func:`load_dataset` checks them.
    """
    for part in parts:
        _check_part(part, num_parts)
    images_path, labels_path = _split_files(name, data_dir, train)
    images_file = _IdxFile.open(images_path, 3)
    labels = read_idx_file(labels_path, 1)
    _check_split(name, images_path, images_file.dims, labels_path, labels)
    cut = partition(labels.astype(np.int64), spec, num_parts, seed)
    rows = np.unique(np.concatenate([cut[part] for part in parts])) if parts else np.empty(0, np.int64)
    images = images_file.read_rows(rows)
    chosen = [np.searchsorted(rows, cut[part]) for part in parts]
    return [_as_dataset(name, images[where], labels[cut[part]]) for part, where in zip(parts, chosen, strict=True)]


# --------------------------------------------------------------------------------------------------
# Where the data lives, and downloading it

Split = Literal["train", "test", "all"]
_SPLIT_STEMS: dict[str, tuple[str, ...]] = {"train": TRAIN_FILES, "test": TEST_FILES, "all": IDX_FILES}
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


def default_cache_dir(dataset: str, env: Mapping[str, str] | None = None) -> Path:
    """Where downloaded data sets live: ``$XDG_CACHE_HOME/fedmqtt/<dataset>`` (``~/.cache`` by default)."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative XDG_CACHE_HOME is invalid and ignored.
    root = Path(xdg) if xdg and Path(xdg).is_absolute() else Path(env.get("HOME") or Path.home()) / ".cache"
    return root / "fedmqtt" / dataset


def mirror_urls(dataset: str, mirror: str | None) -> tuple[str, ...]:
    """Base URLs (ending in ``/``) to fetch ``dataset``'s files from, in order.

    ``mirror`` (``$FEDMQTT_DATA_MIRROR``) replaces the defaults: a base URL under which each data set lives
    in its own directory (``MIRROR/mnist/train-images-idx3-ubyte.gz``), the layout of ``$FEDMQTT_DATA``;
    ``{dataset}`` in it is replaced instead when present (``https://host/{dataset}-files/``).
    """
    _check_dataset_name(dataset)
    if not mirror:
        return SOURCES[dataset].urls
    base = mirror.replace("{dataset}", dataset) if "{dataset}" in mirror else f"{mirror.rstrip('/')}/{dataset}"
    return (base.rstrip("/") + "/",)


def _missing(directory: Path, stems: Sequence[str]) -> list[str]:
    return [stem for stem in stems if _find_file(directory, stem) is None]


@contextlib.contextmanager
def _download_lock(directory: Path) -> Iterator[None]:
    """One downloader per cache directory at a time (other processes wait, then find the files there)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: every file still lands atomically, at worst downloaded twice
        yield
        return
    with open(directory / ".download.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch(url: str, remote: RemoteFile, directory: Path, progress: Any) -> Path:
    """Download ``url`` to a temporary name in ``directory``, check it, then rename it to ``remote.name``.

    Whatever goes wrong (a cut transfer, a wrong digest, Ctrl-C), the temporary file is removed: only a
    verified file ever carries the real name.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "fedmqtt (dataset download)"})
    final = directory / remote.name
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    task = progress.add_task(remote.name, total=remote.size)
    # The originals are public data: 0644. Raising inside the block removes the temporary file.
    with (
        atomic_file(final, mode=PUBLIC) as out,
        urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response,
    ):
        while chunk := response.read(_CHUNK):
            size += len(chunk)
            sha256.update(chunk)
            md5.update(chunk)
            if size > remote.size:  # not the published file; stop before a hostile source fills the disk
                break
            out.write(chunk)
            progress.update(task, advance=len(chunk))
        if size < remote.size:  # http.client does not raise IncompleteRead on a read(n) cut short
            raise OSError(f"the transfer ended after {size} of {remote.size} bytes")
        if size != remote.size or sha256.hexdigest() != remote.sha256 or md5.hexdigest() != remote.md5:
            raise DatasetChecksumMismatch(remote, url, size, sha256.hexdigest(), md5.hexdigest())
    return final


class _PlainProgress:
    """The download's progress without rich (a device's core install): one line per file, no bar."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: int) -> str:
        if self.enabled:
            print(f"fedmqtt: {description} ({total / 1e6:.1f} MB)", file=sys.stderr, flush=True)
        return description

    def update(self, task: str, advance: int) -> None:
        return None


def download_dataset(
    dataset: str, directory: str | os.PathLike[str], *, mirror: str | None = None, progress: bool = True
) -> Path:
    """Fetch the original gzipped IDX files of ``dataset`` that ``directory`` lacks; return ``directory``.

    Each file is tried from each base URL of :func:`mirror_urls` in turn (network and HTTP errors move on
    to the next), and must match its published size, sha256 and md5 (:data:`SOURCES`), else
    :class:`DatasetChecksumMismatch`. Nothing half-written is left behind. A progress bar goes to stderr (with rich,
    the ``sim`` extra; one line per file without it).
    Raises :class:`DatasetDownloadFailed` when no source delivers a file.
    """
    _check_dataset_name(dataset)
    target = Path(directory).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    urls = mirror_urls(dataset, mirror)
    rich_progress = optional("sim", "rich.progress")

    with _download_lock(target):
        needed = [remote for remote in SOURCES[dataset].files if _find_file(target, remote.name[:-3]) is None]
        if not needed:
            return target
        message = f"fedmqtt: downloading {dataset} ({len(needed)} files) from {urls[0]} into {target}"
        display: Any
        if rich_progress is None:
            print(message, file=sys.stderr, flush=True)
            display = _PlainProgress(enabled=progress)
        else:
            console = require("sim", "rich.console").Console(stderr=True)
            console.print(message)
            r = rich_progress
            columns = (r.TextColumn("{task.description}"), r.BarColumn(), r.DownloadColumn(),
                       r.TransferSpeedColumn(), r.TimeRemainingColumn())  # fmt: skip
            display = r.Progress(*columns, console=console, disable=not progress)
        with display as bar:
            for remote in needed:
                errors = []
                for base in urls:
                    try:
                        _fetch(base + remote.name, remote, target, bar)
                        break
                    except (OSError, http.client.HTTPException, ValueError) as exc:
                        errors.append(f"{base}{remote.name}: {exc}")
                else:
                    raise DatasetDownloadFailed(dataset, target, [r.name for r in needed], errors)
    return target


def resolve_data_dir(
    flag: str | os.PathLike[str] | None,
    dataset: str,
    *,
    split: Split = "all",
    download: bool = True,
    env: Mapping[str, str] | None = None,
    flag_name: str = "--data-dir",
) -> Path:
    """The directory holding ``dataset``'s IDX files of ``split`` (train, test or all four).

    1. ``flag`` (``--data-dir``; ``flag_name`` names it in errors, e.g. ``--eval-data``), else
    2. ``$FEDMQTT_DATA``: each may hold the files directly, in a ``<dataset>/`` subdirectory or as a
       torchvision root. A directory named explicitly is where the data lives: if it lacks a file, that is
       an error naming what is missing, and nothing is ever downloaded into it.
    3. Else the user cache (:func:`default_cache_dir`), filled by :func:`download_dataset` when files are
       missing and ``download`` is true (from ``$FEDMQTT_DATA_MIRROR`` when set).

    Raises :class:`DatasetNotFound` (or its :class:`DatasetDownloadFailed`), :class:`DatasetChecksumMismatch`.
    """
    _check_dataset_name(dataset)
    env = os.environ if env is None else env
    stems = _SPLIT_STEMS[split]
    cache = default_cache_dir(dataset, env)
    explicit: tuple[str, str | os.PathLike[str]] | None = None
    if flag is not None and str(flag) != "":
        explicit = (flag_name, flag)
    elif env.get(DATA_ENV):
        explicit = (f"${DATA_ENV}", env[DATA_ENV])
    if explicit is not None:
        origin, value = explicit
        base = Path(value).expanduser()
        found = _dir_holding(base, dataset, stems)
        if found is None:
            raise DatasetNotFound(
                dataset,
                _candidate_dirs(base, dataset),
                _missing(base / dataset if (base / dataset).is_dir() else base, stems),
                hint=f"({base} came from {origin}; fedmqtt downloads only into its cache, {cache}, used when "
                f"neither --data-dir nor ${DATA_ENV} is set.)",
            )
        return found
    cached = _dir_holding(cache, dataset, stems)
    if cached is not None:
        return cached
    if not download:
        raise DatasetNotFound(dataset, [cache], _missing(cache, stems), hint="Downloading is off.")
    download_dataset(dataset, cache, mirror=env.get(MIRROR_ENV))
    return cache


# --------------------------------------------------------------------------------------------------
# Synthetic data for tests


def write_idx_dataset(
    directory: str | os.PathLike[str],
    *,
    num_train: int,
    num_test: int,
    seed: int,
    gz: bool = True,
    num_classes: int = NUM_CLASSES,
) -> Path:
    """Write small, learnable, MNIST-shaped IDX files (all four) into ``directory``; return it.

    Each class is a distinct blocky 28×28 prototype (a random 7×7 binary pattern scaled up) drawn with
    Gaussian pixel noise and a random shift of up to one pixel; labels are balanced. Train and test
    share the prototypes, so a small model learns them in a few steps. Same seed, same bytes.
    """
    if not 2 <= num_classes <= NUM_CLASSES:
        raise ConfigError("num_classes", f"must be between 2 and {NUM_CLASSES}, got {num_classes}")
    for field, count in (("num_train", num_train), ("num_test", num_test)):
        if count < 0:
            raise ConfigError(field, f"must be zero or more, got {count}")
    rng = np.random.default_rng(seed)
    prototypes = np.kron(rng.random((num_classes, 7, 7)) < 0.5, np.ones((1, 4, 4))).astype(np.float64)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(count) % num_classes).astype(np.uint8)
        images = prototypes[labels] * 200.0 + rng.normal(20.0, 40.0, size=(count, IMAGE_SIZE, IMAGE_SIZE))
        for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(count, 2))):
            images[i] = np.roll(images[i], (int(dy), int(dx)), axis=(0, 1))
        return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for stems, count in ((TRAIN_FILES, num_train), (TEST_FILES, num_test)):
        images, labels = draw(count)
        write_idx_file(out / f"{stems[0]}{suffix}", images)
        write_idx_file(out / f"{stems[1]}{suffix}", labels)
    return out


# --------------------------------------------------------------------------------------------------
# Partitioning a data set across simulated devices

PartitionKind = Literal["iid", "shards", "dirichlet"]

DEFAULT_SIZE_SIGMA = 1.0
_FORMS = "'iid', 'iid:unequal', 'iid:unequal=SIGMA', 'shards:S' (e.g. shards:2), 'dirichlet:ALPHA' (e.g. dirichlet:0.5)"
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class PartitionSpec:
    """How to split a data set across devices.

    - ``iid``: a uniform random split into equal parts; ``iid:unequal[=SIGMA]`` draws part sizes from
      a lognormal distribution (log-sizes with standard deviation SIGMA, 1.0 by default).
    - ``shards:S``: McMahan et al. (2017)'s pathological non-IID split: sort by label, cut into
      ``num_parts*S`` equal shards, give each part S random shards (so mostly S labels per part).
    - ``dirichlet:ALPHA``: label skew after Hsu et al. (2019): each class is split across the parts
      in proportions drawn from Dirichlet(ALPHA); small ALPHA (0.1) gives few labels per part, large
      ALPHA (100) is close to IID.
    """

    kind: PartitionKind
    shards_per_part: int = 0
    alpha: float = 0.0
    size_sigma: float = 0.0

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        value = text.strip().lower()
        if value == "iid":
            return cls("iid")
        match = re.fullmatch(rf"iid:unequal(?:=({_NUMBER}))?", value)
        if match:
            sigma = float(match.group(1)) if match.group(1) else DEFAULT_SIZE_SIGMA
            if not 0 < sigma <= 10 or not math.isfinite(sigma):
                raise ConfigError("partition", f"SIGMA in {text!r} must lie in (0, 10]")
            return cls("iid", size_sigma=sigma)
        match = re.fullmatch(r"shards:(\d+)", value)
        if match:
            shards = int(match.group(1))
            if shards < 1:
                raise ConfigError("partition", f"S in {text!r} must be at least 1")
            return cls("shards", shards_per_part=shards)
        match = re.fullmatch(rf"dirichlet:({_NUMBER})", value)
        if match:
            alpha = float(match.group(1))
            if not 0 < alpha < math.inf:
                raise ConfigError("partition", f"ALPHA in {text!r} must be a positive number")
            return cls("dirichlet", alpha=alpha)
        raise ConfigError("partition", f"cannot parse {text!r}; accepted forms: {_FORMS}")

    def __str__(self) -> str:
        if self.kind == "shards":
            return f"shards:{self.shards_per_part}"
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        return f"iid:unequal={self.size_sigma:g}" if self.size_sigma > 0 else "iid"


def _equal_sizes(total: int, num_parts: int) -> np.ndarray:
    sizes = np.full(num_parts, total // num_parts, dtype=np.int64)
    sizes[: total % num_parts] += 1
    return sizes


def _lognormal_sizes(total: int, num_parts: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Sizes ~ lognormal(0, sigma), scaled to sum to ``total``, each at least 1 (largest remainders)."""
    weights = rng.lognormal(0.0, sigma, size=num_parts)
    share = weights / weights.sum() * (total - num_parts)
    sizes = 1 + np.floor(share).astype(np.int64)
    shortfall = total - int(sizes.sum())
    sizes[np.argsort(-(share - np.floor(share)), kind="stable")[:shortfall]] += 1
    return sizes


def _split_by_sizes(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return list(np.split(order, np.cumsum(sizes)[:-1]))


def _dirichlet_parts(labels: np.ndarray, num_parts: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_parts, alpha))
        cuts = np.minimum((np.cumsum(proportions)[:-1] * members.size).astype(np.int64), members.size)
        for part, piece in zip(chunks, np.split(members, cuts), strict=True):
            part.append(piece)
    parts = [np.concatenate(part) for part in chunks]
    # A small alpha leaves some parts with no sample at all. A device with nothing to train on is
    # useless, so each empty part takes one random sample from the currently largest part (which has
    # at least two, since there are at least as many samples as parts). The skew barely changes.
    for empty in range(num_parts):
        if parts[empty].size:
            continue
        donor = int(np.argmax([part.size for part in parts]))
        pick = int(rng.integers(parts[donor].size))
        parts[empty] = parts[donor][pick : pick + 1]
        parts[donor] = np.delete(parts[donor], pick)
    return parts


def partition(
    labels: np.ndarray | Sequence[int],
    spec: PartitionSpec | str,
    num_parts: int,
    seed: int | None,
) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` into ``num_parts`` disjoint, non-empty parts.

    The parts cover every index exactly once; each is sorted; the same seed gives the same parts.
    """
    chosen = PartitionSpec.parse(spec) if isinstance(spec, str) else spec
    values = np.asarray(labels)
    if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
        raise ConfigError("labels", f"must be a vector of integer labels, got {values.dtype} of shape {values.shape}")
    if values.size and values.min() < 0:
        raise ConfigError("labels", "labels must be non-negative")
    if num_parts < 1:
        raise ConfigError("num_parts", f"must be at least 1, got {num_parts}")
    total = int(values.size)
    needed = num_parts * (chosen.shards_per_part if chosen.kind == "shards" else 1)
    if total < needed:
        what = f"{needed} shards" if chosen.kind == "shards" else f"{num_parts} non-empty parts"
        raise ConfigError("num_parts", f"cannot split {total} samples into {what}; use fewer parts")
    rng = np.random.default_rng(seed)
    if chosen.kind == "iid":
        sizes = (
            _lognormal_sizes(total, num_parts, chosen.size_sigma, rng)
            if chosen.size_sigma > 0
            else _equal_sizes(total, num_parts)
        )
        parts = _split_by_sizes(rng.permutation(total), sizes)
    elif chosen.kind == "shards":
        by_label = np.argsort(values, kind="stable")
        shards = np.array_split(by_label, needed)
        owners = rng.permutation(needed).reshape(num_parts, chosen.shards_per_part)
        parts = [np.concatenate([shards[s] for s in row]) for row in owners]
    else:
        parts = _dirichlet_parts(values, num_parts, chosen.alpha, rng)
    return [np.sort(part).astype(np.int64, copy=False) for part in parts]


def _check_part(part: int, num_parts: int) -> None:
    if not 0 <= part < num_parts:
        raise ConfigError("part", f"must lie in 0..{num_parts - 1}, got {part}")


def select_part(
    dataset: ImageDataset, spec: PartitionSpec | str, num_parts: int, part: int, seed: int | None
) -> ImageDataset:
    """Part ``part`` (0-based) of ``dataset`` split by :func:`partition` (:func:`load_parts` reads only the part)."""
    _check_part(part, num_parts)
    parts = partition(dataset.labels.numpy(), spec, num_parts, seed)
    return dataset.subset(parts[part])


@dataclass(frozen=True)
class PartitionStats:
    """A summary of how skewed a partition is (for logs, docs and tests)."""

    num_parts: int
    min_size: int
    max_size: int
    mean_size: float
    mean_labels_per_part: float
    # Mean total-variation distance between a part's label distribution and the whole set's (0 = IID).
    mean_label_tv_distance: float


def describe_partition(labels: np.ndarray | Sequence[int], parts: Sequence[np.ndarray]) -> PartitionStats:
    values = np.asarray(labels)
    num_classes = int(values.max()) + 1 if values.size else 0
    overall = np.bincount(values, minlength=num_classes) / max(values.size, 1)
    sizes = np.array([part.size for part in parts])
    distinct = []
    distances = []
    for part in parts:
        counts = np.bincount(values[part], minlength=num_classes)
        distinct.append(int(np.count_nonzero(counts)))
        if part.size:
            distances.append(0.5 * float(np.abs(counts / part.size - overall).sum()))
    return PartitionStats(
        num_parts=len(parts),
        min_size=int(sizes.min()) if sizes.size else 0,
        max_size=int(sizes.max()) if sizes.size else 0,
        mean_size=float(sizes.mean()) if sizes.size else 0.0,
        mean_labels_per_part=float(np.mean(distinct)) if distinct else 0.0,
        mean_label_tv_distance=float(np.mean(distances)) if distances else 0.0,
    )
