"""The downstream probe's learning curve: accuracy, F1 and ROC-AUC of `albert-finetune` against pretraining steps.

Pretrains the demo's model (albert-tiny with the demo's 8,000-piece vocabulary, the demo's shards of the Wikipedia
excerpt, ds_configs/cpu-zero2-bf16-lamb.json on 2 CPU ranks under torchrun) for --steps, keeping a checkpoint
every --every steps, exports each checkpoint with `albert-export` and runs `albert-finetune` on it with the demo's
probe settings (Pang & Lee's 200 labelled movie-review sentences, 4 stratified folds, 5 epochs; or --data). The
same architecture from random initialisation is probed once, with the first checkpoint: with the same folds,
seeds and settings it is the same for every checkpoint. Differences are paired over those folds and seeds.

The learning-rate schedule (linear warmup, then linear decay to 0 at --steps) stretches with --steps, so the
checkpoint at step 300 of a 3000-step run is not the demo's final model. Everything is kept under --work, and a
re-run resumes: pretraining from its newest checkpoint, exports and probes that are done are reused.

    python bench/bench_finetune.py                       # 3000 steps (10x the demo), a checkpoint every 300
    python bench/bench_finetune.py --steps 200 --every 100 --work runs/bench-finetune-short
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from harness import markdown_table  # noqa: E402

from common.logs import setup_logging  # noqa: E402
from data_prep.demo_data import prepare_demo_data  # noqa: E402
from data_prep.sample_corpora import pang_lee_polarity  # noqa: E402
from pipeline.checkpoint import complete_checkpoints  # noqa: E402
from pipeline.classification_metrics import paired_difference  # noqa: E402
from pipeline.demo import PROBE_SETTINGS, pretrain_args, write_model_config  # noqa: E402
from pipeline.distributed import torchrun_pretrain  # noqa: E402

log = logging.getLogger("bench")


def run(cmd: list[str], env: dict | None = None) -> None:
    log.info("running: %s", shlex.join(cmd[2:] if cmd[0] == sys.executable else cmd))
    if subprocess.run(cmd, cwd=REPO, env=env).returncode:
        raise SystemExit(f"failed: {shlex.join(cmd)}")


def pretrain(args: argparse.Namespace, data, model_config: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    keep = ["--keep-checkpoints", str(args.steps // args.every + 1)]  # every checkpoint of the curve
    run(
        torchrun_pretrain(
            args.ranks, [*pretrain_args(args.deepspeed_config, model_config, data, out, args.steps, args.every), *keep]
        ),
        env,
    )


def probe(args: argparse.Namespace, hf: Path, labelled: Path, out: Path, baseline: str) -> dict:
    results = out / "results.json"
    if not (results.is_file() and json.loads(results.read_text()).get("complete")):
        cmd = [sys.executable, "-m", "pipeline.finetune", "--model", str(hf), "--data", str(labelled)]
        cmd += ["--text-column", args.text_column, "--label-column", args.label_column]
        cmd += ["--folds", str(args.folds), "--seeds", str(args.seeds), "--epochs", str(args.epochs)]
        cmd += [*PROBE_SETTINGS, "--baseline", baseline, "--output", str(out)]
        run(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(results.read_text())


def eval_metrics(metrics_file: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return {m["step"]: m for m in lines if m.get("split") == "eval"}


def cell(v: dict, signed: bool = False) -> str:
    return f"{v['mean']:+.3f} ± {v['std']:.3f}" if signed else f"{v['mean']:.3f} ± {v['std']:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "runs" / "bench-finetune", help="data, runs and probes go here"
    )
    parser.add_argument("--steps", type=int, default=3000, help="pretraining steps (the demo: 300)")
    parser.add_argument("--every", type=int, default=300, help="a checkpoint, an evaluation and a probe every N steps")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--deepspeed-config", type=Path, default=REPO / "ds_configs" / "cpu-zero2-bf16-lamb.json")
    parser.add_argument("--data", type=Path, default=None, help="labelled file (default: the demo's 200 movie reviews)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--folds", type=int, default=4, help="the probe's folds (the demo's: 4)")
    parser.add_argument("--epochs", type=int, default=5, help="the probe's epochs (the demo's: 5)")
    parser.add_argument("--seeds", type=int, default=1, help="the probe's seeds")
    args = parser.parse_args(argv)
    if args.every < 1 or args.steps < args.every:
        parser.error("--every must be between 1 and --steps")
    setup_logging(False)
    started = datetime.datetime.now().astimezone()

    data = prepare_demo_data(args.work / "data")
    labelled = args.data or pang_lee_polarity()
    vocab_size, model_config = write_model_config(data.train, args.work)
    train_dir = args.work / "train"
    pretrain(args, data, model_config, train_dir)

    checkpoints = train_dir / "checkpoints"
    evals = eval_metrics(train_dir / "metrics.jsonl")
    rows, baseline = [], None
    for tag_dir in complete_checkpoints(checkpoints):
        step = json.loads((tag_dir / "complete.json").read_text())["step"]
        hf = args.work / "hf" / tag_dir.name
        if not (hf / "model.safetensors").is_file():
            run(
                [
                    sys.executable,
                    "-m",
                    "pipeline.export",
                    "--checkpoint",
                    str(checkpoints),
                    "--tag",
                    tag_dir.name,
                    "--output",
                    str(hf),
                    "--spm-model",
                    str(data.spm_model),
                ]
            )
        kind = "random-init" if baseline is None else "none"
        results = probe(args, hf, labelled, args.work / "probe" / tag_dir.name, kind)
        if baseline is None:
            baseline = [r for r in results["runs"] if r["model"] == "random-init"]
            rows.append(("0 (random init)", None, results["summary"]["random-init"], None))
        pre = [r for r in results["runs"] if r["model"] == "pretrained"]
        rows.append((str(step), evals.get(step), results["summary"]["pretrained"], paired_difference(pre, baseline)))
    if baseline is None:
        raise SystemExit(f"{checkpoints}: no complete checkpoints")

    table = []
    for step, ev, s, diff in rows:
        table.append(
            [
                step,
                "-" if ev is None else f"{ev['mlm_accuracy']:.3f}",
                "-" if ev is None else f"{ev['sop_accuracy']:.3f}",
                cell(s["accuracy"]),
                cell(s["f1"]),
                cell(s["roc_auc"]),
                "-" if diff is None else cell(diff["f1"], signed=True),
                "-" if diff is None else cell(diff["roc_auc"], signed=True),
            ]
        )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    first = json.loads((args.work / "probe" / complete_checkpoints(checkpoints)[0].name / "results.json").read_text())
    settings = first["settings"]
    minutes = (datetime.datetime.now().astimezone() - started).total_seconds() / 60
    print(
        f"\nprobe learning curve: {started:%Y-%m-%d %H:%M %Z}, {platform.node()}, {cpus} cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}; {minutes:.0f} min"
    )
    print(f"command: python {shlex.join(['bench/bench_finetune.py', *(sys.argv[1:] if argv is None else argv)])}")
    print(
        f"pretraining: albert-tiny, vocabulary {vocab_size}, {args.steps} steps of batch 32 on {args.ranks} CPU ranks "
        f"({args.deepspeed_config.name}); eval MLM/SOP accuracy on the eval shards (SOP chance 0.5)"
    )
    print(
        f"probe: {first['data']['path']} ({first['data']['examples']} examples), {first['evaluation']}, "
        f"{settings['epochs']} epochs, lr {settings['lr']:g}, batch {settings['batch_size']}, "
        f"max length {settings['max_seq_length']}; "
        f"F1 of {first['positive_label']!r}; mean ± std over folds x seeds; Δ: paired difference with random init\n"
    )
    headers = ["step", "eval MLM acc", "eval SOP acc", "accuracy", "F1", "ROC-AUC", "Δ F1", "Δ ROC-AUC"]
    print(markdown_table(headers, table, numeric=set(range(1, 8))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
