"""The run report of ``fedmqtt simulate``: ``report.json`` and ``report.png``.

``build_report`` is pure (round summaries and status in, a JSON-ready dict out); ``write_report`` writes
the two files. The JSON layout::

    {"config": {...the simulation's settings...},
     "rounds": [{"round", "accuracy", "loss", "participants", "refused", "bytes_up", "bytes_down",
                 "bytes_down_delta", "bytes_down_full", "seconds", "closed_by", "refused_by_reason", "epsilon",
                 "sparsity", "cumulative_megabytes"}, ...],
     "totals": {"rounds_completed", "rounds_total", "phase", "final_accuracy", "final_loss",
                "best_accuracy", "bytes_up", "bytes_down", "megabytes", "round_seconds", "wall_seconds",
                "refused", "refused_by_reason", "epsilon", "delta", "malformed_messages"}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmqtt.errors import FedmqttError
from fedmqtt.schema import PrivacyLedger, RoundSummary, Status

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
ROUND_KEYS = (
    "round",
    "accuracy",
    "loss",
    "participants",
    "refused",
    "bytes_up",
    "bytes_down",
    "bytes_down_delta",
    "bytes_down_full",
    "seconds",
    "closed_by",
    "refused_by_reason",
    "epsilon",
    "sparsity",
    "cumulative_megabytes",
)
_MB = 1_000_000.0


class ReportError(FedmqttError):
    """The run report could not be written."""


def round_entry(summary: RoundSummary, cumulative_bytes: int) -> dict[str, Any]:
    refused = {reason.value: n for reason, n in sorted(summary.refused.items())}
    return {
        "round": summary.round,
        "accuracy": summary.accuracy,
        "loss": summary.loss,
        "participants": len(summary.participants),
        "refused": sum(refused.values()),
        "bytes_up": summary.bytes_up,
        "bytes_down": summary.bytes_down,
        "bytes_down_delta": summary.bytes_down_delta,
        "bytes_down_full": summary.bytes_down_full,
        "seconds": summary.seconds,
        "closed_by": summary.closed_by,
        "refused_by_reason": refused,
        "epsilon": summary.epsilon,
        "sparsity": summary.sparsity,
        "cumulative_megabytes": cumulative_bytes / _MB,
    }


def build_report(
    config: Mapping[str, Any],
    summaries: Sequence[RoundSummary],
    status: Status | None,
    privacy: PrivacyLedger | None = None,
    *,
    wall_seconds: float | None = None,
    malformed_messages: int = 0,
) -> dict[str, Any]:
    """The report as a JSON-ready dict. Rounds are ordered by number."""
    ordered = sorted(summaries, key=lambda s: s.round)
    rounds: list[dict[str, Any]] = []
    cumulative = 0
    refused_by_reason: dict[str, int] = {}
    for summary in ordered:
        cumulative += summary.bytes_up + summary.bytes_down
        entry = round_entry(summary, cumulative)
        rounds.append(entry)
        for reason, n in entry["refused_by_reason"].items():
            refused_by_reason[reason] = refused_by_reason.get(reason, 0) + n
    accuracies = [r["accuracy"] for r in rounds if r["accuracy"] is not None]
    last_evaluated = next((r for r in reversed(rounds) if r["accuracy"] is not None), None)
    epsilon = privacy.epsilon if privacy else (status.privacy.epsilon if status and status.privacy else None)
    delta = privacy.delta if privacy else (status.privacy.delta if status and status.privacy else None)
    bytes_up = sum(s.bytes_up for s in ordered)
    bytes_down = sum(s.bytes_down for s in ordered)
    totals = {
        "rounds_completed": len(rounds),
        "rounds_total": status.rounds_total if status else None,
        "phase": status.phase.value if status else None,
        "final_accuracy": last_evaluated["accuracy"] if last_evaluated else None,
        "final_loss": last_evaluated["loss"] if last_evaluated else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "megabytes": (bytes_up + bytes_down) / _MB,
        "round_seconds": sum(s.seconds for s in ordered),
        "wall_seconds": wall_seconds,
        "refused": sum(refused_by_reason.values()),
        "refused_by_reason": dict(sorted(refused_by_reason.items())),
        "epsilon": epsilon,
        "delta": delta,
        "malformed_messages": malformed_messages,
    }
    return {"config": dict(config), "rounds": rounds, "totals": totals}


def plot_report(report: Mapping[str, Any], path: Path) -> None:
    """Accuracy and cumulative megabytes per round, side by side (matplotlib, Agg: no display needed)."""
    from fedmqtt.extras import require

    require("sim", "matplotlib", "the report plot").use("Agg")
    plt = require("sim", "matplotlib.pyplot", "the report plot")
    MaxNLocator = require("sim", "matplotlib.ticker", "the report plot").MaxNLocator

    rounds = report["rounds"]
    numbers = [r["round"] for r in rounds]
    accuracy = [math.nan if r["accuracy"] is None else r["accuracy"] for r in rounds]
    megabytes = [r["cumulative_megabytes"] for r in rounds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        left.plot(numbers, accuracy, marker="o")
        left.set_xlabel("round")
        left.set_ylabel("test accuracy")
        left.set_ylim(0.0, 1.0)
        left.grid(True, alpha=0.3)
        left.set_title("accuracy per round")
        right.plot(numbers, megabytes, marker="o", color="tab:orange")
        right.set_xlabel("round")
        right.set_ylabel("cumulative MB (up + down)")
        right.grid(True, alpha=0.3)
        right.set_title("traffic")
        for axis in (left, right):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        job = report.get("config", {}).get("job")
        if job:
            figure.suptitle(f"fedmqtt job {job}")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)


def write_report(out_dir: Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` into ``out_dir``; return their paths."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / REPORT_JSON
        json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        png_path = out_dir / REPORT_PNG
        plot_report(report, png_path)
    except OSError as exc:
        raise ReportError(f"cannot write the run report into {out_dir}: {exc}; choose another --out") from exc
    return json_path, png_path
