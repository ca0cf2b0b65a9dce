"""The README's main job: the Wikipedia excerpt -> shards -> 2-rank DeepSpeed pretraining -> evaluation -> HF export
-> a downstream probe -> intrinsic probes.

    python -m pipeline.demo --output runs/demo        (what `make demo` runs)

The tiny ALBERT (albert-tiny with the demo's 8,000-piece vocabulary) trains on 2 CPU ranks with ZeRO-2,
bf16 and our LAMB (ds_configs/cpu-zero2-bf16-lamb.json), launched by torchrun. A re-run resumes from the
newest checkpoint (and finishes at once when the run is complete).

The summary puts each accuracy next to what a model that learnt nothing scores: SOP's chance level is 0.5
(pairs are swapped with probability 0.5), and MLM accuracy is compared with always predicting the piece
most often masked in the training shards, scored on the training and on the eval shards.

It ends with `albert-finetune` on 200 labelled movie-review sentences (Pang & Lee's polarity data, from the same
gensim wheel as the excerpt): the exported model and the same architecture from random initialisation, fine-tuned
and scored on the same stratified folds, side by side in the summary. Then `albert-probe` compares the two frozen
encoders on word similarity (WordSim-353, SimLex-999) and a linear topic probe (the 20-newsgroups sample), each
difference with a paired bootstrap interval, and the summary says in one line what the demo can and cannot show.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import sentencepiece as spm

from common.logs import setup_logging
from data_prep.demo_data import prepare_demo_data
from data_prep.errors import DataPrepError
from data_prep.sample_corpora import mini_newsgroup, pang_lee_polarity, simlex999, wordsim353

from .distributed import torchrun_pretrain
from .intrinsic_probe import TASKS as INTRINSIC_TASKS
from .model import AlbertConfig
from .probe_report import interval_text, short_verdict

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("demo")
SOP_CHANCE = 0.5  # the shards swap each pair with probability 0.5
# The probe's settings. With the defaults, 4 folds x 5 epochs x 19 steps of 8 sentences for each of the two models:
# about a minute on 2 CPU cores. Batches of 8 give the tiny model enough updates to fit its training folds; 48 pieces
# cut the longest fifth of the sentences by a few words (their median is 35 pieces).
PROBE_SETTINGS = ["--lr", "5e-4", "--batch-size", "8", "--max-seq-length", "48", "--seed", "42"]


def write_model_config(train: Path, folder: Path) -> tuple[int, Path]:
    """albert-tiny with the vocabulary of the shards in `train`, written to FOLDER/albert-tiny-demo.json:
    (vocabulary size, the file)."""
    vocab_size = json.loads((train / "manifest.json").read_text())["vocab"]["vocab_size"]
    cfg = AlbertConfig.from_name_or_path("albert-tiny")
    cfg.vocab_size = vocab_size
    path = folder / "albert-tiny-demo.json"
    cfg.to_json(path)
    return vocab_size, path


def pretrain_args(ds_config: Path, model_config: Path, data, output: Path, steps: int, interval: int) -> list[str]:
    """albert-pretrain's arguments for the demo model on the demo data (train and eval shards): a metrics line every
    10 steps, a checkpoint and an evaluation (20 micro-batches) every `interval` steps."""
    return [
        *("--deepspeed_config", str(ds_config), "--model-config", str(model_config)),
        *("--data", str(data.train), "--eval-data", str(data.eval), "--output", str(output), "--max-steps", str(steps)),
        *("--log-interval", "10", "--save-interval", str(interval), "--eval-interval", str(interval)),
        *("--eval-batches", "20"),
    ]


def masked_piece_counts(folder: Path, vocab_size: int) -> np.ndarray:
    """How often each piece id is a prediction target in a shard folder (padding slots, position 0, left out)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in json.loads((folder / "manifest.json").read_text())["shards"]:
        with h5py.File(folder / shard["name"], "r") as f:
            ids, positions = f["masked_lm_ids"][:], f["masked_lm_positions"][:]
        counts += np.bincount(ids[positions != 0], minlength=vocab_size)[:vocab_size]
    return counts


def most_frequent_piece_baseline(train: Path, eval_: Path, vocab_size: int) -> tuple[int, float, float]:
    """The MLM accuracy of always predicting the piece most often masked in `train`: (its id, on train, on eval)."""
    train_counts, eval_counts = masked_piece_counts(train, vocab_size), masked_piece_counts(eval_, vocab_size)
    top = int(train_counts.argmax())
    return (
        top,
        float(train_counts[top] / max(train_counts.sum(), 1)),
        float(eval_counts[top] / max(eval_counts.sum(), 1)),
    )


def probe_summary(results: dict) -> list[str]:
    """The downstream probe's rows: accuracy, F1 and ROC-AUC (mean ± std over folds) of both models."""
    settings = results["settings"]
    counts = " / ".join(f"{n} {c}" for c, n in results["class_counts"].items())
    lines = [
        f"  downstream probe: {results['data']['examples']} movie-review sentences ({counts}), "
        f"{settings['folds']}-fold stratified CV, {settings['epochs']} epochs; mean ± std over folds; "
        "chance: accuracy and ROC-AUC 0.5",
        f"    {'':<12} {'accuracy':<15} {'F1 (' + repr(results['positive_label']) + ')':<15} ROC-AUC",
    ]
    for kind in ("pretrained", "random-init"):
        scores = results["summary"][kind]
        cells = [
            "n/a" if scores[m]["mean"] is None else f"{scores[m]['mean']:.3f} ± {scores[m]['std']:.3f}"
            for m in ("accuracy", "f1", "roc_auc")
        ]
        lines.append((f"    {kind:<12} " + " ".join(f"{c:<15}" for c in cells)).rstrip())
    return lines


# The intrinsic probe's rows in the summary: (task, metric, label).
INTRINSIC_ROWS = [
    ("wordsim353", "spearman", "WordSim-353 Spearman"),
    ("simlex999", "spearman", "SimLex-999 Spearman"),
    ("newsgroups", "accuracy", "newsgroups accuracy"),
    ("newsgroups", "roc_auc", "newsgroups ROC-AUC"),
]


def intrinsic_summary(results: dict, steps: int) -> list[str]:
    """The intrinsic probes' rows (pretrained, random init, the difference and its interval, the verdict) and one
    line on what they allow to conclude."""
    settings = results["settings"]
    level = f"{100 * settings['confidence']:g}%"
    lines = [
        f"  intrinsic probes: frozen encoders; difference pretrained - random init with its {level} paired bootstrap "
        f"interval ({settings['resamples']} resamples)",
        f"    {'':<22}{'pretrained':>10}{'random-init':>13}{'difference':>12}  {level + ' interval':<19}verdict",
    ]
    higher: list[str] = []
    lower: list[str] = []
    for task, metric, label in INTRINSIC_ROWS:
        result = results["tasks"][task]
        interval = result["difference"][metric]
        lines.append(
            f"    {label:<22}{result['pretrained'][metric]:>10.3f}{result['random-init'][metric]:>13.3f}"
            f"{interval['difference']:>+12.3f}  {interval_text(interval):<19}{short_verdict(interval)}"
        )
        if interval["excludes_zero"]:
            (higher if interval["difference"] > 0 else lower).append(label)
    return lines + [conclusion(higher, lower, steps)]


def conclusion(higher: list[str], lower: list[str], steps: int) -> str:
    """What the demo's figures allow to say, in one line."""
    if higher:
        shown = f"the pretrained encoder beats random weights on {', '.join(higher)} (interval excludes zero)"
        shown += f" but is worse on {', '.join(lower)}" if lower else ""
        return (
            f"  at demo scale: {shown}: it has learnt something random weights lack; how much more a longer run "
            "learns, and whether it carries over to fine-tuning, the demo cannot say"
        )
    if lower:
        return (
            f"  at demo scale: the pretrained encoder is worse than random weights on {', '.join(lower)} (interval "
            f"excludes zero) and better on none: {steps} steps on 2 MB of text have not yet made useful representations"
        )
    return (
        f"  at demo scale: no interval excludes zero: after {steps} steps on 2 MB of text the encoder cannot be told "
        "from random weights by these probes (MLM accuracy above its baseline is the learning shown); that is no "
        "evidence about longer runs"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="End-to-end demo on CPU: data preparation, 2-rank DeepSpeed pretraining, evaluation, Hugging Face "
        "export, downstream probe, intrinsic probes.",
        epilog="example:\n  python -m pipeline.demo --output runs/demo --steps 300",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (global batch 32)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--deepspeed-config", type=Path, default=REPO / "ds_configs" / "cpu-zero2-bf16-lamb.json")
    parser.add_argument("--probe-folds", type=int, default=4, help="cross-validation folds of the downstream probe")
    parser.add_argument("--probe-epochs", type=int, default=5, help="fine-tuning epochs of the downstream probe")
    args = parser.parse_args(argv)
    setup_logging(False)
    try:
        data = prepare_demo_data(args.output / "data")
        labelled = pang_lee_polarity()
        for fetch in (wordsim353, simlex999, mini_newsgroup):  # albert-probe's data, fetched before any training
            fetch()
    except DataPrepError as e:
        log.error("%s", e)
        return 2

    vocab_size, model_config = write_model_config(data.train, args.output)
    train_dir = args.output / "train"
    cmd = torchrun_pretrain(
        args.ranks, pretrain_args(args.deepspeed_config, model_config, data, train_dir, args.steps, 100)
    )
    log.info("pretraining: %s", " ".join(cmd[2:]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if subprocess.run(cmd, cwd=REPO, env=env).returncode:
        log.error("pretraining failed")
        return 1

    hf_dir = args.output / "hf"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.export",
        "--checkpoint",
        str(train_dir / "checkpoints"),
        "--output",
        str(hf_dir),
        "--spm-model",
        str(data.spm_model),
        "--overwrite",  # a rerun replaces the demo's own earlier export (albert-export refuses any other folder)
    ]
    if subprocess.run(cmd, cwd=REPO, env=env).returncode:
        log.error("export failed")
        return 1

    probe_dir = args.output / "probe"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.finetune",
        "--model",
        str(hf_dir),
        "--data",
        str(labelled),
        "--folds",
        str(args.probe_folds),
        "--epochs",
        str(args.probe_epochs),
        *PROBE_SETTINGS,
        "--output",
        str(probe_dir),
    ]
    log.info("downstream probe: %s", " ".join(cmd[2:]))
    # All the cores for the one fine-tuning process (the pretraining ranks ran with one thread each).
    if subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
        log.error("the downstream probe failed")
        return 1

    intrinsic_dir = args.output / "intrinsic"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.intrinsic_probe",
        *("--model", str(hf_dir), "--tasks", *INTRINSIC_TASKS, "--output", str(intrinsic_dir)),
    ]
    log.info("intrinsic probes: %s", " ".join(cmd[2:]))
    if subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
        log.error("the intrinsic probes failed")
        return 1

    lines = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [m for m in lines if m.get("split", "train") == "train"]
    evals = [m for m in lines if m.get("split") == "eval"]
    first, last = train[0], train[-1]
    top, top_train, top_eval = most_frequent_piece_baseline(data.train, data.eval, vocab_size)
    piece = spm.SentencePieceProcessor(model_file=str(data.spm_model)).id_to_piece(top)
    summary = [
        "",
        f"demo summary: {last['step']} steps of batch 32 on {args.ranks} CPU ranks (ZeRO-2, bf16, our LAMB)",
        f"  MLM accuracy  {first['mlm_accuracy']:.3f} (step {first['step']}) -> {last['mlm_accuracy']:.3f} (step {last['step']})"
        f"   baseline {top_train:.3f}: always predicting {piece!r}, the most frequent masked piece",
        f"  SOP accuracy  {first['sop_accuracy']:.3f} -> {last['sop_accuracy']:.3f}   chance level {SOP_CHANCE:.3f}",
        f"  loss          {first['loss']:.3f} -> {last['loss']:.3f}",
    ]
    if evals:
        last_eval = evals[-1]
        summary.append(
            f"  eval (step {last_eval['step']}): loss {last_eval['loss']:.3f}, "
            f"MLM accuracy {last_eval['mlm_accuracy']:.3f} (baseline {top_eval:.3f}), "
            f"SOP accuracy {last_eval['sop_accuracy']:.3f} (chance {SOP_CHANCE:.3f})"
        )
    summary += probe_summary(json.loads((probe_dir / "results.json").read_text()))
    summary += intrinsic_summary(json.loads((intrinsic_dir / "results.json").read_text()), last["step"])
    summary += [
        f"  metrics       {train_dir / 'metrics.jsonl'}",
        f"  TensorBoard   tensorboard --logdir {train_dir / 'tensorboard'}",
        f"  checkpoints   {train_dir / 'checkpoints'}",
        f"  HF export     {hf_dir}  (transformers.AlbertForPreTraining.from_pretrained)",
        f"  probe         {probe_dir / 'results.json'}  (per-fold rows)",
        f"  intrinsic     {intrinsic_dir / 'results.json'}  (coverage, settings, every metric)",
    ]
    sys.stdout.write("\n".join(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
