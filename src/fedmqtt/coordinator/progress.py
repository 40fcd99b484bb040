"""Terminal progress for the coordinator: a rich progress bar on a TTY when rich is installed (the ``sim`` extra),
log lines otherwise."""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fedmqtt.coordinator.config import CoordinatorConfig
from fedmqtt.extras import optional, require
from fedmqtt.schema import Status

if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger("fedmqtt.coordinator")


class ProgressView:
    def __init__(self, config: CoordinatorConfig, *, enabled: bool, plain: bool = True) -> None:
        self.config = config
        self.enabled = enabled  # rich display (a TTY)
        self.plain = plain  # otherwise: one line per change on stderr
        self._last_line = ""
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressView:
        progress = optional("sim", "rich.progress") if self.enabled else None
        if progress is not None:
            self._progress = progress.Progress(
                progress.TextColumn("[bold]{task.description}"),
                progress.BarColumn(),
                progress.MofNCompleteColumn(),
                progress.TextColumn("{task.fields[detail]}"),
                progress.TimeElapsedColumn(),
                console=require("sim", "rich.console").Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task(f"job {self.config.job}", total=self.config.rounds, detail="")
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, status: Status) -> None:
        acc = status.last_metrics.accuracy if status.last_metrics and status.last_metrics.accuracy is not None else None
        eps = f" eps={status.privacy.epsilon:.2f}" if status.privacy else ""
        line = (
            f"round {status.round}/{status.rounds_total} {status.phase.value} "
            f"updates {status.received}/{status.needed} online {status.devices_online}"
            + (f" acc={acc:.4f}" if acc is not None else "")
            + eps
            + (f" refused={status.refused_total}" if status.refused_total else "")
        )
        if self._progress is not None:
            done = max(0, status.round - (0 if status.phase.value in ("finished",) else 1))
            self._progress.update(self._task, completed=done, detail=line)
        elif self.plain and line != self._last_line:
            print(f"[{self.config.job}] {line}", file=sys.stderr, flush=True)
        self._last_line = line

    def final_line(self, service: Any) -> str:
        return f"fedmqtt coordinator: {self._last_line}"
