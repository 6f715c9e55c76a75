"""Scores of predictions against labels, computed on the host over a whole held-out split."""

from __future__ import annotations

import numpy as np


def classification_scores(predictions: np.ndarray, targets: np.ndarray, num_labels: int) -> dict[str, float]:
    """``{'accuracy', 'macro_f1'}`` of int predictions against int targets, both [N].

    Macro-F1 is the unweighted mean of each class's F1 = 2·TP / (2·TP + FP + FN) over the
    classes that occur in the targets or the predictions (scikit-learn's ``f1_score(...,
    average='macro')``), so a class nobody predicts counts as 0 and pulls the mean down.
    """
    predictions, targets = np.asarray(predictions).reshape(-1), np.asarray(targets).reshape(-1)
    if len(predictions) != len(targets) or not len(targets):
        raise ValueError(f"need as many predictions as targets, at least one: got {len(predictions)}, {len(targets)}")
    confusion = np.zeros((num_labels, num_labels), np.int64)  # [target, prediction]
    np.add.at(confusion, (targets, predictions), 1)
    tp = np.diag(confusion).astype(np.float64)
    fp, fn = confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])
    return {"accuracy": float(tp.sum() / len(targets)), "macro_f1": float(f1.mean())}


def token_accuracy(predictions: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
    """Share of weighted target tokens predicted exactly; all arrays [N, T], weights 0 on padding."""
    return float(np.sum(weights * (predictions == targets)) / np.sum(weights))
