"""The one grain pipeline every source feeds: records -> this process's shuffled, endless batches.

    it = batch_iterator(records, global_batch, seed=0, shuffle=True)    # rows: windows or examples
    it = batch_iterator(documents, global_batch, seed=0, shuffle=True, per_record=tokenize, pack=concat_then_split(T + 1))
    it = batch_iterator(examples, global_batch, seed=0, shuffle=True, pack=first_fit(lengths, bins, to_row))
    batch = next(it)           # this process's global_batch // process_count rows
    state = it.get_state()     # a few JSON-serialisable ints; it.set_state(state) resumes exactly

Records are reshuffled by seed anew every epoch and repeat without end. A global batch is split
over processes one of two ways:

- rows (no ``pack``): global batch ``s`` holds records ``s*B ... (s+1)*B - 1`` of the
  endless record order and process ``p`` takes rows ``[p*B/P, (p+1)*B/P)``, so the global batch
  does not depend on the process count ``P`` (in-memory windows, examples);
- packed (``pack``): process ``p`` reads records ``p, p + P, ...`` and packs them into rows
  itself, as MaxText does: documents concatenated and cut (``concat_then_split``, streamed TFDS
  records) or whole examples placed first-fit (``first_fit``, train/data/packing.py); its batch
  ``s`` is a pure function of (seed, s, p, P).

Packed rows keep grain's segment ids (1, 2, ... per record in a row, 0 = padding) and positions
(restarting at 0 in each record), so attention never crosses records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from sharding.fit import process_problems
from train.config.sections import ConfigError

# The records are in memory: reading ahead in one thread is cheap; more threads contend for the GIL.
IN_MEMORY = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


def batch_iterator(
    records: grain.MapDataset | grain.IterDataset,
    global_batch: int,
    *,
    seed: int,
    shuffle: bool,
    process_index: int = 0,
    process_count: int = 1,
    per_record: Callable[[Any], Any] | None = None,
    per_position: Callable[[int, Any], Any] | None = None,
    pack: Callable[[grain.IterDataset], grain.IterDataset] | None = None,
    per_batch: Callable[[Any], Any] | None = None,
    num_workers: int = 0,
    read_options: grain.ReadOptions = IN_MEMORY,
) -> grain.DatasetIterator:
    """Endless iterator of this process's ``global_batch // process_count`` rows of each batch.

    ``records``: a ``grain.MapDataset`` (random access: shuffled and repeated here) or a
    ``grain.IterDataset`` that already yields this process's endless, shuffled records (tf.data).
    ``per_record`` runs in grain's read-ahead threads; ``per_position(k, record)`` too, with the
    record's position ``k`` in the endless order (epoch ``k // len(records)``; MapDataset only).
    ``pack`` turns the iterator of records into one of packed rows; ``per_batch`` turns a batch of
    rows into the batch the task reads. ``num_workers > 0`` computes batches ahead in that many processes.
    """
    for problem in process_problems(global_batch, process_count):
        raise ConfigError(problem)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
    local = global_batch // process_count
    if isinstance(records, grain.MapDataset):
        records = endless(records, seed, shuffle, (process_index, process_count) if pack else (0, 1))
    if per_record is not None:
        records = records.map(per_record)
    if per_position is not None:
        records = records.map_with_index(per_position)
    if pack is not None:
        if isinstance(records, grain.MapDataset):
            records = records.to_iter_dataset(read_options)
        ds = pack(records).batch(local, drop_remainder=True)
    else:
        # Local batch k holds rows [k*local, (k+1)*local) of the endless record order, so global
        # batch s is local batches s*P ... s*P + P - 1 and process p takes every P-th from p.
        ds = records.batch(local, drop_remainder=True)[process_index::process_count]
    if per_batch is not None:
        ds = ds.map(per_batch)
    if isinstance(ds, grain.MapDataset):
        ds = ds.to_iter_dataset(read_options)
    return iter(in_workers(ds, num_workers))


def endless(records: grain.MapDataset, seed: int, shuffle: bool, shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """Records ``p, p + P, ...`` of ``records`` for ``shard=(p, P)``, reshuffled by seed every epoch
    when ``shuffle``, repeated without end."""
    index, count = shard
    records = records[index::count]
    if shuffle:
        records = records.shuffle(seed=seed % 2**32)  # index e*n + i reads epoch e's permutation (seed + e)
    return records.repeat()


def concat_then_split(length: int, segments: bool = True) -> Callable[[grain.IterDataset], grain.IterDataset]:
    """``{'tokens': int32[n]}`` records -> rows cut from their concatenation (grain's
    ``ConcatThenSplitIterDataset``): ``{'tokens', 'segment_ids', 'positions'}: int32[length]``
    (a record cut at a row's end goes on in the next row from position 0), or, without
    ``segments``, the tokens int32[length] alone."""

    def pack(records: grain.IterDataset) -> grain.IterDataset:
        packed = grain.experimental.ConcatThenSplitIterDataset(records, length_struct={"tokens": length})
        return packed.map(_with_segments if segments else _tokens)

    return pack


def _with_segments(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": packed["tokens"],
        "segment_ids": packed["tokens_segment_ids"],
        "positions": packed["tokens_positions"],
    }


def _tokens(packed: dict[str, np.ndarray]) -> np.ndarray:
    return packed["tokens"]


def in_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """``ds`` computed ahead in ``num_workers`` processes (unchanged when 0)."""
    if num_workers <= 0:
        return ds
    from absl import flags  # grain's worker processes read absl flags; unparsed ones raise

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
