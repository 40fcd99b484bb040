"""IDX loading, data directory resolution, synthetic data and partitioners (fedmqtt.data)."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.data import (
    DATASETS,
    IDX_FILES,
    NORMALISATION,
    TEST_FILES,
    TRAIN_FILES,
    DatasetCorrupt,
    DatasetNotFound,
    ImageDataset,
    PartitionSpec,
    default_cache_dir,
    describe_partition,
    load_dataset,
    load_parts,
    partition,
    read_idx_file,
    resolve_data_dir,
    select_part,
    write_idx_dataset,
    write_idx_file,
)
from fedmqtt.errors import ConfigError, FedmqttError

torch.set_num_threads(1)


def balanced_labels(per_class: int, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def write_split(directory: Path, images: np.ndarray, labels: np.ndarray, *, train: bool, gz: bool) -> None:
    stems = TRAIN_FILES if train else TEST_FILES
    suffix = ".gz" if gz else ""
    write_idx_file(directory / f"{stems[0]}{suffix}", images)
    write_idx_file(directory / f"{stems[1]}{suffix}", labels)


# --------------------------------------------------------------------------------------------------
# IDX files and loading


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_loads_exact_normalised_pixels(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    write_split(tmp_path, images, labels, train=True, gz=gz)
    for name in DATASETS:
        dataset = load_dataset(name, tmp_path, train=True)
        mean, std = NORMALISATION[name]
        expected = (torch.from_numpy(images.astype(np.float32)) / 255.0 - mean) / std
        assert dataset.images.shape == (7, 1, 28, 28)
        assert dataset.images.dtype == torch.float32
        torch.testing.assert_close(dataset.images[:, 0], expected)
        assert dataset.labels.dtype == torch.int64
        assert dataset.labels.tolist() == labels.tolist()
        assert dataset.num_classes == 10


@pytest.mark.parametrize("shape", [(0,), (5,), (3, 4), (2, 3, 4)])
def test_read_idx_file_returns_what_was_written(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    for name in ("a.idx", "a.idx.gz"):
        path = write_idx_file(tmp_path / name, array)
        back = read_idx_file(path, len(shape))
        assert back.shape == shape
        assert np.array_equal(back, array)


def test_gzipped_and_plain_synthetic_sets_load_identically(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "gz", num_train=30, num_test=10, seed=3, gz=True)
    write_idx_dataset(tmp_path / "plain", num_train=30, num_test=10, seed=3, gz=False)
    assert sorted(p.name for p in (tmp_path / "gz").iterdir()) == sorted(f"{s}.gz" for s in IDX_FILES)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == sorted(IDX_FILES)
    for train in (True, False):
        a = load_dataset("mnist", tmp_path / "gz", train=train)
        b = load_dataset("mnist", tmp_path / "plain", train=train)
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
    assert len(load_dataset("mnist", tmp_path / "gz", train=True)) == 30
    assert len(load_dataset("mnist", tmp_path / "gz", train=False)) == 10


def test_synthetic_set_is_reproducible_and_balanced(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "a", num_train=50, num_test=20, seed=9, num_classes=5)
    write_idx_dataset(tmp_path / "b", num_train=50, num_test=20, seed=9, num_classes=5)
    write_idx_dataset(tmp_path / "c", num_train=50, num_test=20, seed=10, num_classes=5)
    for stem in IDX_FILES:
        assert (tmp_path / "a" / f"{stem}.gz").read_bytes() == (tmp_path / "b" / f"{stem}.gz").read_bytes()
    assert (tmp_path / "a" / f"{IDX_FILES[0]}.gz").read_bytes() != (tmp_path / "c" / f"{IDX_FILES[0]}.gz").read_bytes()
    train = load_dataset("fashion-mnist", tmp_path / "a", train=True)
    assert train.label_counts().tolist() == [10, 10, 10, 10, 10, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("bad", [{"num_classes": 1}, {"num_classes": 11}, {"num_train": -1}, {"num_test": -2}])
def test_write_idx_dataset_rejects_bad_sizes(tmp_path: Path, bad: dict[str, int]) -> None:
    sizes = {"num_train": 10, "num_test": 10, "num_classes": 10, **bad}
    with pytest.raises(ConfigError) as caught:
        write_idx_dataset(
            tmp_path, seed=0, num_train=sizes["num_train"], num_test=sizes["num_test"], num_classes=sizes["num_classes"]
        )
    assert caught.value.field == next(iter(bad))


def test_load_accepts_subdirectory_and_torchvision_layouts(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fashion-mnist", num_train=12, num_test=4, seed=0)
    write_idx_dataset(tmp_path / "MNIST" / "raw", num_train=8, num_test=4, seed=0, gz=False)
    assert len(load_dataset("fashion-mnist", tmp_path, train=True)) == 12
    assert len(load_dataset("mnist", tmp_path, train=True)) == 8


def test_load_needs_only_the_split_asked_for(tmp_path: Path) -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    write_split(tmp_path, images, np.array([1, 2], dtype=np.uint8), train=False, gz=True)
    assert load_dataset("mnist", tmp_path, train=False).labels.tolist() == [1, 2]
    with pytest.raises(DatasetNotFound) as caught:
        load_dataset("mnist", tmp_path, train=True)
    message = str(caught.value)
    assert "train-images-idx3-ubyte" in message and "train-labels-idx1-ubyte" in message
    assert str(tmp_path) in message


def test_unknown_dataset_name_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mnist, fashion-mnist"):
        load_dataset("cifar10", tmp_path, train=True)
    with pytest.raises(ConfigError, match="mnist, fashion-mnist"):
        resolve_data_dir(str(tmp_path), "emnist")


def _good_images(tmp_path: Path) -> Path:
    return write_idx_file(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8))


def _good_labels(tmp_path: Path) -> Path:
    return write_idx_file(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2], dtype=np.uint8))


def _corrupt_wrong_magic(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    # A labels file where the images file should be: magic 0x801 instead of 0x803.
    return write_idx_file(tmp_path / "train-images-idx3-ubyte", np.zeros(3, dtype=np.uint8))


def _corrupt_truncated(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    path = _good_images(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _corrupt_trailing(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    path = _good_images(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0\0")
    return path


def _corrupt_tiny(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\0\0")
    return path


def _corrupt_header(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 3]))
    return path


def _corrupt_float_type(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x0D, 3]) + bytes(12))
    return path


def _corrupt_not_gzip(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    return path


def _corrupt_gzip_cut(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    path = write_idx_file(tmp_path / "train-images-idx3-ubyte.gz", np.ones((3, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-12])
    return path


def _corrupt_image_size(tmp_path: Path) -> Path:
    _good_labels(tmp_path)
    return write_idx_file(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 32, 32), dtype=np.uint8))


def _corrupt_count_mismatch(tmp_path: Path) -> Path:
    _good_images(tmp_path)
    return write_idx_file(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1], dtype=np.uint8))


def _corrupt_label_range(tmp_path: Path) -> Path:
    _good_images(tmp_path)
    return write_idx_file(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 12], dtype=np.uint8))


def _gzipped_payload(tmp_path: Path, edit) -> Path:
    """A well-formed gzip stream whose IDX content ``edit`` damaged (so only the IDX checks can catch it)."""
    _good_labels(tmp_path)
    plain = _good_images(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(edit(plain.read_bytes()), mtime=0))
    plain.unlink()
    return path


def _corrupt_gzip_truncated(tmp_path: Path) -> Path:
    return _gzipped_payload(tmp_path, lambda data: data[:-800])  # 2352 bytes of images promised, 1552 there


def _corrupt_gzip_trailing(tmp_path: Path) -> Path:
    return _gzipped_payload(tmp_path, lambda data: data + b"\0\0\0")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_corrupt_wrong_magic, "magic number is 0x00000801, expected 0x00000803"),
        (_corrupt_truncated, "truncated"),
        (_corrupt_trailing, "unexpected bytes"),
        (_corrupt_tiny, "shorter than the 4-byte magic"),
        (_corrupt_header, "header is truncated"),
        (_corrupt_float_type, "magic number"),
        (_corrupt_not_gzip, "cannot decompress"),
        (_corrupt_gzip_cut, "cannot decompress"),
        (_corrupt_image_size, "32×32"),
        (_corrupt_count_mismatch, "holds 2 labels"),
        (_corrupt_label_range, "label 12 is out of range"),
        (_corrupt_gzip_truncated, "the file holds 1552"),
        (_corrupt_gzip_trailing, "it has 3 unexpected bytes"),
    ],
)
@pytest.mark.parametrize("lean", [False, True], ids=["load_dataset", "load_parts"])
def test_corrupt_files_raise_dataset_corrupt(tmp_path: Path, make, problem: str, lean: bool) -> None:
    path = make(tmp_path)
    with pytest.raises(DatasetCorrupt) as caught:
        if lean:
            load_parts("mnist", tmp_path, "iid", 1, [0], seed=0)
        else:
            load_dataset("mnist", tmp_path, train=True)
    assert caught.value.path == path
    assert problem in str(caught.value)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, FedmqttError)


# --------------------------------------------------------------------------------------------------
# resolve_data_dir


@pytest.fixture
def no_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $FEDMQTT_DATA, and an empty cache directory of our own."""
    monkeypatch.delenv("FEDMQTT_DATA", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def test_resolve_uses_the_flag_directory(tmp_path: Path, no_data_env: Path) -> None:
    write_idx_dataset(tmp_path / "direct", num_train=4, num_test=2, seed=0)
    write_idx_dataset(tmp_path / "parent" / "mnist", num_train=4, num_test=2, seed=0)
    assert resolve_data_dir(str(tmp_path / "direct"), "mnist") == tmp_path / "direct"
    assert resolve_data_dir(tmp_path / "parent", "mnist") == tmp_path / "parent" / "mnist"


def test_resolve_falls_back_to_the_environment(
    tmp_path: Path, no_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_idx_dataset(tmp_path / "data" / "mnist", num_train=4, num_test=2, seed=0)
    write_idx_dataset(tmp_path / "data" / "fashion-mnist", num_train=4, num_test=2, seed=1)
    write_idx_dataset(tmp_path / "flag", num_train=4, num_test=2, seed=0)
    monkeypatch.setenv("FEDMQTT_DATA", str(tmp_path / "data"))
    assert resolve_data_dir(None, "mnist") == tmp_path / "data" / "mnist"
    assert resolve_data_dir("", "fashion-mnist") == tmp_path / "data" / "fashion-mnist"
    assert resolve_data_dir(str(tmp_path / "flag"), "mnist") == tmp_path / "flag"  # the flag wins


def test_resolve_uses_a_complete_cache_without_downloading(no_data_env: Path) -> None:
    cache = default_cache_dir("fashion-mnist")
    assert cache == no_data_env / "fedmqtt" / "fashion-mnist"
    write_idx_dataset(cache, num_train=4, num_test=2, seed=0)
    assert resolve_data_dir(None, "fashion-mnist", download=False) == cache


def test_resolve_missing_everywhere_names_files_and_remedies(no_data_env: Path) -> None:
    with pytest.raises(DatasetNotFound) as caught:
        resolve_data_dir(None, "mnist", download=False)
    message = str(caught.value)
    for stem in IDX_FILES:
        assert stem in message
    assert "--data-dir" in message and "$FEDMQTT_DATA" in message
    assert str(default_cache_dir("mnist")) in message


def test_resolve_explicit_directory_without_files_fails_naming_its_origin(
    tmp_path: Path, no_data_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = tmp_path / "partial"
    write_idx_dataset(partial, num_train=4, num_test=2, seed=0)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFound, match="came from --data-dir") as caught:
        resolve_data_dir(str(partial), "mnist")
    assert str(partial) in str(caught.value)
    assert caught.value.missing == ("t10k-labels-idx1-ubyte",)  # exactly what is missing
    assert resolve_data_dir(str(partial), "mnist", split="train") == partial  # the train split is complete
    with pytest.raises(DatasetNotFound, match="came from --eval-data"):
        resolve_data_dir(str(partial), "mnist", split="test", flag_name="--eval-data")
    assert not default_cache_dir("mnist").exists()  # an explicit directory is never downloaded into
    monkeypatch.setenv("FEDMQTT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFound, match=r"came from \$FEDMQTT_DATA"):
        resolve_data_dir(None, "mnist")


# --------------------------------------------------------------------------------------------------
# ImageDataset


def test_image_dataset_subset_and_counts() -> None:
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1)
    dataset = ImageDataset(images, labels, num_classes=4)
    assert len(dataset) == 6
    assert dataset.label_counts().tolist() == [1, 2, 3, 0]
    part = dataset.subset(np.array([5, 0, 3]))
    assert part.labels.tolist() == [2, 0, 2]
    assert part.images.flatten().tolist() == [5.0, 0.0, 3.0]
    assert len(dataset.subset([])) == 0
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        dataset.subset([6])
    with pytest.raises(IndexError, match="integers"):
        dataset.subset(np.array([0.5]))


def test_image_dataset_rejects_inconsistent_tensors() -> None:
    with pytest.raises(ValueError, match="N×C×H×W"):
        ImageDataset(torch.zeros(3, 28, 28), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="vector of 3"):
        ImageDataset(torch.zeros(3, 1, 28, 28), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="float32"):
        ImageDataset(torch.zeros(3, 1, 28, 28, dtype=torch.float64), torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# Partition specs


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("iid", PartitionSpec("iid"), "iid"),
        (" IID ", PartitionSpec("iid"), "iid"),
        ("iid:unequal", PartitionSpec("iid", size_sigma=1.0), "iid:unequal=1"),
        ("iid:unequal=0.5", PartitionSpec("iid", size_sigma=0.5), "iid:unequal=0.5"),
        ("shards:2", PartitionSpec("shards", shards_per_part=2), "shards:2"),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5), "dirichlet:0.5"),
        ("dirichlet:1e-2", PartitionSpec("dirichlet", alpha=0.01), "dirichlet:0.01"),
        ("dirichlet:100", PartitionSpec("dirichlet", alpha=100.0), "dirichlet:100"),
    ],
)
def test_partition_spec_parses_accepted_forms(text: str, expected: PartitionSpec, canonical: str) -> None:
    spec = PartitionSpec.parse(text)
    assert spec == expected
    assert str(spec) == canonical
    assert PartitionSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "random",
        "iid:",
        "iid:2",
        "iid:unequal=0",
        "iid:unequal=x",
        "iid:unequal=11",
        "shards",
        "shards:0",
        "shards:-1",
        "shards:1.5",
        "dirichlet",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:inf",
        "dirichlet:nan",
        "dirichlet:abc",
        "shards:2:unequal",
    ],
)
def test_partition_spec_rejects_bad_strings_naming_the_accepted_forms(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PartitionSpec.parse(text)
    assert caught.value.field == "partition"
    assert repr(text) in str(caught.value)


def test_unparseable_spec_lists_every_form() -> None:
    with pytest.raises(ConfigError) as caught:
        PartitionSpec.parse("round-robin")
    for form in ("'iid'", "'iid:unequal'", "'shards:S'", "'dirichlet:ALPHA'"):
        assert form in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Partitioners


@st.composite
def partition_cases(draw: st.DrawFn) -> tuple[np.ndarray, str, int, int]:
    spec = draw(
        st.sampled_from(
            [
                "iid",
                "iid:unequal",
                "iid:unequal=3",
                "shards:1",
                "shards:2",
                "shards:3",
                "dirichlet:0.01",
                "dirichlet:0.5",
                "dirichlet:100",
            ]
        )
    )
    per_part = PartitionSpec.parse(spec).shards_per_part or 1
    size = draw(st.integers(per_part, 400))
    num_classes = draw(st.integers(1, 10))
    labels = np.array(draw(st.lists(st.integers(0, num_classes - 1), min_size=size, max_size=size)))
    num_parts = draw(st.integers(1, max(1, min(60, size // per_part))))
    return labels, spec, num_parts, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None)
@given(partition_cases())
def test_parts_are_disjoint_non_empty_sorted_and_cover_everything(case: tuple[np.ndarray, str, int, int]) -> None:
    labels, spec, num_parts, seed = case
    parts = partition(labels, spec, num_parts, seed)
    assert len(parts) == num_parts
    assert all(part.size > 0 for part in parts)
    assert all(part.dtype == np.int64 and np.all(np.diff(part) > 0) for part in parts)
    together = np.concatenate(parts)
    assert together.size == labels.size  # no index twice
    assert np.array_equal(np.sort(together), np.arange(labels.size))  # every index once
    again = partition(labels, spec, num_parts, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize("spec", ["iid", "iid:unequal", "shards:2", "dirichlet:0.5"])
def test_different_seeds_give_different_partitions(spec: str) -> None:
    labels = balanced_labels(100)
    a = partition(labels, spec, 10, seed=1)
    b = partition(labels, spec, 10, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_parts_have_equal_sizes_and_near_uniform_labels() -> None:
    labels = balanced_labels(600)
    parts = partition(labels, "iid", 10, seed=0)
    assert {part.size for part in parts} == {600}
    for part in parts:
        fractions = np.bincount(labels[part], minlength=10) / part.size
        assert np.all(np.abs(fractions - 0.1) < 0.04)
    assert describe_partition(labels, parts).mean_label_tv_distance < 0.08  # multinomial noise: ~0.05
    uneven = partition(np.zeros(13, dtype=np.int64), "iid", 4, seed=0)
    assert sorted(part.size for part in uneven) == [3, 3, 3, 4]


def test_iid_unequal_sizes_spread_out_yet_stay_iid() -> None:
    labels = balanced_labels(600)
    parts = partition(labels, "iid:unequal", 20, seed=0)
    sizes = np.array([part.size for part in parts])
    assert sizes.sum() == labels.size
    assert sizes.max() > 3 * sizes.min()
    wide = partition(labels, "iid:unequal=2", 20, seed=0)
    assert np.std([p.size for p in wide]) > np.std(sizes)
    big = [part for part in parts if part.size >= 300]
    for part in big:
        fractions = np.bincount(labels[part], minlength=10) / part.size
        assert np.all(np.abs(fractions - 0.1) < 0.06)


def test_shards_give_each_part_at_most_s_labels_when_shards_are_pure() -> None:
    # 10 classes of 60 samples, 30 parts × 2 shards = 60 shards of 10: each shard holds one label.
    labels = balanced_labels(60)
    for shards_per_part in (1, 2):
        parts = partition(labels, f"shards:{shards_per_part}", 60 // shards_per_part, seed=4)
        assert {part.size for part in parts} == {10 * shards_per_part}
        counts = [np.unique(labels[part]).size for part in parts]
        assert max(counts) <= shards_per_part
    stats = describe_partition(labels, partition(labels, "shards:2", 30, seed=4))
    assert 1.5 < stats.mean_labels_per_part <= 2


def test_shards_on_mnist_like_counts_stay_close_to_s_labels() -> None:
    # MNIST's real class sizes: shards of 300 sometimes straddle two labels.
    mnist_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    labels = np.repeat(np.arange(10), mnist_counts)
    parts = partition(labels, "shards:2", 100, seed=0)
    assert {part.size for part in parts} == {600}
    distinct = [np.unique(labels[part]).size for part in parts]
    assert max(distinct) <= 4
    assert np.mean(distinct) <= 2.3


def test_dirichlet_skew_follows_alpha() -> None:
    labels = balanced_labels(300)
    skewed = describe_partition(labels, partition(labels, "dirichlet:0.1", 20, seed=0))
    moderate = describe_partition(labels, partition(labels, "dirichlet:1", 20, seed=0))
    near_iid = describe_partition(labels, partition(labels, "dirichlet:1000", 20, seed=0))
    assert skewed.mean_label_tv_distance > 0.6
    assert skewed.mean_labels_per_part < 6
    assert skewed.mean_label_tv_distance > moderate.mean_label_tv_distance > near_iid.mean_label_tv_distance
    assert near_iid.mean_label_tv_distance < 0.08
    assert near_iid.mean_labels_per_part == 10
    # Part sizes follow the draw too: near-equal for a large alpha.
    assert near_iid.max_size < 1.3 * near_iid.min_size


def test_dirichlet_with_tiny_alpha_leaves_no_part_empty() -> None:
    labels = balanced_labels(5)
    for seed in range(20):
        parts = partition(labels, "dirichlet:0.001", 50, seed=seed)
        assert all(part.size >= 1 for part in parts)
        assert sum(part.size for part in parts) == 50


@pytest.mark.parametrize(
    ("labels", "spec", "num_parts", "field"),
    [
        (np.arange(10), "iid", 0, "num_parts"),
        (np.arange(10), "iid", 11, "num_parts"),
        (np.arange(10), "dirichlet:0.5", 11, "num_parts"),
        (np.arange(10), "shards:2", 6, "num_parts"),
        (np.array([0, -1, 2]), "iid", 2, "labels"),
        (np.array([0.0, 1.0]), "iid", 2, "labels"),
        (np.zeros((2, 2), dtype=np.int64), "iid", 2, "labels"),
        (np.arange(10), "bogus", 2, "partition"),
    ],
)
def test_partition_rejects_impossible_requests(labels: np.ndarray, spec: str, num_parts: int, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        partition(labels, spec, num_parts, seed=0)
    assert caught.value.field == field


def test_shard_shortage_message_tells_what_to_do() -> None:
    with pytest.raises(ConfigError, match="cannot split 10 samples into 12 shards; use fewer parts"):
        partition(np.arange(10), "shards:2", 6, seed=0)


def test_select_part_returns_that_part_of_the_data(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, num_train=60, num_test=10, seed=0)
    dataset = load_dataset("mnist", tmp_path, train=True)
    spec = PartitionSpec.parse("shards:2")
    parts = partition(dataset.labels.numpy(), spec, 5, seed=8)
    for index, part in enumerate(parts):
        chosen = select_part(dataset, spec, 5, index, seed=8)
        assert torch.equal(chosen.labels, dataset.labels[torch.from_numpy(part)])
        assert torch.equal(chosen.images, dataset.images[torch.from_numpy(part)])
    assert len(select_part(dataset, "iid", 5, 4, seed=0)) == 12
    for bad in (-1, 5):
        with pytest.raises(ConfigError, match=r"0\.\.4"):
            select_part(dataset, "iid", 5, bad, seed=0)


# --------------------------------------------------------------------------------------------------
# A device's part, read without the rest (load_parts)

LEAN_SPECS = ["iid", "iid:unequal", "shards:2", "dirichlet:0.3"]


def assert_same_data(got: ImageDataset, expected: ImageDataset) -> None:
    assert torch.equal(got.labels, expected.labels)
    assert torch.equal(got.images, expected.images)  # bit for bit: the same float32 values
    assert got.images.shape[1:] == (1, 28, 28) and got.num_classes == expected.num_classes


@pytest.fixture(scope="module")
def lean_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, ImageDataset]]:
    """The same 3,000 synthetic training images, gzipped and plain (3,000 rows span three decompressed chunks)."""
    sets = {}
    for gz in (True, False):
        directory = write_idx_dataset(
            tmp_path_factory.mktemp(f"lean-gz{gz}"), num_train=3000, num_test=0, seed=5, gz=gz
        )
        sets[gz] = (directory, load_dataset("mnist", directory, train=True))
    return sets


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("spec", LEAN_SPECS)
def test_load_parts_equals_the_part_of_the_full_load(lean_sets, gz: bool, spec: str) -> None:
    directory, full = lean_sets[gz]
    wanted = [3, 0, 17, 3, 29]  # any order, repeats allowed: each comes back in the order asked for
    for part, got in zip(wanted, load_parts("mnist", directory, spec, 30, wanted, seed=11), strict=True):
        assert_same_data(got, select_part(full, spec, 30, part, seed=11))


@settings(max_examples=25, deadline=None)
@given(
    gz=st.booleans(),
    num_parts=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
    spec=st.sampled_from(LEAN_SPECS),
    picks=st.lists(st.integers(0, 59), min_size=1, max_size=6),
)
def test_load_parts_matches_select_part_for_any_split(lean_sets, gz, num_parts, seed, spec, picks) -> None:
    directory, full = lean_sets[gz]
    wanted = [pick % num_parts for pick in picks]
    for part, got in zip(wanted, load_parts("mnist", directory, spec, num_parts, wanted, seed=seed), strict=True):
        assert_same_data(got, select_part(full, spec, num_parts, part, seed=seed))


def test_load_parts_reads_the_test_split_and_checks_part_numbers(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, num_train=20, num_test=40, seed=2)
    test = load_dataset("fashion-mnist", tmp_path, train=False)
    (got,) = load_parts("fashion-mnist", tmp_path, "iid", 4, [2], seed=1, train=False)
    assert_same_data(got, select_part(test, "iid", 4, 2, seed=1))
    for bad in (-1, 4):
        with pytest.raises(ConfigError, match=r"0\.\.3"):
            load_parts("mnist", tmp_path, "iid", 4, [0, bad], seed=0)
    assert load_parts("mnist", tmp_path, "iid", 4, [], seed=0) == []


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_load_parts_never_holds_the_whole_image_array(tmp_path: Path, gz: bool) -> None:
    """tracemalloc sees every numpy buffer: the lean path's peak stays far below the images' size."""
    count = 20_000  # 15.7 MB of uint8 pixels, 62.7 MB as float32
    rng = np.random.default_rng(0)
    write_split(tmp_path, rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
                rng.integers(0, 10, count, dtype=np.uint8), train=True, gz=gz)  # fmt: skip
    image_bytes = count * 28 * 28

    def peak(load) -> int:
        tracemalloc.start()
        try:
            load()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    lean = peak(lambda: load_parts("mnist", tmp_path, "iid", 100, [5, 6], seed=0))  # 400 images: 1.25 MB float32
    full = peak(lambda: select_part(load_dataset("mnist", tmp_path, train=True), "iid", 100, 5, seed=0))
    assert full > image_bytes * 4  # the old path: the bytes, then all of them as float32
    assert lean < 4_000_000, f"load_parts peaked at {lean / 1e6:.1f} MB for 400 of {count} images"


def test_describe_partition_counts() -> None:
    labels = np.array([0, 0, 1, 1])
    stats = describe_partition(labels, [np.array([0, 1]), np.array([2, 3])])
    assert (stats.num_parts, stats.min_size, stats.max_size, stats.mean_size) == (2, 2, 2, 2.0)
    assert stats.mean_labels_per_part == 1.0
    assert stats.mean_label_tv_distance == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------
# The real files (used by the slow tests and benchmarks)


@pytest.mark.slow
def test_real_mnist_files_resolve_and_load(monkeypatch: pytest.MonkeyPatch) -> None:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    assert (shared / "mnist").is_dir(), f"real MNIST files expected in {shared}/mnist (see shared/data/SOURCES.md)"
    monkeypatch.setenv("FEDMQTT_DATA", str(shared))
    for name, test_counts in (
        ("mnist", [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
        ("fashion-mnist", [1000] * 10),
    ):
        directory = resolve_data_dir(None, name)
        assert directory == shared / name
        test = load_dataset(name, directory, train=False)
        assert test.images.shape == (10000, 1, 28, 28)
        assert test.label_counts().tolist() == test_counts
        mean, std = NORMALISATION[name]
        pixels = test.images * std + mean  # back to [0, 1]
        assert abs(float(pixels.mean()) - mean) < 0.01
        assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    with gzip.open(shared / "mnist" / "train-labels-idx1-ubyte.gz") as stream:
        assert stream.read(8) == bytes([0, 0, 8, 1, 0, 0, 0xEA, 0x60])  # 60000 labels


@pytest.mark.slow
def test_real_mnist_parts_load_leanly_as_from_the_whole_set() -> None:
    mnist = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
    assert mnist.is_dir(), f"real MNIST files expected in {mnist} (see shared/data/SOURCES.md)"
    full = load_dataset("mnist", mnist, train=True)
    for spec in ("iid", "shards:2"):  # McMahan et al.'s 100 devices of 600 images
        wanted = [0, 42, 99]
        for part, got in zip(wanted, load_parts("mnist", mnist, spec, 100, wanted, seed=0), strict=True):
            assert len(got) == 600
            assert_same_data(got, select_part(full, spec, 100, part, seed=0))
