"""Packing examples into full rows with segment ids (grain's first-fit packer), and back.

    records = example_records(arrays)                    # one dict of unpadded int arrays per example
    layout = Layout.of(arrays)                           # which keys pack on which side, at what length
    it = batch_iterator(records, B, ..., pack=first_fit(layout, bins=BINS_PER_ROW * B // P, seed=seed))
    batches, unpack = eval_batches(arrays, B)            # every example once, rows of whole examples
    predicted = unpack(predictions)                      # per example, as the padded eval gives them

``arrays`` are the padded example arrays of train/data/examples.py and tagging.py, one example a
row. A packed row holds whole examples one after another, each as it is alone (its [CLS] ...
[SEP], token types, targets, weights), numbered by ``segment_ids`` 1, 2, ... (0 = padding) with
``positions`` restarting at 0, as the models take them (models/attention.py masks attention to
the segment). Per objective the row carries (T = seq_len, S / T' the seq2seq lengths, K slots):

- token classification: ``inputs``, ``token_types``, ``segment_ids``, ``positions``, ``targets``,
  ``weights`` [T];
- causal (sft, train/data/chat.py): the same without ``token_types``;
- classification: the same [T] without per-token targets, and ``pool_positions`` [K] (each
  segment's first token, its [CLS]), ``targets`` [K], ``weights`` [K] (0 on unused slots);
- seq2seq: ``encoder_inputs`` / ``encoder_segment_ids`` / ``encoder_positions`` [S] and
  ``decoder_inputs`` (shifted right within each example) / ``decoder_segment_ids`` /
  ``decoder_positions`` / ``targets`` / ``weights`` [T'], an example's ids equal on both sides.

Weights stay each example's own, so a packed batch's summed loss and weight are the sums of its
examples' alone: the loss (sum / weight) is the one an unpacked batch of the same examples has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import grain
import numpy as np

Arrays = dict[str, np.ndarray]
EXAMPLE = "example"  # eval records: the example's index, on the side whose predictions come back
# Rows open at once, per row of a batch. grain's first-fit emits all open rows when an example
# fits none, so more rows fill each better (speakers, seq_len 96: 30.3% padding with 1x, 30.1% with 4x).
BINS_PER_ROW = 4


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one objective's examples pack: ``lengths`` of every packed key; ``segments`` the key
    whose segment ids / positions each side uses; ``slots`` > 0 for classification (K)."""

    kind: str  # 'tagging' | 'causal' | 'classification' | 'seq2seq'
    lengths: dict[str, int]
    slots: int = 0

    @staticmethod
    def of(arrays: Arrays, slots: int = 0) -> Layout:
        """The layout of padded ``arrays``; classification packs at most ``slots`` examples a row
        (default: as many as the shortest example allows)."""
        if "encoder_inputs" in arrays:
            s, t = arrays["encoder_inputs"].shape[1], arrays["targets"].shape[1]
            keys = {"encoder_inputs": s, "decoder_inputs": t, "targets": t, "weights": t}
            return Layout("seq2seq", keys)
        t = arrays["inputs"].shape[1]
        keys = {"inputs": t, "token_types": t, "targets": t, "weights": t}
        if "token_types" not in arrays:  # a decoder's examples (sft)
            return Layout("causal", {k: t for k in ("inputs", "targets", "weights")})
        if arrays["targets"].ndim == 2:
            return Layout("tagging", keys)
        shortest = int(arrays["attention_mask"].sum(axis=1).min(initial=t))
        return Layout("classification", keys, slots or max(1, t // max(shortest, 1)))

    @property
    def target_side(self) -> str:
        """The packed key whose length the predictions (and ``EXAMPLE``) have."""
        return "inputs" if self.kind != "seq2seq" else "targets"

    def row(self, packed: dict, keep_example: bool = False) -> Arrays:
        """grain's packed dict -> the model's batch row (module docstring)."""
        if self.kind == "seq2seq":
            out = {
                "encoder_inputs": packed["encoder_inputs"],
                "encoder_segment_ids": packed["encoder_inputs_segment_ids"],
                "encoder_positions": packed["encoder_inputs_positions"],
                "decoder_inputs": packed["decoder_inputs"],
                "decoder_segment_ids": packed["targets_segment_ids"],
                "decoder_positions": packed["targets_positions"],
                "targets": packed["targets"],
                "weights": packed["weights"],
            }
        else:
            segments, positions = packed["inputs_segment_ids"], packed["inputs_positions"]
            out = {k: packed[k] for k in ("inputs", "token_types") if k in packed}
            out |= {"segment_ids": segments, "positions": positions}
            if self.kind in ("tagging", "causal"):
                out |= {"targets": packed["targets"], "weights": packed["weights"]}
            else:
                starts = np.flatnonzero((positions == 0) & (segments > 0))  # each segment's [CLS], in row order
                pool = np.zeros(self.slots, np.int32)
                pool[: len(starts)] = starts
                used = np.arange(self.slots) < len(starts)
                out |= {
                    "pool_positions": pool,
                    "targets": np.where(used, packed["targets"][pool], 0).astype(np.int32),
                    "weights": np.where(used, packed["weights"][pool], 0).astype(np.float32),
                }
                if keep_example:
                    out[EXAMPLE] = np.where(used, packed[EXAMPLE][pool], -1).astype(np.int32)
                    return out
        if keep_example:
            segments = out["decoder_segment_ids"] if self.kind == "seq2seq" else out["segment_ids"]
            out[EXAMPLE] = np.where(segments > 0, packed[EXAMPLE], -1).astype(np.int32)
        return out


def example_records(arrays: Arrays, with_example: bool = False) -> list[Arrays]:
    """Padded example arrays -> one dict per example of its unpadded sequences (classification: the
    label and weight at the [CLS] token, 0 elsewhere); ``with_example`` adds its index (``EXAMPLE``)."""
    out = []
    if "encoder_inputs" in arrays:
        sources = arrays["encoder_mask"].sum(axis=1)
        targets = (arrays["weights"] > 0).sum(axis=1)
        for i, (s, t) in enumerate(zip(sources, targets)):
            record = {"encoder_inputs": arrays["encoder_inputs"][i, :s]}
            record |= {k: arrays[k][i, :t] for k in ("decoder_inputs", "targets", "weights")}
            out.append(record | ({EXAMPLE: np.full(t, i, np.int32)} if with_example else {}))
        return out
    lengths = arrays["attention_mask"].sum(axis=1)
    for i, n in enumerate(lengths):
        record = {k: arrays[k][i, :n] for k in ("inputs", "token_types") if k in arrays}
        if arrays["targets"].ndim == 2:
            record |= {k: arrays[k][i, :n] for k in ("targets", "weights")}
        else:
            record["targets"] = np.zeros(n, np.int32)
            record["weights"] = np.zeros(n, np.float32)
            record["targets"][0], record["weights"][0] = arrays["targets"][i], arrays["weights"][i]
        out.append(record | ({EXAMPLE: np.full(n, i, np.int32)} if with_example else {}))
    return out


def first_fit(
    layout: Layout, bins: int, seed: int = 0, shuffle: bool = True, keep_example: bool = False
) -> Callable[[grain.IterDataset], grain.IterDataset]:
    """Records -> model rows (``Layout.row``), placed first-fit into ``bins`` open rows at a time
    (grain's ``FirstFitPackIterDataset``; the rows of one round are shuffled by ``seed``)."""
    lengths = dict(layout.lengths) | ({EXAMPLE: layout.lengths[layout.target_side]} if keep_example else {})

    def pack(records: grain.IterDataset) -> grain.IterDataset:
        packed = grain.experimental.FirstFitPackIterDataset(
            records, length_struct=lengths, num_packing_bins=bins, seed=seed % 2**32, shuffle_bins=shuffle,
            max_sequences_per_bin=layout.slots or None,
        )  # fmt: skip
        return packed.map(lambda p: layout.row(p, keep_example))

    return pack


def eval_batches(arrays: Arrays, batch_size: int) -> tuple[list[Arrays], Callable[[Sequence[np.ndarray]], np.ndarray]]:
    """Every example of ``arrays`` once, packed in order into global batches of ``batch_size`` rows
    (the last filled with empty rows of weight 0), and ``unpack(predictions) -> per example``:
    ``predictions`` (one int array per batch, [B, T] or classification [B, K]) -> int32 [N, T] /
    [N], each example's predictions where the unpacked eval puts them (0 past its end)."""
    layout = Layout.of(arrays)
    records = grain.MapDataset.source(example_records(arrays, with_example=True)).to_iter_dataset()
    rows = list(first_fit(layout, BINS_PER_ROW * batch_size, shuffle=False, keep_example=True)(records))
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()} | {EXAMPLE: np.full_like(rows[0][EXAMPLE], -1)}
    rows += [empty] * (-len(rows) % batch_size)
    batches = [{k: np.stack([r[k] for r in rows[b : b + batch_size]]) for k in rows[0]} for b in range(0, len(rows), batch_size)]
    owners = np.concatenate([b.pop(EXAMPLE) for b in batches])  # [R, T] or [R, K]: example of each prediction
    target = arrays["targets"]
    where = None
    if layout.kind != "classification":
        key = "decoder_positions" if layout.kind == "seq2seq" else "positions"
        where = np.concatenate([b[key] for b in batches])

    def unpack(predictions: Sequence[np.ndarray]) -> np.ndarray:
        predicted = np.concatenate(predictions)
        out = np.zeros(target.shape, np.int32)
        mine = owners >= 0
        if where is None:
            out[owners[mine]] = predicted[mine]
        else:
            out[owners[mine], where[mine]] = predicted[mine]
        return out

    return batches, unpack


def padding_fraction(batches: Sequence[Arrays]) -> float:
    """Fraction of the token positions computed that are padding: of every ``*segment_ids`` key of
    packed batches; of ``attention_mask`` / ``encoder_mask`` and the real targets of padded ones;
    none of text windows without either (every token real)."""
    real = total = 0
    for batch in batches:
        keys = [k for k in batch if k.endswith("segment_ids")]
        if not keys:
            keys = [k for k in ("attention_mask", "encoder_mask") if k in batch]
            keys += ["weights"] if "encoder_mask" in batch else []
        if not keys:
            real, total = real + batch["inputs"].size, total + batch["inputs"].size
        for key in keys:
            real, total = real + int((batch[key] > 0).sum()), total + batch[key].size
    return 1.0 - real / max(total, 1)
