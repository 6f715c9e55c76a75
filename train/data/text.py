"""Documents -> one packed token stream -> shuffled, resumable, per-process batches.

    train_docs, val_docs = read_documents(cfg.data)
    train = PackedTokens(train_docs, tokenizer)
    it = train_iterator(train, seq_len, batch_size, seed, shuffle=True)
    batch = next(it)  # {'inputs': int32[B, T], 'targets': int32[B, T]}, targets = inputs shifted by 1

Documents are concatenated with ``eos_id`` after each one and cut into non-overlapping windows
of ``seq_len + 1`` tokens. Batch ``s`` is a pure function of (seed, s) and the same global
batch whatever the process count; ``it.get_state()`` is a few JSON-serialisable ints.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Protocol

import grain
import numpy as np

from train.config import ConfigError, DataConfig
from train.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]  # {'inputs': int32[B, T], 'targets': int32[B, T]}


# --- documents ------------------------------------------------------------------------------


class DocumentSource(Protocol):
    """Random access to documents; ``name(i)`` is a stable id used to pick held-out documents."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> str: ...

    def name(self, i: int) -> str: ...


class TextFiles:
    """One document per file, read on access."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        return _read_text(self.paths[i])

    def name(self, i: int) -> str:
        return os.path.basename(self.paths[i])


@dataclasses.dataclass(frozen=True)
class Row:
    record: dict
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"data file '{self.path}' line {self.line}"

    @property
    def name(self) -> str:
        """A stable id ('train.jsonl:12') that decides whether the row is held out."""
        return f"{os.path.basename(self.path)}:{self.line}"


def read_rows(paths: Sequence[str]) -> list[Row]:
    """Every non-blank line of ``paths`` as a JSON object, in file and line order."""
    rows = []
    for path in paths:
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"data file '{path}' line {number} is not valid JSON ({e.msg}); fix or delete it"
                ) from None
            if not isinstance(record, dict):
                raise ConfigError(f"data file '{path}' line {number} is not a JSON object; write one object per line")
            rows.append(Row(record, path, number))
    return rows


class JsonlFiles:
    """One document per non-blank line: the string in ``field`` of that line's JSON object."""

    def __init__(self, paths: Sequence[str], field: str):
        self.rows = read_rows(paths)
        for row in self.rows:
            if field not in row.record:
                raise ConfigError(
                    f"{row.where} has no field '{field}'; set data.text_field to the field that holds the text"
                )
            if not isinstance(row.record[field], str):
                raise ConfigError(f"{row.where} field '{field}' is not a string; set data.text_field to a text field")
        self.field = field

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        return self.rows[i].record[self.field]

    def name(self, i: int) -> str:
        return self.rows[i].name


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"data file '{path}' is not UTF-8 text; convert it or leave it out of the globs") from None
    except OSError as e:
        raise ConfigError(f"data file '{path}' cannot be read ({e.strerror}); fix its permissions") from None


def match_files(patterns: str, key: str) -> list[str]:
    """Comma-separated globs -> sorted, de-duplicated file paths; ``key`` names the config field."""
    files: set[str] = set()
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        matched = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
        if not matched:
            raise ConfigError(f"{key}='{patterns}' matches no file at '{pattern}'; point it at text files")
        files.update(os.path.normpath(f) for f in matched)
    if not files:
        raise ConfigError(f"{key}='{patterns}' matches no file; point it at text files")
    return sorted(files)


def open_source(paths: Sequence[str], cfg: DataConfig) -> DocumentSource:
    return JsonlFiles(paths, cfg.text_field) if cfg.format == "jsonl" else TextFiles(paths)


def held_out(names: Sequence[str], fraction: float) -> list[int]:
    """Indices of round(fraction * n) documents (>= 1 when fraction > 0), the same on every run.

    Ranks documents by SHA-256 of their name, so adding documents leaves earlier choices alone.
    """
    n = len(names)
    if fraction <= 0 or n < 2:
        return []
    count = min(max(round(fraction * n), 1), n - 1)
    order = sorted(range(n), key=lambda i: (hashlib.sha256(names[i].encode()).digest(), i))
    return sorted(order[:count])


def read_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train documents, validation documents), each list in file order, empty documents dropped.

    ``val_files`` set: those files are the validation set and are removed from the training
    set. Otherwise ``held_out`` picks whole documents by ``val_fraction``.
    """
    train_paths = match_files(cfg.train_files, "data.train_files")
    if cfg.val_files:
        val_paths = match_files(cfg.val_files, "data.val_files")
        held = {os.path.realpath(p) for p in val_paths}
        train_paths = [p for p in train_paths if os.path.realpath(p) not in held]
        if not train_paths:
            raise ConfigError(
                f"every file of data.train_files='{cfg.train_files}' is also in data.val_files='{cfg.val_files}'; "
                "point data.train_files at other files"
            )
        source = open_source(train_paths, cfg)
        train = [source[i] for i in range(len(source))]
        val_source = open_source(val_paths, cfg)
        val = [d for d in (val_source[i] for i in range(len(val_source))) if d]
        if not val:
            raise ConfigError(f"data.val_files='{cfg.val_files}' holds only empty documents; point it at text")
    else:
        source = open_source(train_paths, cfg)
        docs = [(source.name(i), source[i]) for i in range(len(source))]
        docs = [(name, text) for name, text in docs if text]
        if len(docs) == 1 and cfg.val_fraction > 0:
            raise ConfigError(
                f"data.train_files='{cfg.train_files}' holds one document, too few to hold out whole documents; "
                "set data.val_files or data.val_fraction=0"
            )
        val_idx = set(held_out([name for name, _ in docs], cfg.val_fraction))
        train = [text for i, (_, text) in enumerate(docs) if i not in val_idx]
        val = [text for i, (_, text) in enumerate(docs) if i in val_idx]
    train = [d for d in train if d]
    if not train:
        raise ConfigError(f"data.train_files='{cfg.train_files}' holds only empty documents; point it at text")
    return train, val


# --- packed tokens --------------------------------------------------------------------------


class PackedTokens:
    """All documents tokenized into one int32 stream, ``eos_id`` after each document.

    Window ``i`` of length ``seq_len + 1`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``:
    consecutive windows share one token, so every token is predicted exactly once.
    """

    def __init__(self, documents: Sequence[str] | DocumentSource, tokenizer: Tokenizer, chunk: int = 1024):
        eos = np.array([tokenizer.eos_id], np.int32)
        pieces: list[np.ndarray] = []
        self.num_bytes = 0  # UTF-8 bytes of the text (eos excluded), for bits per byte
        for start in range(0, len(documents), chunk):
            texts = [documents[i] for i in range(start, min(start + chunk, len(documents)))]
            self.num_bytes += sum(len(t.encode("utf-8")) for t in texts)
            for ids in tokenizer.encode_batch(texts):
                pieces += [ids, eos]
        self.tokens: np.ndarray = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)  # int32[N]
        self.num_documents = len(documents)
        self.eos_id = tokenizer.eos_id

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def num_windows(self, seq_len: int) -> int:
        return max(self.num_tokens - 1, 0) // seq_len

    def windows(self, seq_len: int) -> TokenWindows:
        """A grain ``RandomAccessDataSource`` of int32[seq_len + 1] windows."""
        return TokenWindows(self.tokens, seq_len)


class TokenWindows:
    """``windows[i]`` is int32[seq_len + 1]; inputs are ``[:-1]``, targets ``[1:]``."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self._len = max(len(tokens) - 1, 0) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range [0, {self._len})")
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def __repr__(self) -> str:
        return f"TokenWindows(num_tokens={len(self.tokens)}, seq_len={self.seq_len})"


def split_batch(windows: np.ndarray) -> Batch:
    """int32[B, T + 1] -> {'inputs': int32[B, T], 'targets': int32[B, T]}."""
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


# --- batches --------------------------------------------------------------------------------


def train_iterator(
    tokens: PackedTokens,
    seq_len: int,
    global_batch: int,
    seed: int,
    shuffle: bool,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
) -> grain.DatasetIterator:
    """Endless iterator of this process's rows of each global batch.

    Yields ``{'inputs', 'targets'}: int32[global_batch // process_count, seq_len]``, rows
    ``[p*local, (p+1)*local)`` of global batch ``s``. Global batch ``s`` holds windows
    ``s*global_batch ... + global_batch - 1`` of the (per-epoch reshuffled) window order, so
    it does not depend on ``process_count``. ``get_state`` / ``set_state`` resume exactly.
    """
    if global_batch % process_count:
        raise ConfigError(
            f"train.batch_size={global_batch} does not split evenly over {process_count} processes; "
            f"make it a multiple of {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
    available = tokens.num_windows(seq_len)
    if available < global_batch:
        raise ConfigError(
            f"the training corpus gives {available} windows of seq_len+1={seq_len + 1} tokens, fewer than "
            f"train.batch_size={global_batch}; lower train.seq_len or train.batch_size or add data"
        )
    local = global_batch // process_count
    ds = grain.MapDataset.source(tokens.windows(seq_len))
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)  # index e*n + i reads epoch e's permutation (seed + e)
    ds = ds.repeat()  # endless; reshuffled every epoch
    # Local batch k holds rows [k*local, (k+1)*local) of the endless window order, so global
    # batch s is local batches s*P ... s*P + P - 1 and process p takes every P-th from p.
    ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
    ds = ds.map(split_batch)
    # The windows are in memory: reading ahead in one thread is cheap; more threads contend
    # for the GIL.
    return iter(in_workers(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)), num_workers))


def in_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """``ds`` computed ahead in ``num_workers`` processes (unchanged when 0)."""
    if num_workers <= 0:
        return ds
    from absl import flags  # grain's worker processes read absl flags; unparsed ones raise

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def eval_batches(tokens: PackedTokens, seq_len: int, batch_size: int, max_batches: int) -> list[Batch]:
    """The first ``min(max_batches, num_windows // batch_size)`` batches of windows, in order.

    Each is ``{'inputs', 'targets'}: int32[batch_size, seq_len]``; the ragged tail is dropped.
    """
    available = tokens.num_windows(seq_len)
    count = min(max_batches, available // batch_size)
    if count <= 0:
        raise ConfigError(
            f"the validation corpus gives {available} windows of seq_len+1={seq_len + 1} tokens, fewer than "
            f"one eval batch of {batch_size}; hold out more documents (data.val_fraction or data.val_files) "
            "or lower train.seq_len or train.batch_size"
        )
    windows = tokens.windows(seq_len)
    return [split_batch(np.stack([windows[b * batch_size + j] for j in range(batch_size)])) for b in range(count)]
