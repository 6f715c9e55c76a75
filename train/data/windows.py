"""No word lost: tagged sentences longer than ``seq_len`` sub-words as overlapping windows of words.

    windows = windowed_arrays(rows, cfg.data, labels, tokenizer, seq_len=128)
    windows.arrays        # tagging.tagged_arrays' rows, one per window: [N_windows, seq_len]
    gold, predicted = word_tags(argmax, windows, labels)   # per sentence, one tag per word

A sentence whose sub-words fit in ``seq_len - 2`` is one window. A longer one is cut at word
boundaries into windows that fill the room, each next one starting up to ``room // 4`` sub-words
(``CONTEXT``) before the previous one ended, so the words near a cut see context on both sides. Every
word is *owned* by exactly one window, the one where it lies before the middle of the overlap;
only owned words carry weight in ``targets`` (the loss and the scores count each word once) and
only their predictions are read back. A single word longer than the room keeps its first sub-words.

Document context (``data.document_context``, CoNLL ``-DOCSTART-`` documents, the ``doc`` of each row):
a sentence that fits in one window fills the rest of it with the words of the sentences around it in
its document (those of ``rows``, in their order), one word before it, then one after, and so on
outward while they fit. Context words carry no weight, so each word is still trained, scored and
predicted once, in its own sentence's window.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from train.config.sections import DataConfig
from train.data import tagging
from train.data.files import Row
from train.data.tokenizer import Tokenizer

CONTEXT = 4  # the overlap of two windows is at most room // CONTEXT sub-words


@dataclasses.dataclass(frozen=True)
class Windows:
    arrays: dict[str, np.ndarray]  # the model's batch rows, one per window: int32 [N, T] ..., float32 weights
    positions: list[np.ndarray]  # per sentence, int64 [W]: window * T + position of each word's first sub-word
    tags: list[np.ndarray]  # per sentence, int64 [W]: the label id of each word

    @property
    def words_cut(self) -> int:
        """Words no sub-word of any window stands for (0 unless the tokenizer drops a word's characters)."""
        return int(sum((p < 0).sum() for p in self.positions))


def plan_windows(counts: np.ndarray, room: int, context: int) -> list[tuple[int, int, int, int]]:
    """(start, end, own_start, own_end) word ranges of the windows of one sentence whose words have
    ``counts`` (int [W]) sub-words: each window's sub-words fit in ``room`` (a word alone may not), the
    owned ranges partition ``[0, W)``, and two windows overlap by at most ``context`` sub-words."""
    c = np.minimum(np.asarray(counts, np.int64), room)
    n = len(c)
    spans, start = [], 0
    while True:
        end, total = start, 0
        while end < n and total + c[end] <= room:
            total, end = total + c[end], end + 1
        end = max(end, start + 1)
        spans.append((start, end))
        if end >= n:
            break
        # step back from `end` for context, leaving room for word `end` so the next window gets further
        nxt, back, budget = end, 0, min(context, room - c[end])
        while nxt - 1 > start and back + c[nxt - 1] <= budget:
            nxt, back = nxt - 1, back + c[nxt - 1]
        start = nxt
    bounds = [0]
    for (_, end), (nxt, _) in itertools.pairwise(spans):
        bounds.append(max((nxt + end) // 2, bounds[-1]))
    bounds.append(n)
    return [(s, e, a, b) for (s, e), a, b in zip(spans, bounds, bounds[1:])]


def _counts(words: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """int64 [W]: sub-words of each word when the sentence is tokenised whole, a sub-word of the space
    before a word (the byte tokenizer's) counted with that word, one after the last with the last."""
    text, starts, ends = tagging.word_spans(words)
    _, offsets = tagging._offsets(tokenizer, [text])[0]
    word = tagging.word_of_tokens(offsets, starts, ends)
    following = np.where(word >= 0, word, len(words))
    owner = np.minimum(np.minimum.accumulate(following[::-1])[::-1], len(words) - 1)  # the next word's index
    return np.bincount(owner, minlength=len(words)).astype(np.int64)


def windowed_arrays(
    rows: Sequence[Row], cfg: DataConfig, labels: Sequence[str], tokenizer: Tokenizer, seq_len: int
) -> Windows:
    """The windows of ``rows`` as the module docstring describes; tags must be in ``labels``."""
    sentences = [tagging.tagged_words(r, cfg) for r in rows]
    counts = [_counts(w, tokenizer) for w, _ in sentences]
    docs = [(r.path, r.record["doc"]) if cfg.document_context and "doc" in r.record else None for r in rows]
    room = seq_len - 2  # [CLS] ... [SEP]
    margin = 0  # sub-words left free, raised when a window's own tokenisation runs longer than counted
    while True:
        plans = [plan_windows(c, room - margin, (room - margin) // CONTEXT) for c in counts]
        contexts = [
            _context(i, docs, counts, room - margin - int(counts[i].sum())) if len(plan) == 1 else ([], [])
            for i, plan in enumerate(plans)
        ]
        window_rows, leads = [], []
        for r, (w, t), plan, (before, after) in zip(rows, sentences, plans, contexts):
            for s, e, _, _ in plan:
                words = [sentences[j][0][k] for j, k in before] + w[s:e] + [sentences[j][0][k] for j, k in after]
                tags = [sentences[j][1][k] for j, k in before] + t[s:e] + [sentences[j][1][k] for j, k in after]
                window_rows.append(Row({cfg.tokens_field: words, cfg.tags_field: tags}, r.path, r.line))
                leads.append(len(before) - s)  # a sentence word's index in its window, less its own index
        tagged = tagging.tagged_arrays(window_rows, cfg, labels, tokenizer, seq_len)
        weights = np.zeros_like(tagged.arrays["weights"])
        positions, tags, k, lost = [], [], 0, False
        for (words, _), plan, (before, after) in zip(sentences, plans, contexts):
            flat = np.full(len(words), -1, np.int64)
            own = []
            for s, _, a, b in plan:
                first = tagged.positions[k][a + leads[k] : b + leads[k]]
                lost |= bool((first < 0).any()) and (len(plan) > 1 or bool(before or after))
                kept = first >= 0
                flat[a:b] = np.where(kept, k * seq_len + first, -1)
                weights[k, first[kept]] = 1.0
                own.append(tagged.tags[k][a + leads[k] : b + leads[k]])
                k += 1
            positions.append(flat)
            tags.append(np.concatenate(own))
        if not lost or margin >= room // 2:
            return Windows({**tagged.arrays, "weights": weights}, positions, tags)
        margin += max(room // 16, 1)


def _context(i: int, docs: Sequence, counts: Sequence[np.ndarray], budget: int) -> tuple[list, list]:
    """(before, after): (sentence, word) index pairs, in text order, of the words around sentence ``i``
    in its document (``docs[i]``, (file, doc); None: none) whose sub-words (``counts``) fit in ``budget``: one word
    before, then one after, outward, each side stopping at the first word that does not fit."""
    if docs[i] is None:
        return [], []

    def words(step: int):
        j = i + step
        while 0 <= j < len(docs) and docs[j] == docs[i]:
            yield from ((j, k) for k in (range(len(counts[j])) if step > 0 else reversed(range(len(counts[j])))))
            j += step

    sides, taken, open_ = (words(-1), words(1)), ([], []), [True, True]
    while any(open_):
        for side in (0, 1):
            nxt = next(sides[side], None) if open_[side] else None
            if nxt is None or counts[nxt[0]][nxt[1]] > budget:
                open_[side] = False
                continue
            budget -= int(counts[nxt[0]][nxt[1]])
            taken[side].append(nxt)
    return taken[0][::-1], taken[1]


def word_tags(predicted: np.ndarray, windows: Windows, labels: Sequence[str]) -> tuple[list, list]:
    """(gold, predicted) tag lists per sentence, one tag per word, from argmax sub-word predictions
    int [N_windows, T]; a word with no sub-word is predicted ``O``."""
    flat = np.asarray(predicted).reshape(-1)
    gold = [[labels[i] for i in row] for row in windows.tags]
    guessed = [[labels[flat[p]] if p >= 0 else tagging.OUTSIDE for p in row] for row in windows.positions]
    return gold, guessed
