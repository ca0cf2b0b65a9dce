"""Learning curves against pretraining steps: eval MLM/SOP on held-out text, the intrinsic probes
(`albert-probe`: WordSim-353, SimLex-999, the newsgroup topic probe) and the downstream probe (`albert-finetune`),
each against random init.

By default the text is `sword_english` (data_prep/sample_corpora.py: about 13.7 MB of public-domain English from four
Debian SWORD packages, two Bible translations and two commentaries); the eval shards hold whole books that are not
in training, in no module (`HELDOUT_BOOKS`), so eval loss measures generalisation, not memory. `--corpus
wikipedia-excerpt` gives the demo's data (2 MB, eval on a held-out quarter of it). The model is albert-tiny with the
corpus's vocabulary (16,000 pieces; the demo's 8,000 for the excerpt), pretrained with
ds_configs/cpu-zero2-bf16-lamb.json on 2 CPU ranks under torchrun for --steps, with a checkpoint every --every
steps. Each checkpoint is exported with `albert-export`; `albert-probe` runs on it (pretrained and random init,
paired 95% bootstrap intervals over words pairs and posts), and `albert-finetune` with the demo's probe settings
(Pang & Lee's 200 labelled movie-review sentences, 4 stratified folds, 5 epochs; or --data). Random init is
fine-tuned once, with the first checkpoint: with the same folds, seeds and settings it is the same for every
checkpoint. Fine-tuning differences are paired over those folds and seeds.

`--masking dynamic` trains on shards made with `albert-data shard --masking dynamic` (each pair once, masked
afresh every epoch in the loader) instead of the static masks of 5 passes; the eval shard is the same static one, so
two runs that differ only in --masking are compared on the same masked eval sequences. `--dupe-factor 5` with it
makes the same 5 passes of pairs as the static shards, unmasked: then only the masking differs.

The learning-rate schedule (linear warmup, then linear decay to 0 at --steps) stretches with --steps. The data (corpus,
vocabulary, shards) is kept under --data-dir and shared by runs of either masking; runs, exports and probes under
--work. A re-run resumes: pretraining from its newest checkpoint, exports and probes that are
done are reused.

    python bench/bench_learning.py                       # 3000 steps, a checkpoint every 500 (about an hour)
    python bench/bench_learning.py --size quick          # 200 steps, a checkpoint every 100 (a check)
    python bench/bench_learning.py --masking dynamic     # the same, trained on dynamically masked shards
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
from data_prep.cli import main as albert_data  # noqa: E402
from data_prep.demo_data import DemoData, prepare_demo_data  # noqa: E402
from data_prep.inspection import verify_folder  # noqa: E402
from data_prep.sample_corpora import HELDOUT_BOOKS, pang_lee_polarity, sword_english  # noqa: E402
from pipeline.checkpoint import complete_checkpoints  # noqa: E402
from pipeline.classification_metrics import paired_difference  # noqa: E402
from pipeline.demo import INTRINSIC_ROWS, PROBE_SETTINGS, pretrain_args, write_model_config  # noqa: E402
from pipeline.distributed import torchrun_pretrain  # noqa: E402
from pipeline.metrics import ANOMALY  # noqa: E402
from pipeline.probe_report import interval_text  # noqa: E402

log = logging.getLogger("bench")

# (steps, checkpoint interval) of each --size: the default is sized to about an hour on 2 CPU cores.
SIZES = {"default": (3000, 500), "quick": (200, 100)}
SWORD_VOCAB_SIZE = 16000
DEFAULT_DUPE = {"static": 5, "dynamic": 1}  # albert-data shard's default dupe factor of each masking
EVAL_BATCHES = 50  # micro-batches per evaluation: 50 x 16 sequences x 2 ranks


def run(cmd: list[str], env: dict | None = None) -> None:
    log.info("running: %s", shlex.join(cmd[2:] if cmd[0] == sys.executable else cmd))
    if subprocess.run(cmd, cwd=REPO, env=env).returncode:
        raise SystemExit(f"failed: {shlex.join(cmd)}")


def albert_data_step(args: list[str]) -> None:
    if albert_data(args) != 0:
        raise SystemExit(f"albert-data {shlex.join(args)} failed")


def prepare_sword_data(output: Path, masking: str, dupe_factor: int | None, workers: int = 2) -> DemoData:
    """sword_english's training text -> vocabulary and 4 train shards (static: 5 passes of masks and pairs in
    `train`; dynamic: each pair once, unmasked, in `train-dynamic`; another dupe factor: `-dupeN` added); its
    held-out books -> 1 static eval shard."""
    corpus = sword_english()
    spm = output / "vocab" / "spiece.model"
    train = "train" if masking == "static" else "train-dynamic"
    train_dupe = dupe_factor or DEFAULT_DUPE[masking]
    if dupe_factor is not None:
        train += f"-dupe{dupe_factor}"
    folders = {"train": (corpus.train, 4), "eval": (corpus.heldout, 1)}
    for name, (text, files) in folders.items():
        if not (output / "corpus" / name / f"corpus-{files - 1:05d}.txt").exists():
            albert_data_step(
                ["corpus", "--input", str(text), "--format", "paragraphs", "--output", str(output / "corpus" / name)]
                + ["--num-files", str(files), "--workers", str(workers)]
            )
    if not spm.exists():
        albert_data_step(
            ["vocab", "--input", str(output / "corpus" / "train"), "--output-prefix", str(spm.with_suffix(""))]
            + ["--vocab-size", str(SWORD_VOCAB_SIZE)]
        )
    shards = {"train": (train, masking, train_dupe), "eval": ("eval", "static", 1)}
    for name, (_, files) in folders.items():
        folder_name, kind, dupe = shards[name]
        folder = output / folder_name
        if not (folder / "manifest.json").exists():
            inputs = [str(output / "corpus" / name / f"corpus-{i:05d}.txt") for i in range(files)]
            how = ["--masking", kind, "--dupe-factor", str(dupe)]
            albert_data_step(
                ["shard", "--input", *inputs, "--spm-model", str(spm), "--output", str(folder), *how]
                + ["--num-shards", str(files), "--workers", str(workers), "--resume"]
            )
        problems = verify_folder(folder)
        if problems:
            raise SystemExit("; ".join(problems))
    return DemoData(output / train, output / "eval", spm)


def pretrain(args: argparse.Namespace, data: DemoData, model_config: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    keep = ["--keep-checkpoints", str(args.steps // args.every + 1)]  # every checkpoint of the curve
    run(
        torchrun_pretrain(
            args.ranks,
            [
                *pretrain_args(args.deepspeed_config, model_config, data, out, args.steps, args.every),
                *keep,
                *("--eval-batches", str(EVAL_BATCHES)),
            ],
        ),
        env,
    )


def finetune_probe(args: argparse.Namespace, hf: Path, labelled: Path, out: Path, baseline: str) -> dict:
    results = out / "results.json"
    if not (results.is_file() and json.loads(results.read_text()).get("complete")):
        cmd = [sys.executable, "-m", "pipeline.finetune", "--model", str(hf), "--data", str(labelled)]
        cmd += ["--text-column", args.text_column, "--label-column", args.label_column]
        cmd += ["--folds", str(args.folds), "--seeds", str(args.seeds), "--epochs", str(args.epochs)]
        cmd += [*PROBE_SETTINGS, "--baseline", baseline, "--output", str(out)]
        run(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(results.read_text())


def intrinsic_probe(hf: Path, out: Path) -> dict:
    results = out / "results.json"
    if not results.is_file():
        run([sys.executable, "-m", "pipeline.intrinsic_probe", "--model", str(hf), "--output", str(out)])
    return json.loads(results.read_text())


def metric_lines(metrics_file: Path) -> tuple[dict[int, dict], dict[int, dict], list[dict]]:
    """(train, eval) metrics lines by step, and the anomaly records (pipeline.anomaly's detector, in any mode)."""
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    train = {m["step"]: m for m in lines if m.get("split", "train") == "train"}
    anomalies = [m for m in lines if m.get("split") == ANOMALY]
    return train, {m["step"]: m for m in lines if m.get("split") == "eval"}, anomalies


def train_loss_near(train: dict[int, dict], step: int, window: int) -> str:
    """Mean training MLM loss over the logged steps in (step - window, step]: single batches are noisy."""
    near = [m["mlm_loss"] for s, m in train.items() if step - window < s <= step]
    return f"{sum(near) / len(near):.3f}" if near else "-"


def cell(v: dict, signed: bool = False) -> str:
    return f"{v['mean']:+.3f} ± {v['std']:.3f}" if signed else f"{v['mean']:.3f} ± {v['std']:.3f}"


def interval_cell(result: dict, metric: str) -> str:
    interval = result["difference"][metric]
    return f"{result['pretrained'][metric]:.3f} ({interval['difference']:+.3f} {interval_text(interval)})"


def export(checkpoints: Path, tag: str, hf: Path, spm_model: Path) -> None:
    if not (hf / "model.safetensors").is_file():
        run(
            [sys.executable, "-m", "pipeline.export", "--checkpoint", str(checkpoints), "--tag", tag]
            + ["--output", str(hf), "--spm-model", str(spm_model)]
        )


def print_finetune_table(first: dict, rows: list) -> None:
    settings = first["settings"]
    print(
        f"\nfine-tuning probe: {first['data']['path']} ({first['data']['examples']} examples), {first['evaluation']}, "
        f"{settings['epochs']} epochs, lr {settings['lr']:g}, batch {settings['batch_size']}, "
        f"max length {settings['max_seq_length']}; "
        f"F1 of {first['positive_label']!r}; mean ± std over folds x seeds; Δ: paired difference with random init\n"
    )
    table = [
        [step, cell(s["accuracy"]), cell(s["f1"]), cell(s["roc_auc"])]
        + (["-", "-"] if diff is None else [cell(diff["f1"], signed=True), cell(diff["roc_auc"], signed=True)])
        for step, s, diff in rows
    ]
    headers = ["step", "accuracy", "F1", "ROC-AUC", "Δ F1", "Δ ROC-AUC"]
    print(markdown_table(headers, table, numeric=set(range(1, 6))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="runs and probes (default: runs/bench-learning-SIZE[-dynamic][-dupeN])",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="corpus, vocabulary, shards (default: runs/bench-learning-data-CORPUS)",
    )
    parser.add_argument(
        "--masking",
        choices=("static", "dynamic"),
        default="static",
        help="the training shards: static (5 masked passes, ALBERT's recipe) or dynamic (masked in the loader)",
    )
    parser.add_argument(
        "--dupe-factor",
        type=int,
        default=None,
        help="passes of pairs in the training shards (default: 5 static, 1 dynamic)",
    )
    parser.add_argument(
        "--corpus", choices=("sword-english", "wikipedia-excerpt"), default="sword-english", help="pretraining text"
    )
    parser.add_argument(
        "--size", choices=tuple(SIZES), default="default", help="default: 3000 steps, every 500; quick: 200, every 100"
    )
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: from --size)")
    parser.add_argument("--every", type=int, default=None, help="a checkpoint, an evaluation and the probes every N")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--deepspeed-config", type=Path, default=REPO / "ds_configs" / "cpu-zero2-bf16-lamb.json")
    parser.add_argument(
        "--finetune", action="store_true", help="also the fine-tuning probe (albert-finetune): minutes per checkpoint"
    )
    parser.add_argument("--data", type=Path, default=None, help="labelled file (default: the demo's 200 movie reviews)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--folds", type=int, default=4, help="the fine-tuning probe's folds (the demo's: 4)")
    parser.add_argument("--epochs", type=int, default=5, help="the fine-tuning probe's epochs (the demo's: 5)")
    parser.add_argument("--seeds", type=int, default=1, help="the fine-tuning probe's seeds")
    args = parser.parse_args(argv)
    size_steps, size_every = SIZES[args.size]
    args.steps = size_steps if args.steps is None else args.steps
    args.every = size_every if args.every is None else args.every
    if args.dupe_factor == DEFAULT_DUPE[args.masking]:
        args.dupe_factor = None  # (the default's folders)
    dupe = f"-dupe{args.dupe_factor}" if args.dupe_factor is not None else ""
    masking = "-dynamic" if args.masking == "dynamic" else ""
    args.work = args.work or REPO / "runs" / f"bench-learning-{args.size}{masking}{dupe}"
    args.data_dir = args.data_dir or REPO / "runs" / f"bench-learning-data-{args.corpus}"
    if args.every < 1 or args.steps < args.every:
        parser.error("--every must be between 1 and --steps")
    setup_logging(False)
    args.work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()

    if args.corpus == "sword-english":
        data = prepare_sword_data(args.data_dir, args.masking, args.dupe_factor)
    elif args.masking == "dynamic" or args.dupe_factor is not None:
        parser.error("--masking dynamic and --dupe-factor: only with --corpus sword-english")
    else:
        data = prepare_demo_data(args.data_dir)
    labelled = args.data or pang_lee_polarity()
    vocab_size, model_config = write_model_config(data.train, args.work)
    train_dir = args.work / "train"
    pretrain(args, data, model_config, train_dir)

    checkpoints = train_dir / "checkpoints"
    train_metrics, evals, anomalies = metric_lines(train_dir / "metrics.jsonl")
    pretraining_rows, intrinsic_rows, finetune_rows = [], [], []
    baseline = None
    for tag_dir in complete_checkpoints(checkpoints):
        step = json.loads((tag_dir / "complete.json").read_text())["step"]
        hf = args.work / "hf" / tag_dir.name
        export(checkpoints, tag_dir.name, hf, data.spm_model)
        intrinsic = intrinsic_probe(hf, args.work / "intrinsic" / tag_dir.name)
        if not intrinsic_rows:
            intrinsic_rows.append(
                ["0 (random init)"]
                + [f"{intrinsic['tasks'][task]['random-init'][metric]:.3f}" for task, metric, _ in INTRINSIC_ROWS]
            )
        if args.finetune:
            kind = "random-init" if baseline is None else "none"
            results = finetune_probe(args, hf, labelled, args.work / "probe" / tag_dir.name, kind)
            if baseline is None:
                baseline = [r for r in results["runs"] if r["model"] == "random-init"]
                finetune_rows.append(("0 (random init)", results["summary"]["random-init"], None))
            pre = [r for r in results["runs"] if r["model"] == "pretrained"]
            finetune_rows.append((str(step), results["summary"]["pretrained"], paired_difference(pre, baseline)))
        intrinsic_rows.append(
            [str(step)] + [interval_cell(intrinsic["tasks"][task], metric) for task, metric, _ in INTRINSIC_ROWS]
        )
        ev = evals.get(step)
        pretraining_rows.append(
            [str(step), train_loss_near(train_metrics, step, args.every // 5 or 1)]
            + (
                ["-"] * 4
                if ev is None
                else [
                    f"{ev['mlm_loss']:.3f}",
                    f"{ev['mlm_accuracy']:.3f}",
                    f"{ev['sop_loss']:.3f}",
                    f"{ev['sop_accuracy']:.3f}",
                ]
            )
        )
    if not pretraining_rows:
        raise SystemExit(f"{checkpoints}: no complete checkpoints")

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    first_dir = complete_checkpoints(checkpoints)[0].name
    first_intrinsic = json.loads((args.work / "intrinsic" / first_dir / "results.json").read_text())
    minutes = (datetime.datetime.now().astimezone() - started).total_seconds() / 60
    manifests = {
        name: json.loads((folder / "manifest.json").read_text())
        for name, folder in (("train", data.train), ("eval", data.eval))
    }
    print(
        f"\nlearning curves: {started:%Y-%m-%d %H:%M %Z}, {platform.node()}, {cpus} cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}; {minutes:.0f} min"
    )
    print(f"command: python {shlex.join(['bench/bench_learning.py', *(sys.argv[1:] if argv is None else argv)])}")
    held = f"held-out books {', '.join(HELDOUT_BOOKS)}" if args.corpus == "sword-english" else "a held-out quarter"
    print(
        f"pretraining: {args.corpus} ({manifests['train']['num_examples']} training sequences; eval: "
        f"{manifests['eval']['num_examples']} sequences of {held}), albert-tiny, vocabulary {vocab_size}, "
        f"{args.steps} steps of batch 32 on {args.ranks} CPU ranks ({args.deepspeed_config.name}); eval over "
        f"{EVAL_BATCHES} micro-batches per rank; train MLM loss: mean of the logged steps in the last {args.every // 5 or 1}"
    )
    shard_settings = manifests["train"]["settings"]
    print(
        f"training shards: {data.train} (masking {shard_settings.get('masking', 'static')}, "
        f"{shard_settings['dupe_factor']} pass(es) over the corpus)"
    )
    named = "; ".join(f"step {m['step']}: {m['cause']}" for m in anomalies[:5]) + (" ..." if len(anomalies) > 5 else "")
    print(
        f"anomalous steps (albert-pretrain's detector at its defaults, docs/training.md): {len(anomalies)}"
        f"{' (' + named + ')' if anomalies else ''}"
    )
    print()
    headers = ["step", "train MLM loss", "eval MLM loss", "eval MLM acc", "eval SOP loss", "eval SOP acc"]
    print(markdown_table(headers, pretraining_rows, numeric=set(range(1, 6))))
    isettings = first_intrinsic["settings"]
    print(
        f"\nintrinsic probes (albert-probe, frozen encoders): pretrained figure (difference with random init "
        f"[{100 * isettings['confidence']:g}% paired bootstrap interval, {isettings['resamples']} resamples])\n"
    )
    print(
        markdown_table(["step", *(label for _, _, label in INTRINSIC_ROWS)], intrinsic_rows, numeric=set(range(1, 5)))
    )
    if args.finetune:
        print_finetune_table(json.loads((args.work / "probe" / first_dir / "results.json").read_text()), finetune_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
