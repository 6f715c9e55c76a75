"""Examples for classification and seq2seq: JSONL rows -> split, labelled, tokenised arrays.

    train_rows, val_rows = split_rows(cfg.data)           # one Row per non-blank JSONL line
    labels = label_names(train_rows + val_rows, cfg.data)  # ['comedy', 'history', 'tragedy']
    arrays = classification_arrays(train_rows, cfg.data, labels, tokenizer, seq_len=128)
    # {'inputs', 'attention_mask', 'token_types': int32[N, 128], 'targets': int32[N], 'weights': float32[N]}

The validation rows are ``data.val_files`` when set, else whole groups of rows sharing
``data.group_field`` (``data.val_fraction`` of the groups), else ``data.val_fraction`` of the
rows; both picked by a hash of the group or ``file:line`` name, so the split is the same on
every run. Every data error names the file and line and how to fix it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from train import objectives
from train.config import ConfigError, DataConfig, split_labels
from train.data import Row, held_out, match_files, read_rows
from train.tokenizer import Tokenizer

Arrays = dict[str, np.ndarray]  # every array has the examples on its leading axis


def field(row: Row, name: str, key: str, kinds: tuple[type, ...] = (str,)) -> str | int:
    """``row.record[name]``, which must be one of ``kinds``; ``key`` is the config field naming it."""
    if name not in row.record:
        raise ConfigError(f"{row.where} has no field '{name}'; add it or set {key} to the field to read")
    value = row.record[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = " or ".join({str: "a string", int: "an integer"}[k] for k in kinds)
        raise ConfigError(f"{row.where} field '{name}' is {type(value).__name__}, not {wanted}; fix that line")
    return value


def split_rows(cfg: DataConfig) -> tuple[list[Row], list[Row]]:
    """(training rows, validation rows) as the module docstring describes; neither is empty."""
    train_paths = match_files(cfg.train_files, "data.train_files")
    if cfg.val_files:
        val_paths = match_files(cfg.val_files, "data.val_files")
        held = {os.path.realpath(p) for p in val_paths}
        train_paths = [p for p in train_paths if os.path.realpath(p) not in held]
        train, val = read_rows(train_paths), read_rows(val_paths)
    else:
        rows = read_rows(train_paths)
        if cfg.group_field:
            keys = [str(field(r, cfg.group_field, "data.group_field", (str, int))) for r in rows]
            groups = sorted(set(keys))
            held = {groups[i] for i in held_out(groups, cfg.val_fraction)}
        else:
            keys = [r.name for r in rows]
            held = {keys[i] for i in held_out(keys, cfg.val_fraction)}
        train = [r for r, k in zip(rows, keys) if k not in held]
        val = [r for r, k in zip(rows, keys) if k in held]
    if not train:
        raise ConfigError(f"data.train_files='{cfg.train_files}' leaves no training examples; point it at JSONL rows")
    if not val:
        raise ConfigError(
            f"data.train_files='{cfg.train_files}' leaves no validation examples; set data.val_files, "
            "or a data.val_fraction that holds out at least one row (or group)"
        )
    return train, val


# --- labels ---------------------------------------------------------------------------------


def label_names(rows: Sequence[Row], cfg: DataConfig) -> list[str]:
    """Label names in id order: ``data.labels`` when set, else the sorted labels of ``rows``
    (numerically when all are integers)."""
    given = split_labels(cfg.labels)
    if given:
        if len(set(given)) != len(given):
            raise ConfigError(f"data.labels='{cfg.labels}' names a label twice; list each label once")
        return given
    distinct = {field(r, cfg.label_field, "data.label_field", (str, int)) for r in rows}
    numeric = all(isinstance(v, int) for v in distinct)
    names = [str(v) for v in sorted(distinct, key=lambda v: v if numeric else str(v))]
    for name in names:
        if "," in name or name != name.strip():
            raise ConfigError(
                f"label '{name}' has a comma or surrounding spaces; data.labels cannot name it, rename it"
            )
    if len(names) < 2:
        raise ConfigError(f"every row has the label '{names[0]}'; classification needs at least two labels")
    return names


# --- tokens ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Markers:
    """The ids that frame an example: [CLS] and [SEP] around classification text, [PAD] after
    it, eos at the end of each seq2seq side (T5 starts the decoder with pad)."""

    cls: int
    sep: int
    pad: int
    eos: int

    @property
    def vocab_needed(self) -> int:
        return max(self.cls, self.sep, self.pad, self.eos) + 1


def markers(tokenizer: Tokenizer) -> Markers:
    """The tokenizer's own [CLS]/[SEP]/[PAD]; ones it lacks take ids past its vocabulary V:
    [CLS] = V + 1, [PAD] = V + 2 (V is masked_lm's [MASK]); a missing [SEP] is eos.
    The byte tokenizer (V = 257) gets [CLS] 258, [SEP] 256, [PAD] 259."""
    v = tokenizer.vocab_size
    return Markers(
        cls=v + 1 if tokenizer.cls_id is None else tokenizer.cls_id,
        sep=tokenizer.eos_id if tokenizer.sep_id is None else tokenizer.sep_id,
        pad=v + 2 if tokenizer.pad_id is None else tokenizer.pad_id,
        eos=tokenizer.eos_id,
    )


def classification_arrays(
    rows: Sequence[Row], cfg: DataConfig, labels: Sequence[str], tokenizer: Tokenizer, seq_len: int
) -> Arrays:
    """``[CLS] text [SEP]`` per row, cut and padded to ``seq_len``, with the id of its label in ``labels``.

    Returns ``inputs`` / ``attention_mask`` / ``token_types`` int32 [N, seq_len], ``targets``
    int32 [N] and ``weights`` float32 [N] (ones).
    """
    ids = {name: i for i, name in enumerate(labels)}
    texts = [field(r, cfg.text_field, "data.text_field") for r in rows]
    targets = []
    for row in rows:
        label = str(field(row, cfg.label_field, "data.label_field", (str, int)))
        if label not in ids:
            raise ConfigError(
                f"{row.where} has label '{label}', which is not in data.labels ({', '.join(labels)}); "
                "add it to data.labels or fix that line"
            )
        targets.append(ids[label])
    m = markers(tokenizer)
    tokens = [t[:seq_len] for t in tokenizer.encode_batch(texts)]
    return objectives.classification(tokens, targets, seq_len=seq_len, pad_id=m.pad, cls_id=m.cls, sep_id=m.sep)


def seq2seq_arrays(rows: Sequence[Row], cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, target_len: int) -> Arrays:
    """Input and target text per row, each cut to its length with eos last, then padded.

    Returns ``encoder_inputs`` / ``encoder_mask`` int32 [N, seq_len], ``decoder_inputs`` /
    ``decoder_mask`` / ``targets`` int32 [N, target_len], ``weights`` float32 [N, target_len].
    """
    inputs = tokenizer.encode_batch([field(r, cfg.input_field, "data.input_field") for r in rows])
    targets = tokenizer.encode_batch([field(r, cfg.target_field, "data.target_field") for r in rows])
    m = markers(tokenizer)
    return objectives.seq2seq(
        list(zip(inputs, targets)),
        inputs_length=seq_len,
        targets_length=target_len,
        eos_id=m.eos,
        pad_id=m.pad,
        decoder_start_id=m.pad,
    )
