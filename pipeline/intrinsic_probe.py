"""albert-probe: does the pretrained encoder know anything random weights do not? Intrinsic probes of an export.

Frozen encoders only, nothing fine-tuned: the folder's pretrained ALBERT and the same architecture from random
initialisation (seeded), on the same items, each figure with a paired bootstrap confidence interval of the
difference (pretrained - random init), which the report puts in words: does it exclude zero?

  wordsim353, simlex999  word similarity: the Spearman correlation between human ratings and the cosine similarity
                         of the two words' representations (the mean of the last hidden states over the word's
                         pieces, the word encoded alone as [CLS] word [SEP]), over the pairs whose words have no
                         <unk> piece; the coverage is reported. WordSim-353 rates relatedness (cup-coffee is
                         high), SimLex-999 similarity proper (cup-coffee is low).
  newsgroups             topic classification of 200 Usenet posts (alt.atheism, sci.space; headers, signatures
                         and quoted lines removed): a linear probe, scikit-learn's LogisticRegression on the
                         standardised mean-pooled last hidden states, stratified cross-validation; accuracy, macro
                         precision, recall and F1, ROC-AUC of the out-of-fold predictions.

The data ships in gensim's wheel and is fetched, checked (SHA-256) and cached by data_prep/sample_corpora.py.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.logs import setup_logging
from data_prep import sample_corpora
from data_prep.errors import DataPrepError

from .bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    BootstrapSettings,
    bootstrap_classification_scores,
    bootstrap_spearman,
    paired_interval,
    resample_indices,
    spearman_rows,
)
from .classification_metrics import METRICS, classification_scores
from .export_output import read_record
from .finetune import FlagValueError, _quiet_transformers, resolve_device
from .finetune_loop import DEFAULT_MAX_SEQ_LENGTH, ModelFolderError
from .finetune_report import machine, write_results
from .probe_data import Newsgroups, ProbeDataError, WordPairs, read_newsgroups, read_word_pairs
from .probe_encoder import KINDS, Encoders, cosine_rows, encode_texts, load_encoders, mean_pooled, word_pieces
from .probe_report import RESULTS, OutputError, check_output, format_table

log = logging.getLogger("albert-probe")

WORD_TASKS = {
    "wordsim353": ("WordSim-353", sample_corpora.wordsim353),
    "simlex999": ("SimLex-999", sample_corpora.simlex999),
}
NEWSGROUPS = "newsgroups"
TASKS = (*WORD_TASKS, NEWSGROUPS)
REPRESENTATION = (
    "mean of the last hidden states over the text's pieces ([CLS] and [SEP] left out); a word is encoded alone "
    "as [CLS] word [SEP], lower-cased where the tokenizer lower-cases"
)
CLASSIFIER = "StandardScaler + LogisticRegression (lbfgs, C 1.0) on the frozen mean-pooled states"
COVERED = "a word is covered when the tokenizer gives it at least one piece and no <unk>"
EXAMPLE = (
    "example:\n"
    "  albert-probe --model runs/demo/hf --tasks wordsim353 simlex999 newsgroups --output runs/demo/intrinsic\n"
    "what each probe measures, and the demo's figures: docs/finetune.md"
)
USER_ERRORS = (FlagValueError, OutputError, ModelFolderError, ProbeDataError, DataPrepError)


@dataclass(frozen=True)
class ProbeSettings:
    model: Path
    output: Path
    tasks: tuple[str, ...] = TASKS
    seed: int = 42  # random init, folds and resamples
    resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    folds: int = 5
    max_seq_length: int | None = None  # None: DEFAULT_MAX_SEQ_LENGTH, or the model's positions if fewer
    batch_size: int = 32
    device: str = "auto"
    cache_dir: Path | None = None  # the sample corpora's cache; None: $ALBERT_DATA_CACHE or .cache/corpora

    def check(self) -> None:
        if unknown := [t for t in self.tasks if t not in TASKS]:
            raise FlagValueError(f"--tasks {' '.join(unknown)}: unknown task (the tasks: {', '.join(TASKS)})")
        if len(set(self.tasks)) < len(self.tasks):
            raise FlagValueError(f"--tasks {' '.join(self.tasks)}: a task is named twice")
        for name, value, low in (
            ("--resamples", self.resamples, 100),
            ("--folds", self.folds, 2),
            ("--max-seq-length", 3 if self.max_seq_length is None else self.max_seq_length, 3),
            ("--batch-size", self.batch_size, 1),
            ("--seed", self.seed, 0),
        ):
            if value < low:
                raise FlagValueError(f"{name} {value}: must be at least {low}")
        if not 0 < self.confidence < 1:
            raise FlagValueError(f"--confidence {self.confidence}: must be between 0 and 1")

    @property
    def bootstrap(self) -> BootstrapSettings:
        return BootstrapSettings(self.resamples, self.confidence, self.seed)


def sequence_length(cfg: ProbeSettings, encoders: Encoders) -> int:
    """--max-seq-length, else DEFAULT_MAX_SEQ_LENGTH or the model's positions if fewer."""
    if cfg.max_seq_length is not None:
        return cfg.max_seq_length
    return min(DEFAULT_MAX_SEQ_LENGTH, encoders.folder.config.max_position_embeddings)


# ---------------------------------------------------------------------------------------------------------------
# Word similarity


def word_coverage(encoders: Encoders, pairs: WordPairs) -> tuple[list[bool], dict]:
    """Which pairs have both words covered, and the coverage figures."""
    tokenizer = encoders.tokenizer
    unk = tokenizer.unk_token_id
    pieces = {w: word_pieces(tokenizer, w) for w in pairs.words()}
    covered = {w: bool(p) and unk not in p for w, p in pieces.items()}
    pair_covered = [covered[a] and covered[b] for a, b in zip(pairs.first, pairs.second)]
    coverage = {
        "definition": COVERED,
        "pairs": len(pairs),
        "pairs_covered": sum(pair_covered),
        "fraction": sum(pair_covered) / len(pairs),
        "words": len(pieces),
        "words_covered": sum(covered.values()),
        "words_one_piece": sum(len(p) == 1 and covered[w] for w, p in pieces.items()),
        "uncovered_words": sorted(w for w, ok in covered.items() if not ok),
    }
    return pair_covered, coverage


def word_similarity(encoders: Encoders, task: str, pairs: WordPairs, cfg: ProbeSettings) -> dict:
    pair_covered, coverage = word_coverage(encoders, pairs)
    keep = np.flatnonzero(pair_covered)
    if len(keep) < 3:
        raise ProbeDataError(f"{pairs.path}: {len(keep)} pairs have both words covered by the vocabulary; need 3")
    first = [pairs.first[i] for i in keep]
    second = [pairs.second[i] for i in keep]
    ratings = pairs.ratings[keep]
    words = list(dict.fromkeys(first + second))
    index = {w: i for i, w in enumerate(words)}
    pieces = encode_texts(encoders.tokenizer, words, sequence_length(cfg, encoders))
    indices = resample_indices(len(keep), cfg.bootstrap)
    point, boot, cosines = {}, {}, {}
    for kind, model in encoders.models.items():
        vectors = mean_pooled(model, pieces, encoders.tokenizer.pad_token_id, encoders.device, cfg.batch_size)
        cosines[kind] = cosine_rows(vectors[[index[w] for w in first]], vectors[[index[w] for w in second]])
        point[kind] = {"spearman": float(spearman_rows(ratings, cosines[kind]))}
        boot[kind] = {"spearman": bootstrap_spearman(ratings, cosines[kind], indices)}
    return {
        "task": task,
        "name": WORD_TASKS[task][0],
        "probe": "word similarity: Spearman correlation of human ratings with cosine similarities",
        "data": {"path": str(pairs.path), "pairs": len(pairs), "words": len(pairs.words())},
        "coverage": coverage,
        "truncated_words": pieces.truncated,
        "settings": {"representation": REPRESENTATION, **bootstrap_settings(cfg)},
        "metrics": ["spearman"],
        **rows_and_differences(point, boot, ["spearman"], cfg),
    }


# ---------------------------------------------------------------------------------------------------------------
# Topic classification


def linear_probe(features: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(y), int(y.max()) + 1))
    for train, test in folds:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        classifier.fit(features[train], y[train])
        probs[np.ix_(test, classifier.classes_)] = classifier.predict_proba(features[test])
    return probs


def topic_classification(encoders: Encoders, news: Newsgroups, cfg: ProbeSettings) -> dict:
    from sklearn.model_selection import StratifiedKFold

    smallest = min(news.class_counts().values())
    if smallest < cfg.folds:
        raise ProbeDataError(f"{news.path}: a newsgroup has {smallest} posts, fewer than --folds {cfg.folds}")
    pieces = encode_texts(encoders.tokenizer, news.texts, sequence_length(cfg, encoders))
    splitter = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    folds = list(splitter.split(np.zeros(len(news.labels)), news.labels))  # the same folds for both encoders
    indices = resample_indices(len(news.labels), cfg.bootstrap)
    point, boot = {}, {}
    for kind, model in encoders.models.items():
        features = mean_pooled(model, pieces, encoders.tokenizer.pad_token_id, encoders.device, cfg.batch_size)
        probs = linear_probe(features, news.labels, folds)
        point[kind] = classification_scores(news.labels, probs)
        boot[kind] = bootstrap_classification_scores(news.labels, probs, indices)
    unk = encoders.tokenizer.unk_token_id
    total = sum(len(ids) - 2 for ids in pieces.input_ids)
    unknown = sum(ids.count(unk) for ids in pieces.input_ids)
    return {
        "task": NEWSGROUPS,
        "name": "20 newsgroups sample",
        "probe": f"topic classification: linear probe, {cfg.folds}-fold stratified cross-validation",
        "data": {
            "path": str(news.path),
            "documents": len(news.texts),
            "dropped_empty": news.empty,
            "removed": "headers, signatures, quoted lines",
            "class_counts": news.class_counts(),
            "truncated": pieces.truncated,
            "pieces": total,
            "unknown_pieces": unknown,
        },
        "coverage": {
            "definition": "the share of the posts' pieces that are not <unk>",
            "fraction": 1 - unknown / total,
        },
        "settings": {
            "representation": REPRESENTATION,
            "classifier": CLASSIFIER,
            "folds": cfg.folds,
            "max_seq_length": sequence_length(cfg, encoders),
            **bootstrap_settings(cfg),
        },
        "averaging": "macro (every class weighs the same); ROC-AUC macro one-vs-rest",
        "metrics": list(METRICS),
        **rows_and_differences(point, boot, list(METRICS), cfg),
    }


def bootstrap_settings(cfg: ProbeSettings) -> dict:
    return {"seed": cfg.seed, "resamples": cfg.resamples, "confidence": cfg.confidence}


def rows_and_differences(point: dict, boot: dict, metrics: list[str], cfg: ProbeSettings) -> dict:
    """Both rows, and per metric the paired interval of pretrained - random-init and its verdict in words."""
    pretrained, random_init = KINDS
    intervals = {
        m: paired_interval(
            point[pretrained][m], point[random_init][m], boot[pretrained][m], boot[random_init][m], cfg.confidence
        )
        for m in metrics
    }
    return {
        pretrained: point[pretrained],
        random_init: point[random_init],
        "difference": {m: interval.to_dict() for m, interval in intervals.items()},
        "verdict": {m: interval.verdict() for m, interval in intervals.items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# The run


def load_data(cfg: ProbeSettings) -> dict[str, WordPairs | Newsgroups]:
    """Every task's data, fetched and read before the model is loaded: bad data is reported first."""
    data: dict[str, WordPairs | Newsgroups] = {}
    for task in cfg.tasks:
        if task == NEWSGROUPS:
            data[task] = read_newsgroups(sample_corpora.mini_newsgroup(cfg.cache_dir))
        else:
            data[task] = read_word_pairs(WORD_TASKS[task][1](cfg.cache_dir))
    return data


def checkpoint_of(model: Path) -> dict | None:
    """Where the export came from (export.json's checkpoint: folder, tag, step), when albert-export wrote it."""
    record = read_record(model)
    if record is None or not isinstance(record.get("checkpoint"), dict):
        return None
    source = record["checkpoint"]
    return {key: source.get(key) for key in ("folder", "tag", "step")}


def run_probes(cfg: ProbeSettings, command: list[str] | None = None) -> dict:
    """Every task of `cfg` on both encoders; writes OUTPUT/results.json and returns it."""
    cfg.check()
    check_output(cfg.output)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    encoders = load_encoders(cfg.model, cfg.seed, device, cfg.max_seq_length)
    cfg = replace(cfg, max_seq_length=sequence_length(cfg, encoders))
    results: dict[str, Any] = {
        "tool": "albert-probe",
        "complete": False,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command) if command else None,
        "machine": machine(device),
        "model": str(cfg.model),
        "checkpoint": checkpoint_of(cfg.model),
        "settings": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("model", "output", "cache_dir", "tasks")},
            "tasks": list(cfg.tasks),
            "random_init": f"transformers' AlbertModel initialisation of the same config under seed {cfg.seed}",
            "representation": REPRESENTATION,
            "bootstrap": f"paired percentile bootstrap over the items (pairs, documents), {cfg.resamples} "
            f"resamples, seed {cfg.seed}",
        },
        "tasks": {},
    }
    cfg.output.mkdir(parents=True, exist_ok=True)
    for task, items in data.items():
        log.info("%s: probing both encoders", task)
        if isinstance(items, Newsgroups):
            results["tasks"][task] = topic_classification(encoders, items, cfg)
        else:
            results["tasks"][task] = word_similarity(encoders, task, items, cfg)
        write_results(cfg.output, results)
    results["complete"] = True
    write_results(cfg.output, results)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albert-probe",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="ALBERT folder (albert-export's output)")
    parser.add_argument(
        "--tasks", nargs="+", default=list(TASKS), metavar="TASK", help=f"default: all ({' '.join(TASKS)})"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for results.json (new, empty, or an earlier one's)"
    )
    parser.add_argument("--seed", type=int, default=42, help="random init, folds, resamples (default: 42)")
    parser.add_argument(
        "--resamples", type=int, default=DEFAULT_RESAMPLES, help=f"bootstrap resamples (default: {DEFAULT_RESAMPLES})"
    )
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE, help="of the intervals (default: 0.95)")
    parser.add_argument("--folds", type=int, default=5, help="newsgroups: cross-validation folds (default: 5)")
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help=f"pieces per text, [CLS] and [SEP] included; longer posts are truncated (default: "
        f"{DEFAULT_MAX_SEQ_LENGTH}, the length ALBERT pretrains at, or the model's positions if fewer)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    cfg = ProbeSettings(
        model=args.model,
        output=args.output,
        tasks=tuple(args.tasks),
        seed=args.seed,
        resamples=args.resamples,
        confidence=args.confidence,
        folds=args.folds,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size,
        device=args.device,
    )
    try:
        with _quiet_transformers():
            results = run_probes(cfg, ["albert-probe", *argv])
    except USER_ERRORS as e:
        log.error("%s", e)
        return 2
    for line in format_table(results).splitlines():
        log.info("%s", line)
    log.info("wrote %s", cfg.output / RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
