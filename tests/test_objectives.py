"""Objectives: BERT masking, T5 span corruption, seq2seq and classification batches."""

from __future__ import annotations

import numpy as np
import pytest

from train.data.objectives import (
    classification,
    masked_lm,
    random_spans_noise_mask,
    seq2seq,
    span_corruption,
    span_corruption_lengths,
)

VOCAB, MASK, PAD, CLS, SEP = 1000, 103, 0, 101, 102


# --- masked LM ------------------------------------------------------------------------------


def test_masked_lm_chooses_15_percent_of_each_row_and_weights_only_those():
    tokens = 200 + np.arange(8 * 100).reshape(8, 100) % 700
    batch = masked_lm(tokens, mask_id=MASK, vocab_size=VOCAB, seed=0)
    assert set(batch) == {"inputs", "attention_mask", "targets", "weights"}
    np.testing.assert_array_equal(batch["targets"], tokens)
    assert (batch["weights"].sum(axis=1) == 15).all()
    changed = batch["inputs"] != tokens
    assert not (changed & (batch["weights"] == 0)).any()  # only chosen positions change
    assert batch["attention_mask"].all()
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32


def test_masked_lm_replaces_80_percent_with_mask_10_random_10_unchanged():
    tokens = 200 + np.arange(64 * 500).reshape(64, 500) % 700
    batch = masked_lm(tokens, mask_id=MASK, vocab_size=VOCAB, seed=1)
    chosen = batch["weights"] == 1
    n = chosen.sum()
    assert n == 64 * 75
    masked = (batch["inputs"] == MASK) & chosen
    kept = (batch["inputs"] == tokens) & chosen
    randomised = chosen & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.015  # a random id can equal the original: ~0.1% extra
    assert abs(randomised.sum() / n - 0.1) < 0.015
    assert ((batch["inputs"][randomised] >= 0) & (batch["inputs"][randomised] < VOCAB)).all()


def test_masked_lm_never_chooses_padding_or_special_tokens():
    tokens = 200 + np.arange(4 * 40).reshape(4, 40)
    tokens[:, 0], tokens[:, 20] = CLS, SEP
    tokens[1, 30:] = PAD
    batch = masked_lm(tokens, mask_id=MASK, vocab_size=VOCAB, seed=2, special_ids=[CLS, SEP], pad_id=PAD)
    chosen = batch["weights"] == 1
    assert not chosen[:, [0, 20]].any() and not chosen[1, 30:].any()
    np.testing.assert_array_equal(batch["attention_mask"][1], [1] * 30 + [0] * 10)
    np.testing.assert_array_equal(chosen.sum(axis=1), [6, 4, 6, 6])  # round(0.15 * 38), round(0.15 * 28)


def test_masked_lm_is_a_pure_function_of_the_seed():
    tokens = 200 + np.arange(4 * 64).reshape(4, 64)
    a = masked_lm(tokens, mask_id=MASK, vocab_size=VOCAB, seed=(7, 3))
    b = masked_lm(tokens, mask_id=MASK, vocab_size=VOCAB, seed=(7, 3))
    c = masked_lm(tokens, mask_id=MASK, vocab_size=VOCAB, seed=(7, 4))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["weights"], c["weights"])


# --- span corruption ------------------------------------------------------------------------


def test_span_lengths_match_t5_for_512_inputs():
    assert span_corruption_lengths(512) == (568, 114)
    assert span_corruption_lengths(128) == (141, 29)


def test_noise_mask_has_t5_counts_and_starts_with_non_noise():
    rng = np.random.default_rng(0)
    for length in (20, 100, 568):
        mask = random_spans_noise_mask(length, rng)
        noise = round(length * 0.15)
        spans = max(round(noise / 3), 1)
        assert mask.sum() == noise and not mask[0] and mask[-1]
        assert (np.diff(mask.astype(int)) == 1).sum() == spans  # number of noise spans


def test_span_corruption_hides_spans_behind_descending_sentinels_and_reconstructs():
    raw, targets_length = span_corruption_lengths(64)
    tokens = 2 + np.arange(4 * raw).reshape(4, raw) % 200
    batch = span_corruption(tokens, vocab_size=VOCAB, seed=0, eos_id=1)
    assert batch["encoder_inputs"].shape == (4, 64) and batch["targets"].shape == (4, targets_length)
    assert batch["encoder_mask"].all() and batch["weights"].all()
    for row, inputs, targets in zip(tokens, batch["encoder_inputs"], batch["targets"]):
        assert inputs[-1] == 1 and targets[-1] == 1
        sentinels = inputs[inputs >= VOCAB - 100]
        np.testing.assert_array_equal(sentinels, VOCAB - 1 - np.arange(len(sentinels)))
        np.testing.assert_array_equal(targets[targets >= VOCAB - 100], sentinels)
        # Replacing each sentinel of the inputs by its span from the targets restores the row.
        spans = np.split(targets[:-1], np.flatnonzero(targets[:-1] >= VOCAB - 100)[1:])
        restored = []
        for token in inputs[:-1]:
            restored.extend(spans.pop(0)[1:] if token >= VOCAB - 100 else [token])
        np.testing.assert_array_equal(restored, row)
    np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
    assert (batch["decoder_inputs"][:, 0] == 0).all()


def test_span_corruption_is_a_pure_function_of_the_seed():
    tokens = 2 + np.arange(2 * 142).reshape(2, 142)
    a, b = (span_corruption(tokens, vocab_size=VOCAB, seed=(5, 9)) for _ in range(2))
    c = span_corruption(tokens, vocab_size=VOCAB, seed=(5, 10))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["encoder_inputs"], c["encoder_inputs"])


# --- seq2seq and classification -------------------------------------------------------------


def test_seq2seq_truncates_appends_eos_pads_and_shifts_right():
    pairs = [([5, 6, 7, 8, 9], [10, 11]), ([5], [12, 13, 14, 15, 16])]
    batch = seq2seq(pairs, inputs_length=4, targets_length=4, eos_id=1)
    np.testing.assert_array_equal(batch["encoder_inputs"], [[5, 6, 7, 1], [5, 1, 0, 0]])
    np.testing.assert_array_equal(batch["encoder_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[10, 11, 1, 0], [12, 13, 14, 1]])
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["decoder_inputs"], [[0, 10, 11, 1], [0, 12, 13, 14]])
    np.testing.assert_array_equal(batch["decoder_mask"], [[1, 1, 1, 1], [1, 1, 1, 1]])


def test_classification_lays_out_cls_sep_pairs_and_token_types():
    sequences = [[5, 6, 7, 8, 9, 10, 11], ([5, 6, 7, 8], [9, 10])]
    batch = classification(sequences, [2, 0], seq_len=8, cls_id=CLS, sep_id=SEP)
    np.testing.assert_array_equal(batch["inputs"], [[CLS, 5, 6, 7, 8, 9, 10, SEP], [CLS, 5, 6, 7, SEP, 9, 10, SEP]])
    np.testing.assert_array_equal(batch["token_types"], [[0] * 8, [0, 0, 0, 0, 0, 1, 1, 1]])
    assert batch["attention_mask"].all()
    np.testing.assert_array_equal(batch["targets"], [2, 0])
    np.testing.assert_array_equal(batch["weights"], [1, 1])
    with pytest.raises(ValueError, match="labels"):
        classification([[5]], [0, 1], seq_len=8)
