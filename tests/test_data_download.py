"""Downloading the original IDX files into the user cache (fedmqtt.data), against a real local HTTP mirror.

No internet: the ``data_mirror`` fixture (conftest) serves ../shared/data on loopback and points
``$FEDMQTT_DATA_MIRROR`` at it, with ``$FEDMQTT_DATA`` unset and an empty ``$XDG_CACHE_HOME``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import SHARED_DATA, DataMirror
from fedmqtt.data import (
    IDX_FILES,
    SOURCES,
    DatasetChecksumMismatch,
    DatasetDownloadFailed,
    DatasetNotFound,
    default_cache_dir,
    download_dataset,
    load_dataset,
    mirror_urls,
    resolve_data_dir,
    write_idx_dataset,
)

MNIST_FILES = [remote.name for remote in SOURCES["mnist"].files]


def cache_listing(directory: Path) -> list[str]:
    """Every entry of a cache directory but the lock file (so: downloaded files, or leftovers)."""
    return sorted(p.name for p in directory.iterdir() if p.name != ".download.lock") if directory.exists() else []


# --------------------------------------------------------------------------------------------------
# The published checksums


@pytest.mark.parametrize("dataset", sorted(SOURCES))
def test_published_checksums_match_the_original_files(dataset: str) -> None:
    source = SOURCES[dataset]
    assert sorted(r.name.removesuffix(".gz") for r in source.files) == sorted(IDX_FILES)
    for remote in source.files:
        data = (SHARED_DATA / dataset / remote.name).read_bytes()
        assert len(data) == remote.size
        assert hashlib.sha256(data).hexdigest() == remote.sha256
        assert hashlib.md5(data, usedforsecurity=False).hexdigest() == remote.md5


def test_mirror_urls() -> None:
    assert mirror_urls("mnist", None) == SOURCES["mnist"].urls
    assert mirror_urls("mnist", "") == SOURCES["mnist"].urls
    assert all(url.startswith("https://") for url in SOURCES["mnist"].urls)
    assert mirror_urls("mnist", "http://h:8/data") == ("http://h:8/data/mnist/",)
    assert mirror_urls("fashion-mnist", "http://h/data/") == ("http://h/data/fashion-mnist/",)
    assert mirror_urls("fashion-mnist", "https://h/{dataset}-idx") == ("https://h/fashion-mnist-idx/",)


# --------------------------------------------------------------------------------------------------
# Downloading


def test_an_empty_cache_is_filled_from_the_mirror_once(
    data_mirror: DataMirror, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = default_cache_dir("mnist")
    assert not cache.exists()
    assert resolve_data_dir(None, "mnist") == cache
    assert sorted(data_mirror.file_requests()) == sorted(f"/mnist/{name}" for name in MNIST_FILES)
    assert cache_listing(cache) == sorted(MNIST_FILES)  # no temporary file left
    for name in MNIST_FILES:
        assert (cache / name).read_bytes() == (SHARED_DATA / "mnist" / name).read_bytes()
        assert (cache / name).stat().st_mode & 0o777 == 0o644
    assert "downloading mnist (4 files)" in capsys.readouterr().err
    assert len(load_dataset("mnist", cache, train=False)) == 10000
    # Found in the cache from now on: nothing is fetched again.
    assert resolve_data_dir(None, "mnist") == cache
    assert len(data_mirror.file_requests()) == 4


def test_only_missing_files_are_fetched(data_mirror: DataMirror, tmp_path: Path) -> None:
    target = tmp_path / "partial"
    target.mkdir()
    for name in MNIST_FILES[1:]:
        (target / name).write_bytes((SHARED_DATA / "mnist" / name).read_bytes())
    assert download_dataset("mnist", target, mirror=data_mirror.url, progress=False) == target
    assert data_mirror.file_requests() == [f"/mnist/{MNIST_FILES[0]}"]


@pytest.mark.parametrize("how", ["one byte changed", "longer than the original"])
def test_a_checksum_mismatch_is_refused_and_nothing_is_kept(data_mirror: DataMirror, how: str) -> None:
    name = "t10k-images-idx3-ubyte.gz"
    original = (SHARED_DATA / "mnist" / name).read_bytes()
    bad = original[:100] + bytes([original[100] ^ 1]) + original[101:] if how == "one byte changed" else original * 2
    data_mirror.replace[f"/mnist/{name}"] = bad
    with pytest.raises(DatasetChecksumMismatch) as caught:
        resolve_data_dir(None, "mnist")
    message = str(caught.value)
    remote = next(r for r in SOURCES["mnist"].files if r.name == name)
    assert name in message and f"{data_mirror.url}/mnist/{name}" in message
    assert remote.sha256 in message and caught.value.expected_sha256 == remote.sha256
    shown = hashlib.sha256(bad).hexdigest() if how == "one byte changed" else caught.value.actual_sha256
    assert shown in message and shown != remote.sha256
    cache = default_cache_dir("mnist")
    assert name not in cache_listing(cache)
    assert all(entry in MNIST_FILES for entry in cache_listing(cache))  # only verified files carry a name
    # The mirror is fixed: the next run fetches what is missing, and only that.
    del data_mirror.replace[f"/mnist/{name}"]
    before = len(data_mirror.file_requests())
    assert resolve_data_dir(None, "mnist") == cache
    assert data_mirror.file_requests()[before:] == [f"/mnist/{name}", "/mnist/t10k-labels-idx1-ubyte.gz"]
    assert (cache / name).read_bytes() == original


def test_a_cut_transfer_leaves_no_partial_file(data_mirror: DataMirror) -> None:
    name = "train-images-idx3-ubyte.gz"
    data_mirror.cut[f"/mnist/{name}"] = 1_000_000
    with pytest.raises(DatasetDownloadFailed) as caught:
        resolve_data_dir(None, "mnist")
    message = str(caught.value)
    assert f"{data_mirror.url}/mnist/{name}" in message and "FEDMQTT_DATA_MIRROR" in message
    assert "ended after 1000000 of 9912422 bytes" in message
    assert isinstance(caught.value, DatasetNotFound)
    assert cache_listing(default_cache_dir("mnist")) == []


def test_missing_files_and_unreachable_mirrors_are_clear_errors(
    data_mirror: DataMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_mirror.root = tmp_path / "empty-mirror"  # every file answers 404
    with pytest.raises(DatasetDownloadFailed, match="404"):
        resolve_data_dir(None, "fashion-mnist")
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("FEDMQTT_DATA_MIRROR", f"http://127.0.0.1:{port}")
    with pytest.raises(DatasetDownloadFailed, match="refused"):
        resolve_data_dir(None, "mnist")
    assert cache_listing(default_cache_dir("mnist")) == []


def test_concurrent_downloads_into_one_cache_fetch_each_file_once(data_mirror: DataMirror) -> None:
    results: list[Path | BaseException] = []

    def resolve() -> None:
        try:
            results.append(resolve_data_dir(None, "mnist"))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [default_cache_dir("mnist")] * 3
    assert sorted(data_mirror.file_requests()) == sorted(f"/mnist/{name}" for name in MNIST_FILES)


def test_a_file_url_mirror_works_too(data_mirror: DataMirror, tmp_path: Path) -> None:
    target = download_dataset("fashion-mnist", tmp_path / "fm", mirror=SHARED_DATA.as_uri(), progress=False)
    assert cache_listing(target) == sorted(r.name for r in SOURCES["fashion-mnist"].files)
    assert data_mirror.file_requests() == []


# --------------------------------------------------------------------------------------------------
# Precedence: --data-dir, then $FEDMQTT_DATA, then the cache


def test_flag_then_environment_then_cache(
    data_mirror: DataMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = write_idx_dataset(tmp_path / "flag", num_train=4, num_test=2, seed=0)
    env = write_idx_dataset(tmp_path / "env" / "mnist", num_train=4, num_test=2, seed=1)
    monkeypatch.setenv("FEDMQTT_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(str(flag), "mnist") == flag
    assert resolve_data_dir(None, "mnist") == env
    assert data_mirror.requests == []  # neither downloads
    monkeypatch.delenv("FEDMQTT_DATA")
    assert resolve_data_dir(None, "mnist") == default_cache_dir("mnist")
    assert len(data_mirror.file_requests()) == 4
    assert resolve_data_dir(str(flag), "mnist") == flag  # the flag still wins over a full cache


@pytest.mark.parametrize("origin", ["--data-dir", "$FEDMQTT_DATA"])
def test_an_explicit_directory_is_never_downloaded_into(
    data_mirror: DataMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "train-images-idx3-ubyte.gz").write_bytes(
        (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").read_bytes()
    )
    flag = str(empty) if origin == "--data-dir" else None
    if origin == "$FEDMQTT_DATA":
        monkeypatch.setenv("FEDMQTT_DATA", str(empty))
    with pytest.raises(DatasetNotFound) as caught:
        resolve_data_dir(flag, "mnist")
    message = str(caught.value)
    assert f"came from {origin}" in message and str(default_cache_dir("mnist")) in message
    assert caught.value.missing == IDX_FILES[1:]  # exactly what is missing
    assert data_mirror.requests == [] and sorted(p.name for p in empty.iterdir()) == ["train-images-idx3-ubyte.gz"]


def test_a_fresh_home_without_settings_downloads_into_its_cache(data_mirror: DataMirror, tmp_path: Path) -> None:
    """What `make demo` meets on a new machine: no $FEDMQTT_DATA, no ../shared, a network (the mirror)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FEDMQTT_DATA", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    script = "from fedmqtt.data import resolve_data_dir; print(resolve_data_dir(None, 'mnist'))"
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(home / ".cache" / "fedmqtt" / "mnist")
    assert cache_listing(home / ".cache" / "fedmqtt" / "mnist") == sorted(MNIST_FILES)
