"""Training objectives: host-side numpy transforms from token rows (or pairs) to the batch a
model family's ``forward`` reads, plus ``targets`` and ``weights`` for the loss in train/core/step.py.

    masked_lm(tokens, mask_id=..., vocab_size=..., seed=(seed, step))   # encoder (BERT)
    span_corruption(tokens, vocab_size=..., seed=(seed, step))          # encoder_decoder (T5)
    packed_span_corruption(row, segment_ids, vocab_size=..., seed=...)  # T5, each document of a row alone
    seq2seq(pairs, inputs_length=..., targets_length=...)               # encoder_decoder
    classification(sequences, labels, seq_len=...)                      # encoder, head='classification'

Random objectives draw everything from ``np.random.default_rng(seed)`` in a fixed order, so a
batch is a pure function of its tokens and seed (pass ``(run_seed, step)`` for resumable runs).
Every batch of one objective has the same keys and, for fixed lengths, the same shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Batch = dict[str, np.ndarray]
Seed = int | Sequence[int] | np.random.Generator


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# --- masked LM (BERT) -----------------------------------------------------------------------


def masked_lm(
    tokens: np.ndarray,
    *,
    mask_id: int,
    vocab_size: int,
    seed: Seed,
    rate: float = 0.15,
    special_ids: Sequence[int] = (),
    pad_id: int | None = None,
    segment_ids: np.ndarray | None = None,
) -> Batch:
    """BERT masking of int[B, T] rows -> ``{'inputs', 'attention_mask', 'targets', 'weights'}``.

    Per row (per segment of a row, given int[B, T] ``segment_ids``), exactly ``max(1, round(rate * n))``
    of its ``n`` eligible positions (neither ``pad_id`` nor in ``special_ids``) are chosen, as BERT's
    create_pretraining_data does for each example.
    Each chosen token becomes ``mask_id`` (80%), a uniform id in [0, vocab_size) (10%) or
    stays (10%). ``targets`` are the original tokens (int32 [B, T]); ``weights`` (float32
    [B, T]) are 1 on chosen positions only; ``attention_mask`` is 0 on ``pad_id``.
    """
    tokens = np.asarray(tokens, np.int32)
    rng = _rng(seed)
    b, t = tokens.shape
    not_pad = np.ones_like(tokens, bool) if pad_id is None else tokens != pad_id
    eligible = not_pad & ~np.isin(tokens, list(special_ids))
    groups = np.zeros((b, t), np.int64) if segment_ids is None else np.asarray(segment_ids, np.int64)
    n = np.zeros((b, groups.max(initial=0) + 1), np.int64)
    np.add.at(n, (np.arange(b)[:, None], groups), eligible)  # [B, groups]: eligible positions per group
    n = np.take_along_axis(n, groups, axis=1)  # [B, T]: of each position's group
    k = np.where(n > 0, np.maximum(1, np.round(rate * n)), 0).astype(np.int64)
    scores = np.where(eligible, rng.random((b, t)), 2.0)  # ineligible positions sort last
    order = np.lexsort((scores, groups), axis=1)  # by group, then score
    sorted_groups = np.take_along_axis(groups, order, axis=1)
    first = np.maximum.accumulate(np.where(np.diff(sorted_groups, axis=1, prepend=-1) != 0, np.arange(t), 0), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(t) - first, axis=1)  # rank of each position within its group
    chosen = eligible & (rank < k)
    action = rng.random((b, t))
    random_ids = rng.integers(0, vocab_size, (b, t), dtype=np.int32)
    inputs = np.where(chosen & (action < 0.8), mask_id, tokens)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return {
        "inputs": inputs.astype(np.int32),
        "attention_mask": not_pad.astype(np.int32),
        "targets": tokens,
        "weights": chosen.astype(np.float32),
    }


# --- span corruption (T5) -------------------------------------------------------------------


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(raw tokens per row, targets length) so corrupted inputs, with EOS, are ``inputs_length`` long.

    T5's ``random_spans_helper``: 512 -> (568, 114) at density 0.15, mean span 3.
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        noise = round(tokens_length * noise_density)
        spans = round(noise / mean_span)
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length, targets_length = tokens_length - 1, targets_length - 1
    return tokens_length, targets_length


def random_spans_noise_mask(
    length: int, rng: np.random.Generator, noise_density: float = 0.15, mean_span: float = 3.0
) -> np.ndarray:
    """bool[length], True on noise: T5's ``random_spans_noise_mask`` (no random roll).

    ``round(length * noise_density)`` noise tokens (clipped to [1, length - 1]) in
    ``max(1, round(noise / mean_span))`` spans; the row starts with a non-noise span and
    alternates, span lengths drawn as T5 does (a random partition into non-empty segments).
    """
    if mean_span < 1:
        raise ValueError(f"mean_span={mean_span} must be >= 1")
    if noise_density == 0.0:
        return np.zeros(length, bool)
    orig_length, length = length, max(length, 2)
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span), 1)

    def segment_lengths(num_items: int) -> np.ndarray:
        first_in_segment = np.concatenate([[0], rng.permutation(np.arange(num_items - 1) < num_spans - 1)])
        return np.bincount(np.cumsum(first_in_segment), minlength=num_spans)  # [num_spans]

    noise_lengths = segment_lengths(num_noise)
    nonnoise_lengths = segment_lengths(length - num_noise)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * num_spans]
    span_start = np.zeros(length, np.int64)
    span_start[np.cumsum(interleaved)[:-1]] = 1
    return (np.cumsum(span_start) % 2 == 1)[:orig_length]


def _spans_to_sentinels(tokens: np.ndarray, noise: np.ndarray, vocab_size: int) -> np.ndarray:
    """Each noise span -> one sentinel, counting down from ``vocab_size - 1`` (T5's
    ``noise_span_to_unique_sentinel``)."""
    previous = np.concatenate([[False], noise[:-1]])
    first = noise & ~previous
    sentinels = vocab_size - np.cumsum(first)  # vocab_size - 1 for the first span
    return np.where(first, sentinels, tokens)[~(noise & previous)]


def span_corruption(
    tokens: np.ndarray,
    *,
    vocab_size: int,
    seed: Seed,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
    eos_id: int | None = 1,
    pad_id: int = 0,
) -> Batch:
    """T5 span corruption of int[B, L] rows -> a ``seq2seq`` batch.

    ``vocab_size`` is the tokenizer's size including its sentinel ids (32100 for T5's, whose
    ``<extra_id_0>`` is 32099). Inputs keep the non-noise tokens with one sentinel per noise
    span; targets are each sentinel followed by its span; both end in ``eos_id`` (none when
    None). For rows of ``span_corruption_lengths(n)[0]`` tokens the inputs are exactly ``n``
    long; all rows of one call share lengths, so no padding is needed.
    """
    tokens = np.asarray(tokens, np.int32)
    rng = _rng(seed)
    pairs = []
    for row in tokens:
        noise = random_spans_noise_mask(len(row), rng, noise_density, mean_span)
        pairs.append((_spans_to_sentinels(row, noise, vocab_size), _spans_to_sentinels(row, ~noise, vocab_size)))
    extra = 0 if eos_id is None else 1
    inputs_length = max(len(i) for i, _ in pairs) + extra
    targets_length = max(len(t) for _, t in pairs) + extra
    return seq2seq(pairs, inputs_length=inputs_length, targets_length=targets_length, eos_id=eos_id, pad_id=pad_id)


def _corrupted_lengths(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths, eos left out, of ``n`` tokens corrupted as ``random_spans_noise_mask``
    draws them: exact unless a draw leaves a non-noise span empty, which only shortens both."""
    if noise_density == 0.0 or n == 1:
        return n, 1  # no noise: the tokens, and one sentinel for the whole row
    noise = min(max(round(n * noise_density), 1), n - 1)
    spans = max(round(noise / mean_span), 1)
    return n - noise + spans, noise + spans


def packed_span_corruption(
    tokens: np.ndarray,
    segment_ids: np.ndarray,
    *,
    vocab_size: int,
    seed: Seed,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
    eos_id: int = 1,
    pad_id: int = 0,
) -> Batch:
    """T5 span corruption of each document of a packed window, as t5x/seqio corrupt examples before
    packing them: int[1, L] ``tokens`` with their ``segment_ids`` [1, L] (contiguous runs) -> one packed
    seq2seq row.

    Each segment (its trailing ``eos_id`` left out: the end of its document) is corrupted alone: spans
    never cross a document boundary and its sentinels count down from ``vocab_size - 1`` again; its
    inputs and targets each end in ``eos_id``. The rows are as long as the corrupted inputs / targets of
    L tokens of one document (``span_corruption_lengths``), so a window of one document is exactly what
    ``span_corruption`` gives it; a segment that would overflow either side is cut to the longest prefix
    that fits (the rest of the window is dropped, as seqio's trimming packer drops it).
    Returns int32 ``encoder_inputs`` / ``encoder_segment_ids`` / ``encoder_positions`` [1, inputs_length],
    ``decoder_inputs`` (each segment's targets shifted right after ``pad_id``, T5's start) /
    ``decoder_segment_ids`` / ``decoder_positions`` / ``targets`` [1, targets_length] and float32
    ``weights`` (1 on every segment's targets); padding is ``pad_id`` with segment 0.
    """
    rng = _rng(seed)
    row, segments = np.asarray(tokens, np.int32).reshape(-1), np.asarray(segment_ids).reshape(-1)
    inputs_length, targets_length = (n + 1 for n in _corrupted_lengths(len(row), noise_density, mean_span))
    sides = {"encoder": [], "decoder": []}  # per segment (inputs, targets) with eos
    room = [inputs_length, targets_length]
    for segment in dict.fromkeys(segments[segments > 0].tolist()):
        x = row[segments == segment]
        x = x[:-1] if x[-1] == eos_id else x
        if len(x) == 0:
            continue  # a document's eos alone
        n = len(x)
        while n and any(k + 1 > r for k, r in zip(_corrupted_lengths(n, noise_density, mean_span), room)):
            n -= 1
        if n == 0:
            break  # the row is full
        noise = random_spans_noise_mask(n, rng, noise_density, mean_span)
        pair = [np.append(_spans_to_sentinels(x[:n], m, vocab_size), eos_id) for m in (noise, ~noise)]
        room = [r - len(p) for r, p in zip(room, pair)]
        sides["encoder"].append(pair[0])
        sides["decoder"].append(pair[1])
    out: Batch = {}
    for side, length in (("encoder", inputs_length), ("decoder", targets_length)):
        pieces = sides[side]
        ids = np.full(length, pad_id, np.int32)
        used = sum(len(p) for p in pieces)
        ids[:used] = np.concatenate(pieces) if pieces else []
        seg = np.zeros(length, np.int32)
        seg[:used] = np.repeat(np.arange(1, len(pieces) + 1), [len(p) for p in pieces])
        out[f"{side}_segment_ids"] = seg[None]
        out[f"{side}_positions"] = np.where(seg > 0, segment_positions(seg[None])[0], 0).astype(np.int32)[None]
        if side == "encoder":
            out["encoder_inputs"] = ids[None]
        else:
            previous = np.concatenate([[pad_id], ids[:-1]])
            first = out["decoder_positions"][0] == 0  # each segment's start, and padding
            out["decoder_inputs"] = np.where(first, pad_id, previous).astype(np.int32)[None]
            out["targets"], out["weights"] = ids[None], (seg > 0).astype(np.float32)[None]
    return out


# --- sequence to sequence -------------------------------------------------------------------


def _pad(rows: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (already <= length) -> (int32 [B, length] padded, int32 [B, length] 1 on tokens)."""
    out = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return out, mask


def _truncate_with_eos(ids, length: int, eos_id: int | None) -> np.ndarray:
    ids = np.asarray(ids, np.int32).reshape(-1)
    if eos_id is None:
        return ids[:length]
    return np.concatenate([ids[: length - 1], np.array([eos_id], np.int32)])


def seq2seq(
    pairs: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]],
    *,
    inputs_length: int,
    targets_length: int,
    eos_id: int | None = 1,
    pad_id: int = 0,
    decoder_start_id: int = 0,
) -> Batch:
    """(input ids, target ids) pairs -> the encoder_decoder batch.

    Each side is cut to its length minus one and ends in ``eos_id`` (cut to its length when
    None), then padded with ``pad_id``. Returns int32 ``encoder_inputs`` / ``encoder_mask``
    [B, inputs_length]; ``decoder_inputs`` (targets shifted right after
    ``decoder_start_id``, T5 uses pad = 0), ``decoder_mask``, ``targets`` [B, targets_length];
    ``weights`` float32, 1 on real target tokens.
    """
    if not pairs:
        raise ValueError("seq2seq needs at least one (inputs, targets) pair")
    inputs = [_truncate_with_eos(i, inputs_length, eos_id) for i, _ in pairs]
    encoder_inputs, encoder_mask = _pad(inputs, inputs_length, pad_id)
    targets, weights = _pad([_truncate_with_eos(t, targets_length, eos_id) for _, t in pairs], targets_length, pad_id)
    decoder_inputs = np.concatenate([np.full((len(pairs), 1), decoder_start_id, np.int32), targets[:, :-1]], axis=1)
    decoder_mask = np.concatenate([np.ones((len(pairs), 1), np.int32), weights[:, :-1]], axis=1)
    return {
        "encoder_inputs": encoder_inputs,
        "encoder_mask": encoder_mask,
        "decoder_inputs": decoder_inputs,
        "decoder_mask": decoder_mask,
        "targets": targets,
        "weights": weights.astype(np.float32),
    }


# --- sequence classification ----------------------------------------------------------------


def classification(
    sequences: Sequence,
    labels: Sequence[int] | np.ndarray,
    *,
    seq_len: int,
    pad_id: int = 0,
    cls_id: int | None = None,
    sep_id: int | None = None,
) -> Batch:
    """Token sequences (or (a, b) pairs) and integer labels -> the classification batch.

    BERT layout ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (markers left out when their id
    is None); pairs are cut longest-first to fit ``seq_len``; ``token_types`` are 1 on
    ``b [SEP]``. Returns int32 ``inputs`` / ``attention_mask`` / ``token_types`` [B, seq_len],
    ``targets`` int32 [B] and ``weights`` float32 [B] of ones.
    """
    cls = [] if cls_id is None else [cls_id]
    sep = [] if sep_id is None else [sep_id]
    rows, types = [], []
    for item in sequences:
        is_pair = isinstance(item, tuple)
        a, b = (list(map(int, item[0])), list(map(int, item[1]))) if is_pair else (list(map(int, item)), [])
        room = seq_len - len(cls) - len(sep) * (2 if is_pair else 1)
        if room < (2 if is_pair else 0):
            raise ValueError(f"seq_len={seq_len} leaves no room for tokens after the [CLS]/[SEP] markers")
        while len(a) + len(b) > room:
            (a if len(a) >= len(b) else b).pop()
        first = cls + a + sep
        second = b + sep if is_pair else []
        rows.append(np.array(first + second, np.int32))
        types.append(np.array([0] * len(first) + [1] * len(second), np.int32))
    inputs, attention_mask = _pad(rows, seq_len, pad_id)
    token_types, _ = _pad(types, seq_len, 0)
    targets = np.asarray(labels, np.int32).reshape(-1)
    if len(targets) != len(rows):
        raise ValueError(f"{len(rows)} sequences but {len(targets)} labels")
    return {
        "inputs": inputs,
        "attention_mask": attention_mask,
        "token_types": token_types,
        "targets": targets,
        "weights": np.ones(len(rows), np.float32),
    }


# --- objectives over the packed text stream -------------------------------------------------


def raw_length(objective: str, seq_len: int, noise_density: float, mean_span: float) -> int:
    """Tokens per row the text pipeline must supply so the objective's inputs are ``seq_len`` long."""
    if objective == "span_corruption":
        return span_corruption_lengths(seq_len, noise_density, mean_span)[0]
    return seq_len + 1 if objective == "causal_lm" else seq_len


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """int[B, L] segment ids (contiguous runs) -> int32[B, L]: each token's offset from its run's start."""
    index = np.arange(segment_ids.shape[1])
    change = np.diff(segment_ids, axis=1, prepend=-1) != 0
    return (index - np.maximum.accumulate(np.where(change, index, 0), axis=1)).astype(np.int32)


def raw_rows(batch: Batch) -> tuple[np.ndarray, np.ndarray | None]:
    """A window batch (train/data/text.py ``split_batch``) -> its raw rows int32[B, T + 1] and, for
    windows with segments, their segment ids int32[B, T + 1] (the last token starts a new segment
    where the last target has weight 0); None without."""
    tokens = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)
    if "segment_ids" not in batch:
        return tokens, None
    segments = batch["segment_ids"]
    last = segments[:, -1:] + (batch["weights"][:, -1:] == 0)
    return tokens, np.concatenate([segments, last], axis=1).astype(np.int32)


def text_objective(
    objective: str,
    *,
    vocab_size: int,
    eos_id: int,
    mask_id: int,
    seed: int,
    rate: float,
    noise_density: float,
    mean_span: float,
):
    """``transform(windows, step, first_row) -> batch`` for a batch of windows of the token stream.

    ``windows``: ``split_batch``'s dict of [local_B, raw_length - 1] arrays; ``first_row`` is the
    global index of its first row. Random choices are seeded by (seed, step, global row), so a
    global batch does not depend on how many processes share it, and resuming at a step
    reproduces it. Windows with segments keep their documents apart: causal LM as they come, masked
    LM masks each document alone (its batch adds ``segment_ids`` and ``positions``), span corruption
    corrupts each document alone into one packed seq2seq row (``packed_span_corruption``); without
    segments span corruption corrupts whole rows, documents together (as T5's unpacked rows).
    """

    def per_row(fn, windows, step, first_row):
        rows, segments = raw_rows(windows)
        parts = [
            fn(rows[i : i + 1], None if segments is None else segments[i : i + 1], (seed, step, first_row + i))
            for i in range(len(rows))
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def masked(row, segments, s):
        batch = masked_lm(
            row, mask_id=mask_id, vocab_size=vocab_size, seed=s, rate=rate, special_ids=(eos_id,), segment_ids=segments
        )
        if segments is None:
            return batch
        return batch | {"segment_ids": segments, "positions": segment_positions(segments)}

    def corrupted(row, segments, s):
        kwargs = {"vocab_size": vocab_size, "seed": s, "noise_density": noise_density, "mean_span": mean_span}
        if segments is None:
            return span_corruption(row, eos_id=eos_id, **kwargs)
        return packed_span_corruption(row, segments, eos_id=eos_id, **kwargs)

    if objective == "causal_lm":
        return lambda windows, step, first_row: windows
    fn = masked if objective == "masked_lm" else corrupted
    return lambda windows, step, first_row: per_row(fn, windows, step, first_row)
