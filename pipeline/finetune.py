"""albert-finetune: does the pretraining help? A downstream probe of an exported ALBERT.

Fine-tunes transformers' AlbertForSequenceClassification, loaded from an ALBERT folder (what `albert-export`
writes, or any ALBERT folder Hugging Face loads) with the folder's SentencePiece tokenizer, on a labelled text
set, and reports accuracy, precision, recall, F1 and ROC-AUC as mean ± standard deviation over folds x seeds.
The same architecture from random initialisation (`--baseline random-init`, the default) is trained and scored
on the very same folds, seeds, batches and settings, and the report shows both and their paired difference.

Evaluation: stratified k-fold cross-validation (`--folds`) of --data, or --data for training and `--dev FILE`
for scoring; repeated for --seeds seeds (--seed, --seed+1, ...). Each seed reshuffles the folds, the batch
order, the classifier head's initialisation and the dropout; within one fold and seed both models start from
the same head and see the same batches, so the only difference is the encoder's weights.

Training: AdamW (weight decay 0.01, none on biases and LayerNorm), linear warmup over the first 10% of the
steps and linear decay to 0, gradient clipping at 1.0, dynamic padding; on CUDA when there is a GPU.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.logs import setup_logging

from .classification_metrics import METRIC_NAMES, METRICS, classification_scores
from .finetune_loop import (
    DEFAULT_MAX_SEQ_LENGTH,
    PRETRAINED,
    RANDOM_INIT,
    AlbertFolder,
    FinetuneSettings,
    ModelFolderError,
    Progress,
    encode,
    load_albert_folder,
    new_model,
    predict,
    steps_per_run,
    train,
)
from .finetune_report import format_table, machine, summary, write_results
from .labelled import Columns, LabelledDataError, LabelledSet, class_order, read_labelled

log = logging.getLogger("albert-finetune")

BASELINES = (RANDOM_INIT, "none")
EXAMPLE = (
    "example:\n"
    "  albert-finetune --model runs/demo/hf --data reviews.tsv --text-column sentence --label-column label \\\n"
    "      --folds 5 --seeds 3 --epochs 3 --lr 3e-5 --output runs/probe\n"
    "  albert-finetune --model hf/ --data train.jsonl --dev dev.jsonl --text-column premise \\\n"
    "      --text-pair-column hypothesis --label-column label --output runs/probe-nli\n"
    "formats, metrics and what to expect: docs/finetune.md"
)


class FlagValueError(ValueError):
    """A flag value the probe cannot run with; the message names the flag."""


USER_ERRORS = (LabelledDataError, ModelFolderError, FlagValueError)


@dataclass(frozen=True)
class ProbeConfig:
    model: Path
    data: Path
    output: Path
    columns: Columns = field(default_factory=Columns)
    dev: Path | None = None
    folds: int = 5
    seeds: int = 1
    seed: int = 42
    baseline: str = RANDOM_INIT
    positive_label: str | None = None
    device: str = "auto"
    train: FinetuneSettings = field(default_factory=FinetuneSettings)

    def check(self) -> None:
        for name, value, low in (
            ("--folds", self.folds, 2),
            ("--seeds", self.seeds, 1),
            ("--epochs", self.train.epochs, 1),
            ("--batch-size", self.train.batch_size, 1),
            ("--max-seq-length", self.train.max_seq_length, 4),
        ):
            if value is not None and value < low:
                raise FlagValueError(f"{name} {value}: must be at least {low}")
        if self.seed < 0:
            raise FlagValueError(f"--seed {self.seed}: must be 0 or more")
        if not self.train.lr > 0:
            raise FlagValueError(f"--lr {self.train.lr}: must be positive")
        if self.baseline not in BASELINES:
            raise FlagValueError(f"--baseline {self.baseline}: one of {', '.join(BASELINES)}")


@dataclass
class Task:
    """The labelled data with labels as class ids, and what the metrics need to know about the classes."""

    data: LabelledSet
    dev: LabelledSet | None
    classes: list[str]
    positive: int | None  # the positive class id of a binary task, None for more classes
    y: np.ndarray
    y_dev: np.ndarray | None


@dataclass(frozen=True)
class Split:
    seed: int
    fold: int | None  # None: --dev
    train: np.ndarray  # indices into --data
    test: np.ndarray  # indices into --data (cross-validation) or into --dev

    @property
    def name(self) -> str:
        return f"seed {self.seed}" + ("" if self.fold is None else f" fold {self.fold + 1}")


def prepare_task(cfg: ProbeConfig) -> Task:
    """Read --data and --dev and check they make a classification task the chosen evaluation can score."""
    data = read_labelled(cfg.data, cfg.columns)
    dev = read_labelled(cfg.dev, cfg.columns) if cfg.dev is not None else None
    counts = data.class_counts()
    if len(counts) < 2:
        raise LabelledDataError(
            f"{data.path}: every example has the label {next(iter(counts))!r}; a classifier needs two classes or more"
        )
    if dev is not None:
        for label, line in zip(dev.labels, dev.lines):
            if label not in counts:
                raise LabelledDataError(
                    f"{dev.path}: line {line}: label {label!r} does not occur in the training data {data.path}"
                )
    else:
        label = min(class_order(counts), key=counts.__getitem__)
        if (smallest := counts[label]) < cfg.folds:
            raise LabelledDataError(
                f"{data.path}: class {label!r} has {smallest} example{'s' if smallest > 1 else ''}, fewer than "
                f"--folds {cfg.folds}: lower --folds or give a --dev file"
            )
    classes = class_order(counts)
    if dev is not None and (absent := [c for c in classes if c not in dev.class_counts()]):
        log.warning("%s: no examples of %s; ROC-AUC is undefined (n/a) on it", dev.path, ", ".join(map(repr, absent)))
    positive = None
    if len(classes) == 2:
        chosen = classes[-1] if cfg.positive_label is None else cfg.positive_label
        if chosen not in classes:
            raise LabelledDataError(f"{data.path}: --positive-label {chosen!r} is not one of the labels {classes}")
        positive = classes.index(chosen)
    elif cfg.positive_label is not None:
        raise LabelledDataError(f"{data.path}: {len(classes)} classes; --positive-label is for binary tasks")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in data.labels], dtype=np.int64)
    y_dev = None if dev is None else np.array([index[label] for label in dev.labels], dtype=np.int64)
    return Task(data, dev, classes, positive, y, y_dev)


def make_splits(task: Task, cfg: ProbeConfig) -> list[Split]:
    """Stratified folds (or --data/--dev) for each seed; the same list serves every model."""
    from sklearn.model_selection import StratifiedKFold

    splits = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        if task.y_dev is not None:  # --dev
            splits.append(Split(seed, None, np.arange(len(task.y)), np.arange(len(task.y_dev))))
            continue
        folds = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=seed)
        for k, (train_idx, test_idx) in enumerate(folds.split(np.zeros(len(task.y)), task.y)):
            splits.append(Split(seed, k, train_idx, test_idx))
    return splits


def run_seed(split: Split) -> int:
    """The seed of one fold of one seed: model initialisation, batch order, dropout."""
    return int(np.random.SeedSequence([split.seed, 0 if split.fold is None else split.fold + 1]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------------------
# The probe


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FlagValueError(f"--device {name}: no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise FlagValueError(f"--device {name}: {str(e).splitlines()[0]}") from None


def check_vocabulary_size(folder: AlbertFolder) -> None:
    """A tokenizer with another number of pieces than the model's embedding table belongs to another model: its ids
    would pick embeddings trained for other pieces."""
    tokenizer: Any = folder.tokenizer
    config: Any = folder.config
    if len(tokenizer) != config.vocab_size:
        raise ModelFolderError(
            f"{folder.path}: the tokenizer (spiece.model) has {len(tokenizer)} pieces but config.json's vocab_size "
            f"is {config.vocab_size}; export the model with the vocabulary it was trained on (albert-export "
            "--spm-model)"
        )


def run_probe(cfg: ProbeConfig, command: list[str] | None = None, task: Task | None = None) -> dict:
    """Fine-tune and score every model on every split; write results.json (after each run) and return it."""
    cfg.check()
    device = resolve_device(cfg.device)
    task = prepare_task(cfg) if task is None else task
    folder = load_albert_folder(cfg.model, task.classes, cfg.train.max_seq_length)
    check_vocabulary_size(folder)
    max_seq_length = cfg.train.max_seq_length
    if max_seq_length is None:
        max_seq_length = min(DEFAULT_MAX_SEQ_LENGTH, folder.config.max_position_embeddings)
        cfg = replace(cfg, train=replace(cfg.train, max_seq_length=max_seq_length))
    splits = make_splits(task, cfg)
    kinds = [PRETRAINED] + ([RANDOM_INIT] if cfg.baseline == RANDOM_INIT else [])
    enc = encode(folder.tokenizer, task.data, max_seq_length)
    enc_dev = encode(folder.tokenizer, task.dev, max_seq_length) if task.dev is not None else None
    for encoded, labelled in ((enc, task.data), (enc_dev, task.dev)):
        if encoded is not None and labelled is not None and encoded.truncated:
            log.info(
                "%s: %d of %d examples (%.0f%%) are longer than --max-seq-length %d pieces: truncated",
                labelled.path,
                encoded.truncated,
                len(labelled),
                100 * encoded.truncated / len(labelled),
                max_seq_length,
            )
    pad_id = folder.tokenizer.pad_token_id
    counts = task.data.class_counts()
    log.info(
        "%s: %d examples (%s), %s; model %s on %s",
        task.data.path,
        len(task.data),
        ", ".join(f"{c} {counts[c]}" for c in task.classes),
        describe_evaluation(cfg, task),
        cfg.model,
        device,
    )
    results: dict[str, Any] = {
        "complete": False,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command) if command else None,
        "machine": machine(device),
        "model": str(cfg.model),
        "data": {"path": str(task.data.path), "format": task.data.format, "examples": len(task.data)},
        "dev": None if task.dev is None else {"path": str(task.dev.path), "examples": len(task.dev)},
        "settings": settings_dict(cfg),
        "evaluation": describe_evaluation(cfg, task),
        "classes": task.classes,
        "class_counts": {c: counts[c] for c in task.classes},
        "positive_label": None if task.positive is None else task.classes[task.positive],
        "averaging": "binary (positive class)" if task.positive is not None else "macro; ROC-AUC macro one-vs-rest",
        "truncated": {"data": enc.truncated, "dev": None if enc_dev is None else enc_dev.truncated},
        "splits": [
            {"seed": s.seed, "fold": s.fold, "train_examples": len(s.train), "test_indices": s.test.tolist()}
            for s in splits
        ],
        "runs": [],
        "summary": {},
    }
    cfg.output.mkdir(parents=True, exist_ok=True)
    total = len(kinds) * sum(steps_per_run(len(s.train), cfg.train) for s in splits)
    progress = Progress(total)
    test_enc, test_y = (enc, task.y) if enc_dev is None or task.y_dev is None else (enc_dev, task.y_dev)
    try:
        with progress.logging():
            for i, split in enumerate(splits):
                seed = run_seed(split)
                for kind in kinds:
                    progress.run(f"{kind} {split.name}")
                    started = time.monotonic()
                    model = new_model(folder, kind, seed)
                    loss = train(model, enc, task.y, split.train, cfg.train, seed, pad_id, device, progress)
                    probs = predict(model, test_enc, split.test, 2 * cfg.train.batch_size, pad_id, device)
                    scores = classification_scores(test_y[split.test], probs, task.positive)
                    row = {
                        "model": kind,
                        "seed": split.seed,
                        "fold": split.fold,
                        "train_examples": len(split.train),
                        "test_examples": len(split.test),
                        **scores,
                        "train_loss": loss,
                        "seconds": round(time.monotonic() - started, 2),
                    }
                    results["runs"].append(row)
                    log.info(
                        "%-11s %s (%d/%d): %s; train loss %.4f, %.1f s",
                        kind,
                        split.name,
                        i + 1,
                        len(splits),
                        ", ".join(f"{METRIC_NAMES[m]} {scores[m]:.3f}" for m in METRICS),
                        loss,
                        row["seconds"],
                    )
                    del model
                results["summary"] = summary(results["runs"], kinds)
                write_results(cfg.output, results)
    finally:
        progress.close()
    results["complete"] = True
    write_results(cfg.output, results)
    return results


def describe_evaluation(cfg: ProbeConfig, task: Task) -> str:
    seeds = f"{cfg.seeds} seed" + ("s" if cfg.seeds > 1 else "")
    if task.dev is not None:
        return f"trained on all of --data, scored on --dev ({len(task.dev)} examples) x {seeds}"
    return f"{cfg.folds}-fold stratified cross-validation x {seeds}"


def settings_dict(cfg: ProbeConfig) -> dict:
    return {
        "folds": cfg.folds if cfg.dev is None else None,
        "seeds": cfg.seeds,
        "seed": cfg.seed,
        "baseline": cfg.baseline,
        "text_column": cfg.columns.text,
        "text_pair_column": cfg.columns.pair,
        "label_column": cfg.columns.label,
        **asdict(cfg.train),
    }


# ---------------------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albert-finetune",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, type=Path, help="ALBERT folder (albert-export's output) with spiece.model"
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="labelled file: TSV/CSV with a header, JSON lines, or fastText '__label__X text' lines (told apart by "
        "the extension, else the first line); labels may be any strings",
    )
    parser.add_argument(
        "--text-column", default="text", help="column (TSV/CSV) or field (JSON lines) of the text (default: text)"
    )
    parser.add_argument(
        "--text-pair-column", default=None, help="column or field of the second text, for sentence-pair tasks"
    )
    parser.add_argument("--label-column", default="label", help="column or field of the label (default: label)")
    parser.add_argument(
        "--dev", type=Path, default=None, help="score on this file (same format) instead of cross-validation"
    )
    parser.add_argument(
        "--folds", type=int, default=5, help="stratified cross-validation folds when there is no --dev (default: 5)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat everything with this many seeds: --seed, --seed+1, ... (default: 1)",
    )
    parser.add_argument(
        "--epochs", type=int, default=FinetuneSettings.epochs, help=f"default: {FinetuneSettings.epochs}"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=FinetuneSettings.lr,
        help=f"AdamW's peak learning rate (default: {FinetuneSettings.lr:g})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=FinetuneSettings.batch_size, help=f"default: {FinetuneSettings.batch_size}"
    )
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help=f"pieces per example, [CLS] and [SEP]s included; longer ones are truncated "
        f"(default: {DEFAULT_MAX_SEQ_LENGTH}, or the model's positions if fewer)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="first seed: folds, initialisation, batch order, dropout (default: 42)"
    )
    parser.add_argument(
        "--baseline",
        default=RANDOM_INIT,
        choices=BASELINES,
        help="random-init: also train the same architecture from random weights on the same folds (default)",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder for results.json")
    parser.add_argument(
        "--positive-label", default=None, help="binary tasks: the positive class (default: the last label in order)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(args: argparse.Namespace) -> ProbeConfig:
    return ProbeConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        columns=Columns(text=args.text_column, label=args.label_column, pair=args.text_pair_column),
        dev=args.dev,
        folds=args.folds,
        seeds=args.seeds,
        seed=args.seed,
        baseline=args.baseline,
        positive_label=args.positive_label,
        device=args.device,
        train=FinetuneSettings(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_seq_length=args.max_seq_length
        ),
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' advisory warnings (e.g. about sequence lengths) are not for this command's users."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    cfg = config_from_args(args)
    try:
        cfg.check()
        task = prepare_task(cfg)  # bad data is reported before transformers is imported
        with _quiet_transformers():
            results = run_probe(cfg, ["albert-finetune", *argv], task)
    except USER_ERRORS as e:
        log.error("%s", e)
        return 2
    sys.stdout.write("\n" + format_table(results) + "\n")
    log.info("wrote %s", cfg.output / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
