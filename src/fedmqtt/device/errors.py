"""Errors raised by the device side: its data sets (and, later, the agent).

Each message says what is wrong and what to do about it, because a person at a terminal reads it.
"""

from __future__ import annotations

from pathlib import Path

from fedmqtt.errors import FedmqttError


class DeviceError(FedmqttError):
    """Base class of the device subsystem's errors."""


class DatasetError(DeviceError):
    """A data set cannot be found or read."""


class DatasetNotFound(DatasetError):
    """The IDX files of a data set are not where fedmqtt looked, and could not be downloaded."""

    def __init__(self, dataset: str, searched: list[Path], missing: list[str], hint: str = "") -> None:
        where = ", ".join(str(p) for p in searched) or "(nowhere)"
        files = ", ".join(missing)
        message = (
            f"{dataset} data set not found: missing {files} (each may be gzipped, ending in .gz); "
            f"searched {where}. Put the IDX files in a directory and pass it with --data-dir, or set "
            f"$FEDMQTT_DATA to it (a directory holding the files, or a parent holding mnist/ and "
            f"fashion-mnist/ subdirectories)."
        )
        if hint:
            message += f" {hint}"
        super().__init__(message)
        self.dataset = dataset
        self.searched = tuple(searched)
        self.missing = tuple(missing)


class DatasetCorrupt(DatasetError):
    """An IDX file exists but is not a valid MNIST-style IDX file (wrong magic, truncated, bad gzip)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"{path} is not a valid IDX file: {problem}. Delete it and fetch the original file again "
            f"(or point --data-dir / $FEDMQTT_DATA at a good copy)."
        )
        self.path = path
        self.problem = problem
