"""``data.tfds_reader=tf_data``: TFDS records through ``tfds.load``'s tf.data (needs TensorFlow).

For datasets prepared as TFRecord (the format of the public TFDS buckets), which
``tfds.data_source`` cannot read. Records feed the same grain packing as the array_record path.
Process p reads the p-th of P even, contiguous parts of the split (``tfds.even_splits``), its
files shuffled by seed anew each epoch. The state is the number of records read; restoring it
re-reads that many records (``skip``), so resuming costs time in proportion to the position.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain

SHUFFLE_BUFFER = 1024  # records mixed across the interleaved files


def _dataset(builder, split: str, seed: int, shuffle: bool, skip: int = 0, repeat: bool = True):
    """Records of ``split`` as numpy dicts: the same sequence for the same arguments."""
    import tensorflow_datasets as tfds

    # The ordering guard refuses to shuffle datasets built in order (train.tfds_build's); here
    # shuffling is asked for.
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False, enable_ordering_guard=False)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config)
    if shuffle:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    return tfds.as_numpy((ds.repeat() if repeat else ds).skip(skip))


def ordered_records(builder, split: str) -> Iterator[dict]:
    """The records of ``split`` once, in file order."""
    return iter(_dataset(builder, split, seed=0, shuffle=False, repeat=False))


class TfDataRecords(grain.IterDataset):
    """Endless records of part ``index`` of ``count`` of ``split``, as numpy dicts."""

    def __init__(self, builder, split: str, seed: int, shuffle: bool, index: int, count: int):
        super().__init__()
        import tensorflow_datasets as tfds

        self.builder, self.seed, self.shuffle = builder, seed, shuffle
        self.split = tfds.even_splits(split, n=count)[index]

    def __iter__(self) -> _TfDataIterator:
        return _TfDataIterator(self)


class _TfDataIterator(grain.DatasetIterator):
    def __init__(self, records: TfDataRecords):
        super().__init__()
        self.records, self.position, self.iterator = records, 0, None

    def __next__(self) -> dict:
        if self.iterator is None:
            r = self.records
            self.iterator = iter(_dataset(r.builder, r.split, r.seed, r.shuffle, skip=self.position))
        record = next(self.iterator)
        self.position += 1
        return record

    def get_state(self) -> dict:
        return {"records": self.position}

    def set_state(self, state: dict) -> None:
        self.position, self.iterator = int(state["records"]), None
