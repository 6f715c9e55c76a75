"""Scores of predictions against labels, computed on the host over a whole held-out split."""

from __future__ import annotations

import numpy as np

from models.config import ConfigError


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


def token_macro_f1(gold: list[list[str]], predicted: list[list[str]], labels: list[str]) -> float:
    """Macro-F1 over the words of tag lists (per word, tags in ``labels``), every tag counted on its own
    (O too), averaged over the tags that occur in ``gold`` or ``predicted`` (``classification_scores``)."""
    ids = {name: i for i, name in enumerate(labels)}
    flat = [np.array([ids[t] for row in tags for t in row], np.int64) for tags in (predicted, gold)]
    return classification_scores(*flat, len(labels))["macro_f1"]


def seqeval_metrics():
    """``seqeval.metrics``, or a ConfigError saying how to install it."""
    try:
        from seqeval import metrics
    except ImportError:
        raise ConfigError("token_classification scores entities with seqeval; pip install -e '.[eval]'") from None
    return metrics


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity-level scores of tag sequences (BIO, per word), as named-entity work reports them.

    An entity counts as found only when the prediction has exactly its span and type. Spans are read
    as conlleval reads them (seqeval's default mode): a B- tag, or an I- tag after another type or
    after O, starts an entity. Returns ``{'precision', 'recall', 'f1'}`` (micro over all entities),
    ``'token_accuracy'`` (share of words tagged right) and ``'per_type'``: ``{type: {'precision',
    'recall', 'f1', 'support'}}``, support the number of gold entities of the type.
    """
    metrics = seqeval_metrics()
    if len(gold) != len(predicted) or any(len(g) != len(p) for g, p in zip(gold, predicted)):
        raise ValueError("need one predicted tag per gold tag, row by row")
    words = sum(len(g) for g in gold)
    right = sum(a == b for g, p in zip(gold, predicted) for a, b in zip(g, p))
    report = metrics.classification_report(gold, predicted, output_dict=True, zero_division=0)
    per_type = {
        name: {
            "precision": float(s["precision"]),
            "recall": float(s["recall"]),
            "f1": float(s["f1-score"]),
            "support": int(s["support"]),
        }
        for name, s in report.items()
        if not name.endswith(" avg")
    }
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "token_accuracy": right / max(words, 1),
        "per_type": per_type,
    }
