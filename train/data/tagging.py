"""Token classification examples: JSONL rows of words and their tags -> sub-word arrays, and back.

    rows: {"tokens": ["Enter", "HAMLET."], "tags": ["B-STAGE", "I-STAGE"]}   (data.tokens_field, tags_field)
    tagged = tagged_arrays(rows, cfg.data, labels, tokenizer, seq_len=128)
    tagged.arrays     # {'inputs', 'attention_mask', 'token_types', 'targets', 'weights'}: [N, seq_len]
    words = word_predictions(token_predictions, tagged.positions, labels)  # one tag per word, per row

The words of a row are joined with single spaces into ``[CLS] text [SEP]``, cut and padded to
``seq_len`` as for classification. Each sub-word belongs to the word whose characters it covers
(the tokenizer's character offsets). The first sub-word of a word carries the word's label id in
``targets`` and weight 1; the word's other sub-words, the markers and the padding have weight 0, so
they count in neither the loss nor the scores. Words cut off by ``seq_len`` (or that no sub-word
covers) have position -1 and are predicted ``O`` when scored, so every word of a row is scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from train.config.sections import ConfigError, DataConfig
from train.data.files import Row
from train.data.objectives import classification
from train.data.tokenizer import ByteTokenizer, Tokenizer, markers
from train.evaluation.scores import entity_scores

OUTSIDE = "O"  # the tag of a word that belongs to no entity


def tagged_words(row: Row, cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(words, tags) of a row: two lists of strings of the same length, no word blank."""
    values = []
    for name, key in ((cfg.tokens_field, "data.tokens_field"), (cfg.tags_field, "data.tags_field")):
        if name not in row.record:
            raise ConfigError(f"{row.where} has no field '{name}'; add it or set {key} to the field to read")
        value = row.record[name]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{row.where} field '{name}' is not a list of strings; fix that line")
        values.append(value)
    words, tags = values
    if len(words) != len(tags):
        raise ConfigError(
            f"{row.where} has {len(words)} {cfg.tokens_field} but {len(tags)} {cfg.tags_field}; give one tag per word"
        )
    if not words or any(not w.strip() for w in words):
        raise ConfigError(f"{row.where} has no words or a blank word; give each row non-blank words")
    return words, tags


def tag_names(rows: Sequence[Row], cfg: DataConfig) -> list[str]:
    """The sorted distinct tags of ``rows`` (``data.labels`` takes precedence; see examples.label_names)."""
    return sorted({t for r in rows for t in tagged_words(r, cfg)[1]})


def word_spans(words: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """(the words joined by single spaces, each word's start and end character offsets int64 [W])."""
    lengths = np.array([len(w) for w in words], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    return " ".join(words), starts, starts + lengths


def _offsets(tokenizer: Tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text (ids int32 [n], character offsets int64 [n, 2]) of its sub-words."""
    if isinstance(tokenizer, ByteTokenizer):
        out = []
        for text, ids in zip(texts, tokenizer.encode_batch(texts)):
            widths = [len(ch.encode("utf-8")) for ch in text]
            char = np.repeat(np.arange(len(text), dtype=np.int64), widths)  # the character of every byte
            out.append((ids, np.stack([char, char + 1], axis=1)))
        return out
    fast = getattr(tokenizer, "_fast", None)
    if fast is None:
        raise ConfigError(
            "token_classification needs sub-word offsets, which this tokenizer lacks; use a fast (tokenizer.json) "
            "Hugging Face tokenizer or data.tokenizer=byte"
        )
    encodings = fast.encode_batch(texts, add_special_tokens=False)
    return [(np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int64).reshape(-1, 2)) for e in encodings]


def word_of_tokens(offsets: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """int64 [n]: the word each sub-word's last character falls in, -1 for sub-words of the spaces
    between words (or empty ones). offsets: int64 [n, 2] character spans; starts, ends: [W]."""
    last = offsets[:, 1] - 1
    word = np.searchsorted(starts, last, side="right") - 1
    inside = (offsets[:, 1] > offsets[:, 0]) & (word >= 0) & (last < ends[np.maximum(word, 0)])
    return np.where(inside, word, -1)


@dataclasses.dataclass(frozen=True)
class TaggedArrays:
    arrays: dict[str, np.ndarray]  # the model's batch rows: int32 [N, T] inputs ..., targets, float32 weights
    positions: list[np.ndarray]  # per row, int64 [W]: the position of each word's first sub-word, or -1
    tags: list[np.ndarray]  # per row, int64 [W]: the label id of each word


def tagged_arrays(
    rows: Sequence[Row], cfg: DataConfig, labels: Sequence[str], tokenizer: Tokenizer, seq_len: int
) -> TaggedArrays:
    """The sub-word arrays of ``rows`` as the module docstring describes; tags must be in ``labels``."""
    ids = {name: i for i, name in enumerate(labels)}
    words, tags = [], []
    for row in rows:
        w, t = tagged_words(row, cfg)
        unknown = sorted(set(t) - set(ids))
        if unknown:
            raise ConfigError(
                f"{row.where} has tag '{unknown[0]}', which is not in data.labels ({', '.join(labels)}); "
                "add it to data.labels or fix that line"
            )
        words.append(w)
        tags.append(np.array([ids[x] for x in t], np.int64))
    spans = [word_spans(w) for w in words]
    m = markers(tokenizer)
    room = seq_len - 2  # [CLS] ... [SEP]
    sequences, targets, weights, positions = [], [], [], []
    encoded = _offsets(tokenizer, [text for text, _, _ in spans])
    for (_, starts, ends), (sub_ids, offsets), row_tags in zip(spans, encoded, tags):
        word = word_of_tokens(offsets, starts, ends)[:room]
        first = np.full(len(starts), -1, np.int64)  # position (after [CLS]) of each word's first sub-word
        for position in range(len(word) - 1, -1, -1):
            if word[position] >= 0:
                first[word[position]] = position + 1
        target = np.zeros(seq_len, np.int32)
        weight = np.zeros(seq_len, np.float32)
        kept = first >= 0
        target[first[kept]] = row_tags[kept]
        weight[first[kept]] = 1.0
        sequences.append(sub_ids[:room])
        targets.append(target)
        weights.append(weight)
        positions.append(first)
    # the classification layout ([CLS] text [SEP], padding, token types), per-token targets in place of its labels
    batch = classification(sequences, np.zeros(len(rows)), seq_len=seq_len, pad_id=m.pad, cls_id=m.cls, sep_id=m.sep)
    batch["targets"], batch["weights"] = np.stack(targets), np.stack(weights)
    return TaggedArrays(batch, positions, tags)


def log_prior(targets: np.ndarray, weights: np.ndarray, num_labels: int) -> np.ndarray:
    """float32 [num_labels]: log frequency of each label id over the weighted positions of int [N, T]
    ``targets`` (one added to every count, so an unseen label stays finite)."""
    counts = np.bincount(targets[weights > 0], minlength=num_labels)[:num_labels] + 1.0
    return np.log(counts / counts.sum()).astype(np.float32)


def word_predictions(predicted: np.ndarray, positions: Sequence[np.ndarray], labels: Sequence[str]) -> list[list[str]]:
    """Per row, the tag predicted for each word: the label of its first sub-word's argmax (``predicted``:
    int [N, T]), ``O`` where the word has no sub-word within ``seq_len``."""
    out = []
    for row, first in zip(predicted, positions):
        ids = np.where(first >= 0, row[np.maximum(first, 0)], -1)
        out.append([labels[i] if i >= 0 else OUTSIDE for i in ids])
    return out


def word_tags(predicted: np.ndarray, tagged: TaggedArrays, labels: Sequence[str]) -> tuple[list, list]:
    """(gold, predicted) tag lists per row, one tag per word, from argmax sub-word predictions int [N, T]."""
    gold = [[labels[i] for i in row] for row in tagged.tags]
    return gold, word_predictions(predicted, tagged.positions, labels)


def tagged_scores(predicted: np.ndarray, tagged: TaggedArrays, labels: Sequence[str]) -> dict:
    """``scores.entity_scores`` of the argmax sub-word predictions (int [N, T]) against ``tagged``'s words."""
    return entity_scores(*word_tags(predicted, tagged, labels))
