"""Image data sets in IDX format (MNIST, Fashion-MNIST), and how a data set is split across devices.

Everything here is pure and synchronous: files in, tensors and index arrays out. A simulated device
trains on one part of a partition (:func:`select_part`); a real board trains on all of its own data.

The IDX reader is ours, not torchvision's: torchvision 0.29's ``read_sn3_pascalvincent_tensor`` opens
plain files only (no ``.gz``) and checks headers with ``assert``, which gives a bare ``AssertionError``
(or nothing, under ``python -O``) on a damaged file. MNIST's IDX header is eight to sixteen bytes, so a
strict reader that names the problem is short; torchvision is still used to *download* the originals.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fedmqtt.device.errors import DatasetCorrupt, DatasetNotFound
from fedmqtt.errors import ConfigError

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
            raise ValueError(
                f"labels must be a vector of {images.shape[0]} entries, got shape {tuple(labels.shape)}"
            )
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


def read_idx_file(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file (plain or gzipped) with ``ndim`` dimensions, as a uint8 array."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetCorrupt(path, f"it is {len(data)} bytes long, shorter than the 4-byte magic number")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DatasetCorrupt(
            path,
            f"magic number is 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})",
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DatasetCorrupt(path, f"its header is truncated ({len(data)} of {header_size} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = math.prod(dims)
    present = len(data) - header_size
    if present < expected:
        raise DatasetCorrupt(
            path, f"it is truncated: the header promises {expected} bytes of data for shape {dims}, "
            f"the file holds {present}"
        )
    if present > expected:
        raise DatasetCorrupt(path, f"it has {present - expected} unexpected bytes after the data")
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header_size).reshape(dims)


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


def load_dataset(name: str, data_dir: str | os.PathLike[str], *, train: bool) -> ImageDataset:
    """The training (``train=True``) or test split of ``name`` from ``data_dir``.

    ``data_dir`` may hold the IDX files itself, or hold them in a ``<name>/`` subdirectory (the layout
    of ``$FEDMQTT_DATA``), or be a torchvision root (``MNIST/raw``). Each file may be gzipped.
    """
    _check_dataset_name(name)
    stems = TRAIN_FILES if train else TEST_FILES
    base = Path(data_dir).expanduser()
    found = _locate(base, name, stems)
    if found is None:
        raise DatasetNotFound(name, _candidate_dirs(base, name), list(stems))
    images_path, labels_path = found
    images = read_idx_file(images_path, 3)
    labels = read_idx_file(labels_path, 1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetCorrupt(
            images_path, f"images are {images.shape[1]}×{images.shape[2]}, {name} has {IMAGE_SIZE}×{IMAGE_SIZE}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetCorrupt(
            labels_path, f"it holds {labels.shape[0]} labels but {images_path.name} holds {images.shape[0]} images"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DatasetCorrupt(labels_path, f"label {int(labels.max())} is out of range 0..{NUM_CLASSES - 1}")
    mean, std = NORMALISATION[name]
    pixels = torch.from_numpy(images.astype(np.float32))
    pixels.div_(255.0).sub_(mean).div_(std)
    return ImageDataset(pixels.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), num_classes=NUM_CLASSES)


def default_cache_dir(dataset: str) -> Path:
    """Where downloaded data sets live: ``$XDG_CACHE_HOME/fedmqtt/datasets/<dataset>`` (~/.cache by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fedmqtt" / "datasets" / dataset


def _download(dataset: str, directory: Path) -> None:
    """Fetch the four original gzipped IDX files with torchvision, checking their MD5 sums."""
    from torchvision.datasets import MNIST, FashionMNIST
    from torchvision.datasets.utils import download_url

    source = MNIST if dataset == "mnist" else FashionMNIST
    directory.mkdir(parents=True, exist_ok=True)
    for filename, md5 in source.resources:
        if _find_file(directory, filename.removesuffix(".gz")) is not None:
            continue
        errors = []
        for mirror in source.mirrors:
            try:
                download_url(f"{mirror}{filename}", root=str(directory), filename=filename, md5=md5)
                break
            except Exception as exc:  # urllib, socket and integrity errors alike: try the next mirror
                errors.append(f"{mirror}: {exc}")
        else:
            raise OSError(f"could not download {filename} ({'; '.join(errors)})")


def resolve_data_dir(flag: str | os.PathLike[str] | None, dataset: str, *, download: bool = True) -> Path:
    """The directory holding ``dataset``'s four IDX files.

    Looks at ``flag`` (``--data-dir``), else ``$FEDMQTT_DATA``, else the cache directory; each may hold
    the files directly or in a ``<dataset>/`` subdirectory. Only the cache directory is ever filled by a
    download, and only when files are missing and ``download`` is true. Raises :class:`DatasetNotFound`.
    """
    _check_dataset_name(dataset)
    explicit: list[tuple[str, str | os.PathLike[str]]] = []
    if flag is not None and str(flag) != "":
        explicit.append(("--data-dir", flag))
    elif os.environ.get("FEDMQTT_DATA"):
        explicit.append(("$FEDMQTT_DATA", os.environ["FEDMQTT_DATA"]))
    for origin, value in explicit:
        base = Path(value).expanduser()
        found = _dir_holding(base, dataset, IDX_FILES)
        if found is None:
            raise DatasetNotFound(
                dataset, _candidate_dirs(base, dataset), list(IDX_FILES), hint=f"({base} came from {origin}.)"
            )
        return found
    cache = default_cache_dir(dataset)
    if _dir_holding(cache, dataset, IDX_FILES) is not None:
        return cache
    hint = "Downloading is off."
    if download:
        try:
            _download(dataset, cache)
            return cache
        except OSError as exc:
            hint = f"Downloading them into {cache} failed: {exc}"
    raise DatasetNotFound(dataset, [cache], list(IDX_FILES), hint=hint)


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


def select_part(
    dataset: ImageDataset, spec: PartitionSpec | str, num_parts: int, part: int, seed: int | None
) -> ImageDataset:
    """Part ``part`` (0-based) of ``dataset`` split by :func:`partition`: a simulated device's data."""
    if not 0 <= part < num_parts:
        raise ConfigError("part", f"must lie in 0..{num_parts - 1}, got {part}")
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
