"""The report of `albert-probe`: its output folder (refused unless new, empty or its own), and the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .classification_metrics import METRIC_NAMES

RESULTS = "results.json"
TOOL = "albert-probe"
METRIC_LABELS = {**METRIC_NAMES, "spearman": "Spearman"}
KIND_COLUMNS = ("pretrained", "random-init")


class OutputError(ValueError):
    """An --output albert-probe may not write; the message names it and the way out."""


def _leftover(name: str) -> bool:
    """A temporary file of an atomic write of results.json that was killed."""
    return name.startswith(f".{RESULTS}.") and name.endswith(".tmp")


def is_probe_output(folder: Path) -> bool:
    try:
        record = json.loads((folder / RESULTS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("tool") == TOOL


def check_output(out: Path) -> None:
    """Refuse an --output that is a file, or a folder holding anything but an earlier albert-probe results.json."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out}: is a file, not a folder; choose a folder")
    if not out.is_dir():
        return
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not _leftover(p.name))
    if not entries or (entries == [RESULTS] and is_probe_output(out)):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise OutputError(
        f"--output {out}: the folder holds {shown} and is not an earlier albert-probe output (only its "
        f"{RESULTS}); choose a new or empty folder"
    )


def short_verdict(interval: dict) -> str:
    if not interval["used"] or interval["low"] is None:
        return "undefined"
    if interval["low"] > 0:
        return "excludes zero: pretrained higher"
    if interval["high"] < 0:
        return "excludes zero: pretrained lower"
    return "includes zero: no difference shown"


def _number(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def interval_text(interval: dict) -> str:
    return f"[{_number(interval['low'], True)}, {_number(interval['high'], True)}]"


def source_line(results: dict) -> str:
    checkpoint = results.get("checkpoint")
    if not checkpoint:
        return f"albert-probe: {results['model']}"
    return f"albert-probe: {results['model']} (checkpoint {checkpoint['tag']} of {checkpoint['folder']})"


def format_table(results: dict) -> str:
    """One row per task and metric: both encoders, the difference, its interval and the verdict in words; then
    the coverage and the data of each task."""
    settings = results["settings"]
    level = f"{100 * settings['confidence']:g}%"
    lines = [
        source_line(results),
        f"  frozen encoders: pretrained and random init (seed {settings['seed']}); difference: pretrained - random "
        f"init, {level} paired bootstrap interval over the same items ({settings['resamples']} resamples)",
        f"{'task':<12}{'metric':<11}{'pretrained':>11}{'random-init':>13}{'difference':>12}  {level + ' interval':<19}"
        "verdict",
    ]
    for task, result in results["tasks"].items():
        for i, metric in enumerate(result["metrics"]):
            interval = result["difference"][metric]
            lines.append(
                f"{task if i == 0 else '':<12}{METRIC_LABELS[metric]:<11}"
                f"{_number(result['pretrained'][metric]):>11}{_number(result['random-init'][metric]):>13}"
                f"{_number(interval['difference'], True):>12}  {interval_text(interval):<19}{short_verdict(interval)}"
            )
    for task, result in results["tasks"].items():
        lines.append(f"  {task}: {data_line(result)}")
    return "\n".join(lines)


def data_line(result: dict) -> str:
    """What the task was measured on, and its coverage."""
    data = result["data"]
    if "pairs" in data:
        coverage = result["coverage"]
        uncovered = coverage["words"] - coverage["words_covered"]
        return (
            f"{coverage['pairs_covered']} of {coverage['pairs']} pairs ({100 * coverage['fraction']:.0f}%) covered: "
            f"{coverage['words']} words, {uncovered or 'none'} with <unk> or no piece, "
            f"{coverage['words_one_piece']} a single piece"
        )
    counts = ", ".join(f"{name} {n}" for name, n in data["class_counts"].items())
    return (
        f"{data['documents']} posts ({counts}; {data['dropped_empty']} left empty by removing {data['removed']}, "
        f"dropped), {data['truncated']} truncated, {data['unknown_pieces']} of {data['pieces']} pieces <unk>; "
        f"{result['probe'].split(': ', 1)[1]}; {result['averaging']}"
    )
