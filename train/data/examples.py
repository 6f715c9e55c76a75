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

from collections.abc import Callable, Sequence

import grain
import numpy as np

from train.config.sections import ConfigError, DataConfig
from train.config.validate import split_labels
from train.data import objectives
from train.data import packing as packer
from train.data.files import Row, read_rows
from train.data.pipeline import batch_iterator
from train.data.split import require_test_split, split_data
from train.data.tfds_source import StreamBatches
from train.data.tokenizer import Tokenizer, markers

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


def _row_name(cfg: DataConfig):
    """The name that decides a row's split: its ``data.group_field`` value, else ``file:line``."""
    if cfg.group_field:
        return lambda r: str(field(r, cfg.group_field, "data.group_field", (str, int)))
    return lambda r: r.name


def reader(cfg: DataConfig):
    """``read(paths) -> rows``: JSONL lines, or with ``data.format=conll`` CoNLL sentences (train/data/conll.py)."""
    if cfg.format == "conll":
        from train.data.conll import read_sentences

        return lambda paths: read_sentences(paths, cfg)
    return read_rows


def split_rows(cfg: DataConfig) -> tuple[list[Row], list[Row]]:
    """(training rows, validation rows) as the module docstring describes; neither is empty, and
    neither holds a test row."""
    train, val, _ = split_data(cfg, reader(cfg), _row_name(cfg))
    if not train:
        raise ConfigError(f"data.train_files='{cfg.train_files}' leaves no training examples; point it at JSONL rows")
    if not val:
        raise ConfigError(
            f"data.train_files='{cfg.train_files}' leaves no validation examples; set data.val_files, "
            "or a data.val_fraction that holds out at least one row (or group)"
        )
    return train, val


def test_rows(cfg: DataConfig) -> list[Row]:
    """The test rows (``data.test_files`` or ``data.test_fraction``), which training never reads."""
    require_test_split(cfg)
    test = split_data(cfg, reader(cfg), _row_name(cfg))[2]
    if not test:
        raise ConfigError("the test split holds no example; raise data.test_fraction or fix data.test_files")
    return test


# --- labels ---------------------------------------------------------------------------------


def label_names(rows: Sequence[Row], cfg: DataConfig, tagged: bool = False) -> list[str]:
    """Label names in id order: ``data.labels`` when set, else the sorted labels of ``rows``
    (numerically when all are integers); ``tagged``: the tags of token_classification rows."""
    given = split_labels(cfg.labels)
    if given:
        if len(set(given)) != len(given):
            raise ConfigError(f"data.labels='{cfg.labels}' names a label twice; list each label once")
        return given
    if tagged:
        from train.data.tagging import tag_names

        distinct = set(tag_names(rows, cfg))
    else:
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


def conll_run_labels(train: Sequence[Row], val: Sequence[Row], cfg: DataConfig) -> list[str]:
    """The run's labels: ``data.labels``, else the training sentences' (``conll_labels``); every tag of
    ``train`` and ``val`` checked against them."""
    from train.data.conll import check_tags, conll_labels

    labels = label_names(train, cfg) if cfg.labels else conll_labels(train, cfg.tags_field)
    check_tags([*train, *val], labels, cfg.tags_field)
    return labels


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


# --- batches --------------------------------------------------------------------------------


class ArrayRows:
    """A grain data source over arrays sharing a leading example axis: ``rows[i]`` is ``{k: v[i]}``."""

    def __init__(self, arrays: Arrays):
        self.arrays = arrays
        self._len = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.arrays.items()}


def example_iterator(
    arrays: Arrays,
    batch_size: int,
    seed: int,
    shuffle: bool,
    process_index: int = 0,
    process_count: int = 1,
    per_example: Callable[[int, int], dict] | None = None,
    packing: bool = False,
) -> grain.DatasetIterator:
    """Endless iterator of this process's rows of each global batch of examples.

    Yields ``{k: v[rows]}`` with ``batch_size // process_count`` rows: rows ``[p*local,
    (p+1)*local)`` of global batch ``s``, which holds examples ``s*batch_size ... + batch_size - 1``
    of the endless, per-epoch reshuffled example order (``pipeline.batch_iterator``'s rows).
    With ``packing`` each row holds whole examples (train/data/packing.py): process ``p`` packs
    examples ``p, p + P, ...`` of the shuffled order, so batches depend on ``P``, and the state
    (``tfds_source.StreamBatches``: every process's) resumes with the same process count.
    ``get_state`` / ``set_state`` resume exactly. ``per_example(epoch, i)``, when given, makes
    example ``i``'s row afresh each time it is read (augmentation, train/data/augment.py).
    """
    source = ArrayRows(arrays)
    if len(source) < batch_size:
        raise ConfigError(
            f"the training data holds {len(source)} examples, fewer than train.batch_size={batch_size}; "
            "lower train.batch_size or add data"
        )
    n = len(source)
    per_position = None
    if per_example is None:
        ds = grain.MapDataset.source(packer.example_records(arrays) if packing else source)
    else:  # example i of epoch e, made afresh; packed: unpadded as packer.example_records makes them
        ds = grain.MapDataset.range(n)
        per_epoch = len(range(process_index, n, process_count)) if packing else n  # packing shards the order
        made = lambda e, i: per_example(e, int(i))
        if packing:
            made = lambda e, i: packer.example_records({k: v[None] for k, v in per_example(e, int(i)).items()})[0]
        per_position = lambda k, i: made(k // per_epoch, i)
    bins = packer.BINS_PER_ROW * batch_size // process_count
    pack = packer.first_fit(packer.Layout.of(arrays), bins, seed, shuffle) if packing else None
    batches = batch_iterator(
        ds,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        process_index=process_index,
        process_count=process_count,
        per_position=per_position,
        pack=pack,
    )
    # each process packs its own shard: the state to resume from is every process's
    return StreamBatches(batches, process_index, process_count) if packing else batches


def padded_batches(arrays: Arrays, batch_size: int) -> list[dict]:
    """Every example once, in order, in global batches of ``batch_size``; the last batch is filled
    up with copies of example 0 whose ``weights`` are 0, so they change no loss or score."""
    n = len(arrays["targets"])
    order = np.concatenate([np.arange(n), np.zeros(-n % batch_size, np.int64)])
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v[rows] for k, v in arrays.items()}
        valid = np.arange(start, start + batch_size) < n  # [B]
        weights = batch["weights"]  # [B] or [B, T]
        batch["weights"] = np.where(valid.reshape(-1, *(1,) * (weights.ndim - 1)), weights, 0).astype(weights.dtype)
        out.append(batch)
    return out
