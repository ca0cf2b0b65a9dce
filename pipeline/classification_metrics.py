"""The downstream probe's metrics (scikit-learn) and their summaries over folds x seeds.

Binary tasks: precision, recall and F1 of the positive class, ROC-AUC of its probability. More classes: the macro
averages (every class weighs the same) and the macro one-vs-rest ROC-AUC. Predictions are the most probable class.
ROC-AUC is NaN where it is undefined (an evaluation set without every class); summaries then use the runs where it
is defined and say how many.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")
METRIC_NAMES = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1", "roc_auc": "ROC-AUC"}


def classification_scores(y_true, probs, positive: int | None = None) -> dict[str, float]:
    """Scores of class probabilities `probs` (n x classes) against class ids `y_true`.

    `positive`: the positive class id of a binary task (precision/recall/F1 of that class); None for macro averages.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true) or len(y_true) == 0:
        raise ValueError(f"probabilities of shape {probs.shape} for {len(y_true)} labels")
    classes = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    if positive is not None:
        if classes != 2:
            raise ValueError(f"a positive class is for binary tasks, not {classes} classes")
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, pos_label=positive, average="binary", zero_division=0
        )
    else:
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=range(classes), average="macro", zero_division=0
        )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": roc_auc(y_true, probs, positive),
    }


def roc_auc(y_true: np.ndarray, probs: np.ndarray, positive: int | None) -> float:
    """Binary: AUC of P(positive). More classes: macro one-vs-rest AUC. NaN when a class is absent from y_true."""
    classes = probs.shape[1]
    if len(np.unique(y_true)) < classes:
        return math.nan
    if positive is not None:
        return float(roc_auc_score(y_true == positive, probs[:, positive]))
    if classes == 2:  # each class's one-vs-rest AUC is that of P(class 1), so their macro average is too
        return float(roc_auc_score(y_true == 1, probs[:, 1] / probs.sum(axis=1)))
    probs = probs / probs.sum(axis=1, keepdims=True)  # scikit-learn checks that rows sum to 1
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(classes))))


def mean_std(values) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the finite values, and their count."""
    finite = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(finite) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
        "n": int(len(finite)),
    }


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per metric: mean, std and count over the rows (one per fold x seed)."""
    return {m: mean_std([row[m] for row in rows]) for m in METRICS}


def paired_difference(rows_a: list[dict], rows_b: list[dict]) -> dict[str, dict[str, float]]:
    """Per metric: mean and std of a - b over runs paired by position (the same fold and seed)."""
    if len(rows_a) != len(rows_b):
        raise ValueError(f"{len(rows_a)} runs cannot be paired with {len(rows_b)}")
    return {m: mean_std([a[m] - b[m] for a, b in zip(rows_a, rows_b)]) for m in METRICS}
