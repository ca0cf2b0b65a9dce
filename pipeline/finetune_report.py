"""The report of `albert-finetune`: summaries over folds x seeds, results.json and the table on the terminal."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

from common.atomic import write_text

from .classification_metrics import METRIC_NAMES, METRICS, paired_difference, summarise
from .finetune_loop import PRETRAINED, RANDOM_INIT


def summary(runs: list[dict], kinds: list[str]) -> dict:
    """Per model: mean, std and count of each metric over its runs; with both models, their paired difference."""
    by_kind = {k: [r for r in runs if r["model"] == k] for k in kinds}
    out = {k: summarise(rows) for k, rows in by_kind.items()}
    if RANDOM_INIT in by_kind and len(by_kind[RANDOM_INIT]) == len(by_kind[PRETRAINED]):
        out["difference"] = paired_difference(by_kind[PRETRAINED], by_kind[RANDOM_INIT])
    return out


def write_results(output: Path, results: dict) -> None:
    """results.json, atomically; an undefined value (NaN: ROC-AUC without every class) is written as null."""
    write_text(output / "results.json", json.dumps(_nan_to_none(results), indent=2, allow_nan=False) + "\n")


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def machine(device: torch.device) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({cpu})"
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def format_table(results: dict) -> str:
    """The summary: one row per model (mean ± std over folds x seeds), then the paired difference."""
    summaries = results["summary"]
    width = 15
    lines = [f"{'model':<12}" + "".join(f"{METRIC_NAMES[m]:>{width}}" for m in METRICS)]

    def cell(v: dict, signed: bool = False) -> str:
        if v["mean"] is None or not math.isfinite(v["mean"]):
            return f"{'n/a':>{width}}"
        mean = f"{v['mean']:+.3f}" if signed else f"{v['mean']:.3f}"
        return f"{mean} ± {v['std']:.3f}".rjust(width)

    for kind in (PRETRAINED, RANDOM_INIT):
        if kind in summaries:
            lines.append(f"{kind:<12}" + "".join(cell(summaries[kind][m]) for m in METRICS))
    if "difference" in summaries:
        lines.append(f"{'difference':<12}" + "".join(cell(summaries["difference"][m], signed=True) for m in METRICS))
    counts = ", ".join(f"{c} {n}" for c, n in results["class_counts"].items())
    positive = results["positive_label"]
    head = [
        f"albert-finetune: {results['model']} on {results['data']['path']} ({results['data']['examples']} examples: {counts})",
        f"  {results['evaluation']}; {settings_line(results['settings'])}",
        "  "
        + (f"precision, recall, F1 of the positive class {positive!r}" if positive is not None else "macro averages")
        + "; mean ± std over folds x seeds"
        + (
            "; difference: pretrained - random-init, paired over the same folds and seeds"
            if "difference" in summaries
            else ""
        ),
    ]
    return "\n".join(head + lines)


def settings_line(settings: dict) -> str:
    return (
        f"{settings['epochs']} epochs, lr {settings['lr']:g}, batch {settings['batch_size']}, "
        f"max length {settings['max_seq_length']}, seed {settings['seed']}"
    )
