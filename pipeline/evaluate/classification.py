"""Binary classification metrics with the positive class given (spam = positive).

Computed here rather than pulled from scikit-learn: a few lines each, and the tests check them
against hand-computed values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import InputError


def confusion_matrix(
    labels: Sequence[int], predictions: Sequence[int], num_classes: int
) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(
        counts, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1
    )
    return counts


def roc_auc(labels: Sequence[int], scores: Sequence[float], positive: int = 1) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative (ties count half), from average ranks (Mann-Whitney U). NaN if a class is absent."""
    y = np.asarray(labels) == positive
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    start = 0
    while start < len(s):
        end = start
        while end + 1 < len(s) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def binary_metrics(
    labels: Sequence[int],
    predictions: Sequence[int],
    positive_scores: Sequence[float],
    positive: int = 1,
) -> dict[str, float]:
    """accuracy, precision, recall, f1 (0 where undefined, as scikit-learn's zero_division=0),
    and roc_auc from the positive class's scores."""
    y = np.asarray(labels)
    p = np.asarray(predictions)
    if len(y) == 0 or len(y) != len(p) or len(y) != len(positive_scores):
        raise InputError(
            f"need equally many labels, predictions and scores, got {len(y)}, {len(p)}, "
            f"{len(positive_scores)}"
        )
    tp = int(((p == positive) & (y == positive)).sum())
    fp = int(((p == positive) & (y != positive)).sum())
    fn = int(((p != positive) & (y == positive)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float((y == p).mean()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(labels, positive_scores, positive),
    }
