"""Checks of the files and directories named by command-line flags or config files, made before any work.

Each ``*_problem`` function returns ``None`` when the path can be used, else what is wrong, worded to follow
the path ("ckpt is a file, not a directory"), so a caller can name its own flag or setting. The ``require_*``
functions raise :class:`fedmqtt.errors.ConfigError` naming the flag: ``--out: runs/x is a file, not a
directory``. Nothing here creates or changes a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fedmqtt.errors import ConfigError

PathLike = str | os.PathLike[str]


def input_file_problem(path: PathLike) -> str | None:
    """A file that is read: it must exist, be a file (not a directory) and open for reading."""
    p = Path(path).expanduser()
    if not p.exists():
        return "is a broken symbolic link" if p.is_symlink() else "does not exist"
    if p.is_dir():
        return "is a directory, not a file"
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def input_dir_problem(path: PathLike) -> str | None:
    """A directory that is read: it must exist, be a directory and be listable."""
    p = Path(path).expanduser()
    if not p.exists():
        return "is a broken symbolic link" if p.is_symlink() else "does not exist"
    if not p.is_dir():
        return "is a file, not a directory"
    if not os.access(p, os.R_OK | os.X_OK):
        return "cannot be read (permission denied)"
    return None


def output_dir_problem(path: PathLike) -> str | None:
    """A directory that is written to, created with its parents when missing."""
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            return "is a file, not a directory" if p.exists() else "is a broken symbolic link"
        if not os.access(p, os.W_OK | os.X_OK):
            return "is not writable"
        return None
    ancestor = p.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor} is not writable"
    return None


def output_file_problem(path: PathLike) -> str | None:
    """A file that is written (replaced if present): not a directory, in a directory that is or can be made
    writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "is a directory, not a file"
    problem = output_dir_problem(p.absolute().parent)
    return None if problem is None else f"cannot be written: its directory {p.absolute().parent} {problem}"


def _require(flag: str, path: PathLike | None, problem_of: Callable[[PathLike], str | None]) -> None:
    if path is None:
        return
    problem = problem_of(path)
    if problem is not None:
        raise ConfigError(flag, f"{path} {problem}")


def require_input_file(flag: str, path: PathLike | None) -> None:
    """Raise :class:`ConfigError` naming ``flag`` unless ``path`` (if given) is a readable file."""
    _require(flag, path, input_file_problem)


def require_input_dir(flag: str, path: PathLike | None) -> None:
    """Raise :class:`ConfigError` naming ``flag`` unless ``path`` (if given) is a readable directory."""
    _require(flag, path, input_dir_problem)


def require_output_file(flag: str, path: PathLike | None) -> None:
    """Raise :class:`ConfigError` naming ``flag`` unless ``path`` (if given) can be written as a file."""
    _require(flag, path, output_file_problem)


def require_output_dir(flag: str, path: PathLike | None) -> None:
    """Raise :class:`ConfigError` naming ``flag`` unless ``path`` (if given) is, or can be made, a writable
    directory."""
    _require(flag, path, output_dir_problem)
