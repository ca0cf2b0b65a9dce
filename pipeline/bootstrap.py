"""Paired bootstrap confidence intervals of a difference between two models scored on the same items.

Each resample draws n items (word pairs, documents) with replacement, the same draw for both models; the statistic
is computed for each model on it, and the interval is the (1 - confidence) / 2 and (1 + confidence) / 2
percentiles of the differences (the percentile bootstrap). Resamples on which the statistic is undefined (a rank
correlation of constant values, a ROC-AUC without every class) are left out and counted. Two models with the same
scores give a difference of exactly 0 on every resample, so the interval [0, 0].

The statistics are computed for all resamples at once (numpy over a resamples x n matrix): a Spearman correlation,
and the metrics of `classification_metrics.classification_scores` (the tests check they agree resample by resample).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class BootstrapSettings:
    resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 42


@dataclass(frozen=True)
class PairedInterval:
    """A difference (a - b on all items) and its paired bootstrap percentile interval."""

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    used: int  # resamples on which the statistic was defined for both models

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def verdict(self, a: str = "pretrained", b: str = "random init") -> str:
        """The interval in words."""
        level = f"{100 * self.confidence:g}%"
        if self.used == 0 or not math.isfinite(self.difference):
            return "undefined (the statistic is undefined on these items)"
        if self.low > 0:
            return f"the {level} interval excludes zero: {a} is higher than {b}"
        if self.high < 0:
            return f"the {level} interval excludes zero: {a} is lower than {b}"
        return f"the {level} interval includes zero: no difference between {a} and {b} is shown"

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def resample_indices(n: int, settings: BootstrapSettings) -> np.ndarray:
    """resamples x n item indices, drawn with replacement from a generator seeded by `settings.seed`."""
    return np.random.default_rng(settings.seed).integers(0, n, size=(settings.resamples, n))


def paired_interval(
    point_a: float, point_b: float, boot_a: np.ndarray, boot_b: np.ndarray, confidence: float
) -> PairedInterval:
    """The interval of boot_a - boot_b (one value per resample, NaN where undefined) around point_a - point_b."""
    differences = np.asarray(boot_a, dtype=np.float64) - np.asarray(boot_b, dtype=np.float64)
    defined = differences[np.isfinite(differences)]
    tail = 100 * (1 - confidence) / 2
    low, high = (float(v) for v in np.percentile(defined, [tail, 100 - tail])) if len(defined) else (math.nan,) * 2
    return PairedInterval(float(point_a - point_b), low, high, confidence, len(differences), len(defined))


# ---------------------------------------------------------------------------------------------------------------
# Statistics over resamples


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each row of x with the same row of y (ties get their average rank, as in
    scipy.stats.spearmanr); NaN for a row where either is constant."""
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=-1) * (ry * ry).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=-1) / denominator, np.nan)


def bootstrap_spearman(ratings: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Spearman correlation of ratings and scores on each resample (a row of `indices`)."""
    return spearman_rows(np.asarray(ratings)[indices], np.asarray(scores)[indices])


def bootstrap_classification_scores(
    y_true: np.ndarray, probs: np.ndarray, indices: np.ndarray, positive: int | None = None
) -> dict[str, np.ndarray]:
    """`classification_scores` on each resample: accuracy; precision, recall and F1 of the positive class, or
    their macro averages (0 where undefined, as zero_division=0); ROC-AUC of the positive class, or the macro
    one-vs-rest AUC (NaN on a resample without every class)."""
    y = np.asarray(y_true, dtype=np.int64)[indices]
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    classes = probs.shape[1]
    predicted = probs.argmax(axis=1)[indices]
    per_class: dict[str, list[np.ndarray]] = {"precision": [], "recall": [], "f1": [], "roc_auc": []}
    for c in range(classes) if positive is None else [positive]:
        truth, guess = y == c, predicted == c
        tp = (truth & guess).sum(axis=1)
        n_true, n_guess = truth.sum(axis=1), guess.sum(axis=1)
        per_class["precision"].append(_ratio(tp, n_guess))
        per_class["recall"].append(_ratio(tp, n_true))
        per_class["f1"].append(_ratio(2 * tp, n_true + n_guess))
        per_class["roc_auc"].append(_auc_rows(truth, probs[:, c][indices]))
    out = {"accuracy": (y == predicted).mean(axis=1)}
    out.update({m: np.mean(values, axis=0) for m, values in per_class.items()})
    if classes > 1:  # an AUC is undefined, for every class, when any class is absent
        present = np.stack([(y == c).any(axis=1) for c in range(classes)]).all(axis=0)
        out["roc_auc"] = np.where(present, out["roc_auc"], np.nan)
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def _auc_rows(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row (Mann-Whitney: ties count half); NaN where a row has one class only."""
    ranks = rankdata(scores, axis=-1)
    positives = truth.sum(axis=1)
    negatives = truth.shape[1] - positives
    rank_sum = np.where(truth, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)
