"""Scoring a loaded model on held-out data (``python -m train.evaluate``): batches in, totals out.

    starts, weights = causal_windows(num_tokens, seq_len, stride)
    result = score_stream(setup, documents)                # {'eval_loss', 'perplexity', 'eval_bpb', ...}
    result = score_examples(setup, rows, split, out_dir)   # classifiers: + table on stdout, confusion PNG
    result = score_tagged(setup, rows, split)              # token classifiers: + per-entity-type table

Sums of the loss and of the token weights are accumulated per batch in the same order as the
trainer's eval (train/evaluation/evaluators.py), so the same windows give the same numbers.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from flax import nnx

from train.config.sections import ConfigError
from train.config.validate import split_labels
from train.core.step import make_score_step
from train.data import chat, examples, windows
from train.data.conll import check_tags
from train.data.objectives import raw_length
from train.data.tasks import EVAL_SEED_OFFSET, eval_set, global_batch, make_objective, packs, process_rows
from train.data.text import PackedTokens, split_batch, stack, window_segments
from train.evaluation import report, scores


def causal_windows(num_tokens: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``tokens[s : s + seq_len + 1]`` that predict every token after the first exactly once.

    Returns ``starts`` int64[W] (``s = w * stride``) and ``weights`` float32[W, seq_len]: 1 on
    the targets window ``w`` scores (all of the first window's; then the last ``stride``, the
    ones no earlier window reached), 0 past the end of the stream.
    """
    targets = num_tokens - 1  # stream positions 1 .. num_tokens - 1 are predicted
    if targets < 1:
        raise ConfigError("the text to score holds no token to predict; give files with text in them")
    count = 1 + -(-max(targets - seq_len, 0) // stride)
    starts = np.arange(count, dtype=np.int64) * stride
    positions = starts[:, None] + 1 + np.arange(seq_len)  # [W, seq_len]
    first_new = np.where(starts == 0, 1, starts + seq_len - stride + 1)  # [W]
    weights = (positions >= first_new[:, None]) & (positions <= targets)
    return starts, weights.astype(np.float32)


def _causal_batches(
    tokens, nbytes, seq_len: int, stride: int, batch_size: int, documents: np.ndarray | None = None
) -> Iterator[tuple[dict, float]]:
    """(batch, bytes it scores) per ``batch_size`` windows; the last batch is filled with weight-0 rows.
    Given the ``documents``' starts, windows keep them apart as the trainer's do (``text.split_batch``)."""
    starts, weights = causal_windows(len(tokens), seq_len, stride)
    fill = -len(starts) % batch_size
    starts = np.concatenate([starts, np.zeros(fill, np.int64)])
    weights = np.concatenate([weights, np.zeros((fill, seq_len), np.float32)])
    pad = seq_len + stride + 1
    tokens = np.concatenate([tokens, np.zeros(pad, np.int32)])
    nbytes = np.concatenate([nbytes, np.zeros(pad, np.int32)])
    for b in range(0, len(starts), batch_size):
        rows = starts[b : b + batch_size, None] + np.arange(seq_len + 1)  # [B, seq_len + 1]
        w = weights[b : b + batch_size]
        batch = {"inputs": tokens[rows[:, :-1]], "targets": tokens[rows[:, 1:]], "weights": w}
        if documents is not None:
            segments, positions = window_segments(rows, documents)
            batch = split_batch({"tokens": tokens[rows], "segment_ids": segments, "positions": positions})
            batch["weights"] = batch["weights"] * w
        yield batch, float(np.sum(nbytes[rows[:, 1:]] * batch["weights"]))


def _objective_batches(setup, packed: PackedTokens) -> Iterator[tuple[dict, float]]:
    """Masked LM / span corruption batches of non-overlapping windows, as the trainer's eval makes
    them (eval seed per batch); the last batch is filled with copies of window 0 of weight 0."""
    t = setup.config.train
    window = raw_length(t.objective, t.seq_len, t.noise_density, t.mean_span) - 1
    count = packed.num_windows(window)
    if count == 0:
        raise ConfigError(f"the text to score is shorter than one window of {window + 1} tokens; give more text")
    objective = make_objective(setup.config, setup.source.config, setup.tokenizer)
    windows = packed.windows(window, packs(setup.config))
    order = np.concatenate([np.arange(count), np.zeros(-count % t.batch_size, np.int64)])
    for i, b in enumerate(range(0, len(order), t.batch_size)):
        raw = stack([windows[j] for j in order[b : b + t.batch_size]])
        batch = objective(split_batch(raw), EVAL_SEED_OFFSET + i)
        valid = (np.arange(b, b + t.batch_size) < count).reshape(-1, *(1,) * (batch["weights"].ndim - 1))
        batch["weights"] = np.where(valid, batch["weights"], 0).astype(batch["weights"].dtype)
        yield batch, 0.0


def _run(setup, batches) -> Iterator[tuple[float, float, np.ndarray, float]]:
    """(summed loss, summed weight, predictions, bytes) per batch, scored under the mesh."""
    graphdef, params = nnx.split(setup.source.model)
    score = make_score_step(graphdef, setup.mesh, setup.config.mesh.logical_rules)
    for batch, nbytes in batches:
        s, w, predictions = score(params, global_batch(process_rows(batch), setup.mesh))
        yield float(s), float(w), np.asarray(predictions), nbytes


def _score_examples(setup, arrays: dict) -> tuple[float, float, np.ndarray]:
    """(summed loss, summed weight, per-example predictions) of every example of ``arrays``, in
    packed rows with ``data.packing`` (train/data/packing.py) as the trainer's eval feeds them."""
    batches, unpack = eval_set(arrays, setup.config.train.batch_size, packs(setup.config))
    total = weight = 0.0
    predicted = []
    for s, w, p, _ in _run(setup, ((b, 0.0) for b in batches)):
        total, weight = total + s, weight + w
        predicted.append(p)
    return total, weight, unpack(predicted)


def score_stream(setup, documents: Sequence[str]) -> dict:
    """``{'eval_loss', 'perplexity', 'eval_bpb', 'tokens', 'bytes'}`` (no bpb and bytes unless causal)."""
    t = setup.config.train
    packed = PackedTokens(documents, setup.tokenizer, count_bytes=True)  # as the trainer packs held-out text
    if t.objective == "causal_lm":
        documents = packed.starts if packs(setup.config) else None
        batches = _causal_batches(packed.tokens, packed.nbytes, t.seq_len, setup.stride, t.batch_size, documents)
    else:
        batches = _objective_batches(setup, packed)
    total = weight = scored_bytes = 0.0
    for s, w, _, b in _run(setup, batches):
        total, weight, scored_bytes = total + s, weight + w, scored_bytes + b
    loss = total / weight
    result = {"eval_loss": loss, "perplexity": perplexity(loss)}
    if t.objective == "causal_lm":
        result["eval_bpb"] = total / math.log(2) / scored_bytes
    result["tokens"] = int(weight)
    if t.objective == "causal_lm":
        result["bytes"] = int(scored_bytes)
    return result


def score_examples(setup, rows: Sequence, split: str, out_dir: pathlib.Path) -> dict:
    """Classification: prints the per-class table, writes ``confusion-<split>.png`` into ``out_dir``;
    returns loss, accuracy, macro-F1, per-class scores. Seq2seq, sft: loss and token accuracy."""
    c, t = setup.config, setup.config.train
    if t.objective == "token_classification":
        return score_tagged(setup, rows, split)
    if t.objective == "classification":
        labels = split_labels(c.data.labels)
        arrays = examples.classification_arrays(rows, c.data, labels, setup.tokenizer, t.seq_len)
    elif t.objective == "sft":  # the loss over the run's train.loss_on tokens
        arrays = chat.sft_arrays(rows, c.data, setup.tokenizer, t.seq_len, t.loss_on)[0]
    else:
        arrays = examples.seq2seq_arrays(rows, c.data, setup.tokenizer, t.seq_len, t.target_len)
    total, weight, predicted = _score_examples(setup, arrays)
    loss = total / weight
    if t.objective in ("seq2seq", "sft"):
        accuracy = scores.token_accuracy(predicted, arrays["targets"], arrays["weights"])
        return {"eval_loss": loss, "perplexity": perplexity(loss), "token_accuracy": accuracy,
                "tokens": int(weight), "examples": len(rows)}  # fmt: skip
    found = report.classification_report(predicted, arrays["targets"], labels)
    print(f"{split}: {len(rows)} examples, accuracy {found.accuracy:.4f}, macro-F1 {found.macro_f1:.4f}\n{found.table}")
    png = report.plot_confusion(found.confusion, labels, out_dir / f"confusion-{split}.png", f"{split} ({len(rows)})")
    return {
        "split": split,
        "eval_loss": loss,
        "accuracy": found.accuracy,
        "macro_f1": found.macro_f1,
        "examples": len(rows),
        "per_class": found.per_class,
        "confusion_matrix": str(png),
    }


def score_tagged(setup, rows: Sequence, split: str) -> dict:
    """Token classification: prints the per-entity-type table and the per-tag (token-level) table;
    returns loss, word accuracy, token macro-F1, micro entity precision / recall / F1 and the per-type
    scores (exact spans, conlleval's reading of the tags). Long sentences are scored in windows, every
    word once (train/data/windows.py)."""
    gold, guessed, loss, words_cut = tag_rows(setup, rows)
    labels = split_labels(setup.config.data.labels)
    found = scores.entity_scores(gold, guessed)
    tokens = report.token_report(gold, guessed, labels)
    print(
        f"{split}: {len(rows)} examples, {sum(map(len, gold))} words, token accuracy {found['token_accuracy']:.4f}, "
        f"entity F1 {found['f1']:.4f}\n{report.entity_table(gold, guessed)}\ntokens:\n{tokens.table}"
    )
    return {
        "split": split,
        "eval_loss": loss,
        "token_accuracy": found["token_accuracy"],
        "token_macro_f1": tokens.macro_f1,
        "entity_precision": found["precision"],
        "entity_recall": found["recall"],
        "entity_f1": found["f1"],
        "examples": len(rows),
        "words": sum(map(len, gold)),
        "words_cut": words_cut,
        "per_type": found["per_type"],
    }


def tag_rows(setup, rows: Sequence) -> tuple[list[list[str]], list[list[str]], float, int]:
    """(gold tags, predicted tags) per row, one per word, the mean loss over the words and the words
    no sub-word stood for; a CoNLL run's rows have their tags checked against its labels first."""
    c, t = setup.config, setup.config.train
    labels = split_labels(c.data.labels)
    if c.data.format == "conll":
        check_tags(rows, labels, c.data.tags_field)
    tagged = windows.windowed_arrays(rows, c.data, labels, setup.tokenizer, t.seq_len)
    total = weight = 0.0
    predicted = []
    for s, w, p, _ in _run(setup, ((b, 0.0) for b in examples.padded_batches(tagged.arrays, t.batch_size))):
        total, weight = total + s, weight + w
        predicted.append(p)
    gold, guessed = windows.word_tags(np.concatenate(predicted)[: len(tagged.arrays["targets"])], tagged, labels)
    return gold, guessed, total / max(weight, 1.0), tagged.words_cut


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows."""
    return math.exp(loss) if loss < 700 else math.inf
