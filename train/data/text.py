"""Text documents -> one packed token stream -> shuffled, resumable, per-process batches.

    train_docs, val_docs = read_documents(cfg.data)
    train = PackedTokens(train_docs, tokenizer)
    it = train_iterator(train, seq_len, batch_size, seed, shuffle=True)
    batch = next(it)  # {'inputs': int32[B, T], 'targets': int32[B, T]}, targets = inputs shifted by 1
    # with segments: + 'segment_ids', 'positions' int32[B, T] and 'weights' float32[B, T]

Documents are concatenated with ``eos_id`` after each one and cut into non-overlapping windows
of ``seq_len + 1`` tokens. With ``segments`` (``data.packing``) a window's documents are kept
apart: ``segment_ids`` number them 1, 2, ... in the window, ``positions`` restart at 0 where a
document (or the window) starts, and ``weights`` are 0 on the one target per document boundary
that would predict the next document's first token from the previous one. Batch ``s`` is a pure function of (seed, s) and the same global
batch whatever the process count; ``it.get_state()`` is a few JSON-serialisable ints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import grain
import numpy as np

from train.config.sections import ConfigError, DataConfig
from train.data.files import read_rows, read_text
from train.data.pipeline import batch_iterator
from train.data.split import require_test_split, split_data
from train.data.tokenizer import Tokenizer, encode_with_bytes

Batch = dict[str, np.ndarray]  # {'inputs': int32[B, T], 'targets': int32[B, T]} (+ segments, see above)


# --- documents ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # a stable id that decides whether it is held out: the file name, or 'file.jsonl:12'
    text: str


def documents_in(paths: Sequence[str], cfg: DataConfig) -> list[Document]:
    """The non-empty documents of ``paths`` in file order: one per file, or with ``cfg.format='jsonl'``
    the string in ``cfg.text_field`` of each line's JSON object."""
    if cfg.format != "jsonl":
        docs = [Document(os.path.basename(p), read_text(p)) for p in paths]
        return [d for d in docs if d.text]
    docs = []
    for row in read_rows(paths):
        if cfg.text_field not in row.record:
            raise ConfigError(
                f"{row.where} has no field '{cfg.text_field}'; set data.text_field to the field that holds the text"
            )
        text = row.record[cfg.text_field]
        if not isinstance(text, str):
            raise ConfigError(
                f"{row.where} field '{cfg.text_field}' is not a string; set data.text_field to a text field"
            )
        if text:
            docs.append(Document(row.name, text))
    return docs


def read_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train documents, validation documents), each list in file order, empty documents dropped,
    split by ``data.val_files`` or ``data.val_fraction`` (train/data/split.py); the test split,
    if any, is in neither."""
    train, val, _ = split_data(cfg, lambda paths: documents_in(paths, cfg), lambda d: d.name)
    if not cfg.val_files and cfg.val_fraction > 0 and len(train) == 1 and not val:
        raise ConfigError(
            f"data.train_files='{cfg.train_files}' holds one document, too few to hold out whole documents; "
            "set data.val_files or data.val_fraction=0"
        )
    if not train:
        raise ConfigError(f"data.train_files='{cfg.train_files}' holds only empty documents; point it at text")
    if cfg.val_files and not val:
        raise ConfigError(f"data.val_files='{cfg.val_files}' holds only empty documents; point it at text")
    return [d.text for d in train], [d.text for d in val]


def test_documents(cfg: DataConfig) -> list[str]:
    """The test documents (``data.test_files`` or ``data.test_fraction``), which training never reads."""
    require_test_split(cfg)
    test = split_data(cfg, lambda paths: documents_in(paths, cfg), lambda d: d.name)[2]
    if not test:
        raise ConfigError("the test split holds no document; raise data.test_fraction or fix data.test_files")
    return [d.text for d in test]


# --- packed tokens --------------------------------------------------------------------------


class PackedTokens:
    """All documents tokenized into one int32 stream, ``eos_id`` after each document.

    Window ``i`` of length ``seq_len + 1`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``:
    consecutive windows share one token, so every token is predicted exactly once.
    With ``count_bytes`` (held-out text, for bits per byte), ``nbytes`` int32[N] is each token's
    share of the UTF-8 bytes (``tokenizer.encode_with_bytes``; eos owns what no token of its
    document ends on), so the bytes of any run of tokens are known exactly.
    """

    def __init__(self, documents: Sequence[str], tokenizer: Tokenizer, chunk: int = 1024, count_bytes: bool = False):
        pieces: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        self.num_bytes = 0  # UTF-8 bytes of the text (eos excluded), for bits per byte
        for start in range(0, len(documents), chunk):
            texts = [documents[i] for i in range(start, min(start + chunk, len(documents)))]
            sizes = [len(t.encode("utf-8")) for t in texts]
            self.num_bytes += sum(sizes)
            if not count_bytes:
                for ids in tokenizer.encode_batch(texts):
                    pieces += [ids, np.array([tokenizer.eos_id], np.int32)]
                continue
            for size, (ids, nbytes) in zip(sizes, encode_with_bytes(tokenizer, texts)):
                pieces += [ids, np.array([tokenizer.eos_id], np.int32)]
                counts += [nbytes, np.array([size - nbytes.sum()], np.int32)]
        self.tokens: np.ndarray = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)  # int32[N]
        self.nbytes: np.ndarray | None = (
            (np.concatenate(counts) if counts else np.zeros(0, np.int32)) if count_bytes else None
        )
        self.num_documents = len(documents)
        self.eos_id = tokenizer.eos_id
        # int64[D]: where each document starts in the stream (its eos is its last token)
        self.starts = np.concatenate([[0], np.cumsum([len(p) + 1 for p in pieces[::2]])[:-1]]).astype(np.int64)

    def target_bytes(self, seq_len: int, num_windows: int, segments: bool = False) -> int:
        """UTF-8 bytes of the targets of the first ``num_windows`` windows (tokens 1 .. num_windows * seq_len);
        with ``segments``, of those with weight 1 (a document's first token is not predicted)."""
        if self.nbytes is None:
            raise ValueError("PackedTokens(..., count_bytes=True) counts bytes per token")
        end = num_windows * seq_len + 1
        unscored = self.starts[(self.starts >= 1) & (self.starts < end)] if segments else []
        return int(self.nbytes[1:end].sum() - self.nbytes[unscored].sum())

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def num_windows(self, seq_len: int) -> int:
        return max(self.num_tokens - 1, 0) // seq_len

    def windows(self, seq_len: int, segments: bool = False) -> TokenWindows:
        """A grain ``RandomAccessDataSource`` of int32[seq_len + 1] windows (dicts with ``segments``)."""
        return TokenWindows(self.tokens, seq_len, self.starts if segments else None)


class TokenWindows:
    """``windows[i]`` is int32[seq_len + 1]; inputs are ``[:-1]``, targets ``[1:]``.

    Given the documents' ``starts`` it is ``{'tokens', 'segment_ids', 'positions'}: int32[seq_len + 1]``:
    the window's documents numbered 1, 2, ..., each token's offset from where its document (or
    the window, whichever is later) starts, as grain's packers give them.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, starts: np.ndarray | None = None):
        self.tokens, self.seq_len, self.starts = tokens, seq_len, starts
        self._len = max(len(tokens) - 1, 0) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range [0, {self._len})")
        start = i * self.seq_len
        tokens = self.tokens[start : start + self.seq_len + 1]
        if self.starts is None:
            return tokens
        segments, positions = window_segments(np.arange(start, start + self.seq_len + 1)[None], self.starts)
        return {"tokens": tokens, "segment_ids": segments[0], "positions": positions[0]}

    def __repr__(self) -> str:
        return f"TokenWindows(num_tokens={len(self.tokens)}, seq_len={self.seq_len})"


def window_segments(index: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows of stream positions int[B, L] -> (segment ids, positions) int32[B, L]: each window's
    documents numbered from 1, positions counted from where the document or the window starts."""
    document = np.searchsorted(starts, index, side="right") - 1
    segments = document - document[:, :1] + 1
    positions = index - np.maximum(starts[document], index[:, :1])
    return segments.astype(np.int32), positions.astype(np.int32)


def split_batch(windows: np.ndarray | dict) -> Batch:
    """int32[B, T + 1] -> {'inputs': int32[B, T], 'targets': int32[B, T]}; windows with segments
    (``{'tokens', 'segment_ids', 'positions'}`` [B, T + 1]) add the inputs' ``segment_ids`` and
    ``positions`` int32[B, T] and ``weights`` float32[B, T], 1 where a target is in its input's document."""
    if not isinstance(windows, dict):
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
    tokens, segments = windows["tokens"], windows["segment_ids"]
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments[:, :-1],
        "positions": windows["positions"][:, :-1],
        "weights": same.astype(np.float32),
    }


def stack(rows: list) -> np.ndarray | dict:
    """Windows (arrays or dicts of arrays) -> one [B, ...] array or dict of them."""
    if isinstance(rows[0], dict):
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return np.stack(rows)


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
    segments: bool = False,
) -> grain.DatasetIterator:
    """Endless iterator of this process's rows of each global batch.

    Yields ``{'inputs', 'targets'}: int32[global_batch // process_count, seq_len]`` (with
    ``segments``: and ``segment_ids``, ``positions``, ``weights``, see ``split_batch``), rows
    ``[p*local, (p+1)*local)`` of global batch ``s``. Global batch ``s`` holds windows
    ``s*global_batch ... + global_batch - 1`` of the (per-epoch reshuffled) window order, so
    it does not depend on ``process_count``. ``get_state`` / ``set_state`` resume exactly.
    """
    available = tokens.num_windows(seq_len)
    if available < global_batch:
        raise ConfigError(
            f"the training corpus gives {available} windows of seq_len+1={seq_len + 1} tokens, fewer than "
            f"train.batch_size={global_batch}; lower train.seq_len or train.batch_size or add data"
        )
    windows = grain.MapDataset.source(tokens.windows(seq_len, segments))
    return batch_iterator(
        windows, global_batch, seed=seed, shuffle=shuffle, process_index=process_index,
        process_count=process_count, per_batch=split_batch, num_workers=num_workers,
    )  # fmt: skip


def eval_batches(
    tokens: PackedTokens, seq_len: int, batch_size: int, max_batches: int, segments: bool = False
) -> list[Batch]:
    """The first ``min(max_batches, num_windows // batch_size)`` batches of windows, in order.

    Each is ``{'inputs', 'targets'}: int32[batch_size, seq_len]`` (with ``segments``, as
    ``split_batch`` gives them); the ragged tail is dropped.
    """
    available = tokens.num_windows(seq_len)
    count = min(max_batches, available // batch_size)
    if count <= 0:
        raise ConfigError(
            f"the validation corpus gives {available} windows of seq_len+1={seq_len + 1} tokens, fewer than "
            f"one eval batch of {batch_size}; hold out more documents (data.val_fraction or data.val_files) "
            "or lower train.seq_len or train.batch_size"
        )
    windows = tokens.windows(seq_len, segments)
    return [split_batch(stack([windows[b * batch_size + j] for j in range(batch_size)])) for b in range(count)]
