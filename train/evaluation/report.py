"""A classifier's report on a held-out split: scikit-learn's per-class table and a confusion-matrix PNG;
a token classifier's per-entity-type table (seqeval).

report = classification_report(predictions, targets, labels)  # accuracy, macro-F1, per class
print(report.table)
plot_confusion(report.confusion, labels, path)
print(entity_table(gold_tags, predicted_tags))                # token classification: per entity type
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from train.config.sections import ConfigError
from train.evaluation.scores import classification_scores, seqeval_metrics


@dataclasses.dataclass(frozen=True)
class Report:
    accuracy: float
    macro_f1: float  # over the classes that occur in the targets or predictions (as the trainer's eval)
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    table: str  # scikit-learn's classification_report text
    confusion: np.ndarray  # int64 [num_labels, num_labels]: rows true label, columns predicted


def classification_report(predictions: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> Report:
    """Scores int predictions against int targets (both [N], ids into ``labels``).

    Classes that neither occur nor are predicted are left out of the table and the macro average.
    """
    try:
        from sklearn import metrics
    except ImportError:
        raise ConfigError("a classifier's report needs scikit-learn; pip install -e '.[eval]'") from None

    predictions, targets = np.asarray(predictions).reshape(-1), np.asarray(targets).reshape(-1)
    found = classification_scores(predictions, targets, len(labels))
    present = sorted(set(targets.tolist()) | set(predictions.tolist()))
    names = [labels[i] for i in present]
    kwargs = {"labels": present, "target_names": names, "zero_division": 0}
    table = metrics.classification_report(targets, predictions, digits=4, **kwargs)
    scores = metrics.classification_report(targets, predictions, output_dict=True, **kwargs)
    per_class = {
        name: {"precision": s["precision"], "recall": s["recall"], "f1": s["f1-score"], "support": int(s["support"])}
        for name, s in ((name, scores[name]) for name in names)
    }
    confusion = metrics.confusion_matrix(targets, predictions, labels=list(range(len(labels))))
    return Report(found["accuracy"], found["macro_f1"], per_class, table, confusion)


def entity_table(gold: list[list[str]], predicted: list[list[str]]) -> str:
    """seqeval's per-entity-type precision / recall / F1 / support table of BIO tag lists (one per row)."""
    return seqeval_metrics().classification_report(gold, predicted, digits=4, zero_division=0)


@dataclasses.dataclass(frozen=True)
class TokenReport:
    macro_f1: float  # over the tags that occur in the gold or predicted words (scores.token_macro_f1)
    table: str  # scikit-learn's classification_report text over the words, with a micro avg row


def token_report(gold: list[list[str]], predicted: list[list[str]], labels: Sequence[str]) -> TokenReport:
    """Every tag (O too) scored over the words as single classes, as fine-tuning results on CoNLL are
    published: scikit-learn's per-tag table with micro, macro and weighted averages, 3 decimals."""
    try:
        from sklearn import metrics
    except ImportError:
        raise ConfigError("the token-level report needs scikit-learn; pip install -e '.[eval]'") from None
    y_true = [t for row in gold for t in row]
    y_pred = [t for row in predicted for t in row]
    present = [name for name in labels if name in set(y_true) | set(y_pred)]
    table = metrics.classification_report(y_true, y_pred, labels=present, digits=3, zero_division=0)
    p, r, f, _ = metrics.precision_recall_fscore_support(y_true, y_pred, labels=present, average="micro")
    width = max(len(name) for name in [*present, "weighted avg"])
    micro = f"{'micro avg':>{width}}  {p:9.3f} {r:9.3f} {f:9.3f} {len(y_true):9d}"
    lines = [line for line in table.splitlines() if not line.strip().startswith("accuracy")]
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("macro avg"))
    table = "\n".join([*lines[:at], micro, *lines[at:]])
    macro = float(metrics.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
    return TokenReport(macro, table)


def plot_confusion(confusion: np.ndarray, labels: Sequence[str], path: pathlib.Path, title: str = "") -> pathlib.Path:
    """Writes the confusion matrix (counts, and each true label's row share as colour) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion.sum(axis=1, keepdims=True)
    share = confusion / np.maximum(rows, 1)
    size = 1.2 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the true label")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
