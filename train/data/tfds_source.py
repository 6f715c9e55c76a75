"""TFDS datasets by name -> streamed, packed, resumable per-process batches.

    corpus = open_tfds(cfg.data)  # checks the name, data_dir, splits and text feature now
    it = corpus.train_iterator(tokenizer, seq_len, global_batch, seed, shuffle, process_index, process_count)
    batch = next(it)  # {'inputs': int32[B // P, T], 'targets': int32[B // P, T]}, targets = inputs shifted by 1
    val = corpus.val_tokens(tokenizer, seq_len, batch_size, max_batches)  # PackedTokens of the first val documents

Nothing is held in memory but the records in flight, so this reads c4-sized splits. Per process:
records of the split (``tfds.data_source``: array_record, random access, no TensorFlow; or
``tfds.load`` through tf.data with ``data.tfds_reader=tf_data``, see ``train/data/tfds_tf.py``)
-> this process's shard (records p, p + P, ...; tf_data: the p-th of P even parts) -> shuffled by
seed, anew each epoch -> repeated
-> text tokenised, ``eos_id`` appended -> concatenated and cut into windows of ``seq_len + 1``
tokens (grain's ``ConcatThenSplitIterDataset``, whose segment ids and positions keep documents
apart with ``data.packing``) -> batches of this process's rows.

Windows do not overlap (a window's first token is context only). Each process packs its own
shard, as MaxText does: process p's batch s is a pure function of (seed, s, p, P), so the global
batch depends on the process count P (the text path, which packs the whole corpus in memory,
does not). ``it.get_state()`` gathers every process's packing position (a few ints each) into
one JSON-serialisable dict, so a run resumes exactly, with the process count it was saved with.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from train.config.sections import ConfigError, DataConfig
from train.data.pipeline import batch_iterator, concat_then_split
from train.data.text import Batch, PackedTokens, split_batch
from train.data.tokenizer import Tokenizer

BUILD_HINT = (
    "prepare it there (tfds build NAME --data_dir=DIR --file_format=array_record, online; or python -m "
    "train.tfds_build from local text) or point data.tfds_data_dir at a directory that holds it"
)
GCS_HINT = (
    "mount the bucket with gcsfuse and point data.tfds_data_dir at the mount, or set data.tfds_reader=tf_data "
    "(pip install -e '.[tf]'), which reads gs:// itself"
)
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)  # records read and tokenised ahead


def default_data_dir() -> str:
    """Where TFDS looks when ``data.tfds_data_dir`` is empty ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    from tensorflow_datasets.core import constants

    return constants.get_default_data_dir()


def open_tfds(cfg: DataConfig) -> TfdsCorpus:
    """Finds the prepared dataset ``cfg.tfds_name`` under ``cfg.tfds_data_dir``; reads no records.

    Raises ConfigError naming the data_dir searched when the dataset is not there, and the
    available splits / text features when a split or ``cfg.text_field`` is not.
    """
    if cfg.tfds_reader == "tf_data" and importlib.util.find_spec("tensorflow") is None:
        raise ConfigError("data.tfds_reader=tf_data needs TensorFlow; pip install -e '.[tf]' or use data_source")
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    data_dir = os.path.expanduser(cfg.tfds_data_dir) or default_data_dir()
    where = f"TFDS dataset '{cfg.tfds_name}' is not prepared under data.tfds_data_dir='{data_dir}'"
    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ConfigError(f"{where} (no {data_dir}/{cfg.tfds_name.replace(':', '/')}); {BUILD_HINT}") from None
    except ImportError as e:
        if not data_dir.startswith("gs://"):
            raise
        raise ConfigError(f"data.tfds_data_dir='{data_dir}' cannot be read without {e.name}; {GCS_HINT}") from None
    except (ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.tfds_name='{cfg.tfds_name}' cannot be opened ({first}); {BUILD_HINT}") from None
    if not builder.is_prepared():
        raise ConfigError(f"{where} (no {builder.data_dir}/dataset_info.json); {BUILD_HINT}")
    info = builder.info
    for key in ("tfds_train_split", "tfds_val_split"):
        split = getattr(cfg, key)
        try:
            size = info.splits[split].num_examples
        except (KeyError, ValueError):
            raise ConfigError(
                f"data.{key}='{split}' is not a split of '{cfg.tfds_name}'; it has {', '.join(info.splits)}"
            ) from None
        if size == 0:
            raise ConfigError(f"data.{key}='{split}' of '{cfg.tfds_name}' holds no records; choose another split")
    texts = [k for k, f in info.features.items() if isinstance(f, tfds.features.Text)]
    if cfg.text_field not in texts:
        raise ConfigError(
            f"data.text_field='{cfg.text_field}' is not a text feature of '{cfg.tfds_name}'; "
            f"its text features are: {', '.join(texts) or 'none'}"
        )
    if cfg.tfds_reader == "data_source":
        random_access = info.available_file_formats() & tfds.core.FileFormat.with_random_access()
        if not random_access:
            raise ConfigError(
                f"TFDS dataset '{cfg.tfds_name}' under '{data_dir}' is stored as {info.file_format.value}, which "
                "tfds.data_source cannot read; set data.tfds_reader=tf_data (pip install -e '.[tf]') or convert it "
                f"with tfds convert_format --dataset_version_dir={builder.data_dir} --out_file_format=array_record "
                "(needs tensorflow and apache-beam)"
            )
    return TfdsCorpus(cfg, builder)


@dataclasses.dataclass
class TfdsCorpus:
    """A prepared TFDS dataset: ``builder.info`` says its splits, sizes and features."""

    cfg: DataConfig
    builder: Any  # tfds.core.DatasetBuilder

    def num_records(self, split: str) -> int:
        return self.builder.info.splits[split].num_examples

    def train_iterator(
        self,
        tokenizer: Tokenizer,
        seq_len: int,
        global_batch: int,
        seed: int,
        shuffle: bool,
        process_index: int = 0,
        process_count: int = 1,
        num_workers: int = 0,
        segments: bool = False,
    ) -> StreamBatches:
        """Endless iterator of this process's ``global_batch // process_count`` packed rows a step
        (with ``segments``: documents kept apart, as ``text.split_batch`` describes).

        ``num_workers > 0``: that many processes each pack a slice of the shard, and batches are
        taken from them in turn (so the batches depend on ``num_workers``).
        """
        split = self.cfg.tfds_train_split
        if self.num_records(split) < process_count:
            raise ConfigError(
                f"data.tfds_train_split='{split}' of '{self.cfg.tfds_name}' holds {self.num_records(split)} records, "
                f"fewer than the {process_count} processes that each read a shard; choose a larger split"
            )
        if self.cfg.tfds_reader == "tf_data":
            from train.data.tfds_tf import TfDataRecords

            records = TfDataRecords(self.builder, split, seed % 2**32, shuffle, process_index, process_count)
        else:
            records = grain.MapDataset.source(self.builder.as_data_source(split=split))
        batches = batch_iterator(
            records, global_batch, seed=seed, shuffle=shuffle, process_index=process_index,
            process_count=process_count, per_record=Tokenize(tokenizer, self.cfg.text_field),
            pack=concat_then_split(seq_len + 1, segments), per_batch=split_batch, num_workers=num_workers, read_options=READ_OPTIONS,
        )  # fmt: skip
        return StreamBatches(batches, process_index, process_count)

    def documents(self, split: str) -> Iterator[str]:
        """The texts of ``split`` in record order."""
        if self.cfg.tfds_reader == "tf_data":
            from train.data.tfds_tf import ordered_records

            records = ordered_records(self.builder, split)
        else:
            source = self.builder.as_data_source(split=split)
            records = (source[i] for i in range(len(source)))
        return (as_text(r[self.cfg.text_field]) for r in records)

    def val_tokens(self, tokenizer: Tokenizer, seq_len: int, batch_size: int, max_batches: int) -> PackedTokens:
        """The first validation documents, enough for ``max_batches`` eval batches (or all of them).

        ``text.eval_batches(tokens, seq_len, batch_size, max_batches)`` cuts them into windows;
        their bytes per token (``count_bytes``) give bits per byte of exactly the windows scored.
        """
        needed, have, docs = max_batches * batch_size * seq_len + 1, 0, []
        for text in self.documents(self.cfg.tfds_val_split):
            docs.append(text)
            have += len(tokenizer.encode(text)) + 1
            if have >= needed:
                break
        if have < batch_size * seq_len + 1:
            raise ConfigError(
                f"data.tfds_val_split='{self.cfg.tfds_val_split}' of '{self.cfg.tfds_name}' gives {have} tokens, "
                f"fewer than one eval batch of {batch_size} x {seq_len} + 1; choose a larger split or lower "
                "train.batch_size or train.seq_len"
            )
        return PackedTokens(docs, tokenizer, count_bytes=True)


def as_text(value: bytes | str) -> str:
    """A TFDS Text feature reads back as UTF-8 bytes; invalid UTF-8 becomes U+FFFD."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class Tokenize:
    """record -> ``{'tokens': int32[n + 1]}``: the text feature's ids, then ``eos_id``."""

    def __init__(self, tokenizer: Tokenizer, field: str):
        self.tokenizer, self.field = tokenizer, field

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(as_text(record[self.field]))
        return {"tokens": np.append(ids, self.tokenizer.eos_id).astype(np.int32)}


class StreamBatches:
    """This process's batches; the state holds every process's packing position.

    ``get_state`` is collective when ``process_count > 1``: every process calls it at the same
    step (the loop does, when it saves), and each gets the same dict.
    """

    def __init__(self, iterator: grain.DatasetIterator, process_index: int, process_count: int):
        self.iterator, self.process_index, self.process_count = iterator, process_index, process_count

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> Batch:
        return next(self.iterator)

    def local_state(self) -> dict:
        return self.iterator.get_state()

    def get_state(self) -> dict:
        local = self.local_state()
        return {"processes": [local] if self.process_count == 1 else gather_json(local)}

    def set_state(self, state: dict) -> None:
        saved = state.get("processes", [])
        if len(saved) != self.process_count:
            raise ConfigError(
                f"the checkpoint's data position was saved by {len(saved)} processes, and each process packs "
                f"its own shard; resume with {len(saved)} processes or start a new run.dir"
            )
        self.iterator.set_state(_slices_as_tuples(saved[self.process_index]))


def _slices_as_tuples(state: Any) -> Any:
    """JSON turns the packer's ``remainder_slices`` (start, stop) into lists; grain compares tuples."""
    if isinstance(state, dict):
        return {
            k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _slices_as_tuples(v)
            for k, v in state.items()
        }
    if isinstance(state, list):  # worker processes' states
        return [_slices_as_tuples(v) for v in state]
    return state


def gather_json(local: dict) -> list[dict]:
    """Every process's ``local`` dict, in process order (a collective over all processes)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]
