"""Tokenizers: raw UTF-8 bytes, or a Hugging Face tokenizer saved in a local directory.

Both map text to int32 id arrays and back and name an end-of-document id (``eos_id``) that
the packer puts after every document. Hugging Face tokenizers also name their ``cls_id``,
``sep_id``, ``pad_id``, ``mask_id`` (None where they have none; the byte tokenizer has none).
``load_tokenizer(cfg.tokenizer)`` picks one. ``save_tokenizer`` writes one beside a model's
parameters (exports) and ``saved_tokenizer`` reads it back: a Hugging Face tokenizer's own files,
or for the byte tokenizer ``byte_tokenizer.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from train.config import packages
from train.config.sections import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    cls_id: int | None
    sep_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is end-of-document."""

    vocab_size = 257
    eos_id = 256
    cls_id = sep_id = pad_id = mask_id = None

    def encode(self, text: str) -> np.ndarray:
        """Returns int32[len(text.encode())], no eos."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Drops eos and any id above 255; invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids).reshape(-1)
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``transformers`` tokenizer read from ``path``; no special tokens are added on encode."""

    def __init__(self, path: str):
        import transformers  # deferred: slow to import and unneeded for the byte tokenizer

        self.path = path
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        tok = self.tokenizer
        self.cls_id, self.sep_id, self.pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        self.mask_id = tok.mask_token_id  # masked_lm's [MASK]; None: an id past the vocabulary
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.sep_id  # BERT ends documents with [SEP]
        if eos is None:
            raise ConfigError(
                f"data.tokenizer='{path}' has no eos token; save the tokenizer with an eos_token "
                "(python -m train.train_tokenizer sets <|endoftext|>)"
            )
        self.eos_id: int = int(eos)
        self.vocab_size: int = len(self.tokenizer)
        # The Rust tokenizer behind a fast tokenizer encodes batches in parallel and skips
        # the Python-side length warnings; slow tokenizers go through __call__. A copy without
        # the padding and truncation some tokenizer.json files switch on (all-MiniLM-L6-v2: 128).
        self._fast = None
        if self.tokenizer.is_fast:
            self._fast = copy.deepcopy(self.tokenizer.backend_tokenizer)
            self._fast.no_padding()
            self._fast.no_truncation()

    def encode(self, text: str) -> np.ndarray:
        """Returns int32[num_tokens], no eos."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self._fast is not None:
            encodings = self._fast.encode_batch(list(texts), add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(i, dtype=np.int32) for i in ids]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Drops special tokens (eos) and ids outside the vocabulary."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def encode_with_bytes(tokenizer: Tokenizer, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text ``(ids int32[n], nbytes int32[n])``: the ids ``encode_batch`` gives and each token's
    share of the text's UTF-8 bytes, so bits per byte can be counted over any run of tokens.

    A token owns the bytes from the end of the tokens before it to its own end (Hugging Face fast
    tokenizers' offsets; one byte per id below 256 for the byte tokenizer), so ``nbytes`` never
    counts a byte twice; bytes after the last token's end (whitespace some tokenizers drop), and
    all bytes of tokenizers without offsets, are left to the caller (the packer gives them to eos).
    """
    if isinstance(tokenizer, ByteTokenizer):
        return [(ids, (ids < 256).astype(np.int32)) for ids in tokenizer.encode_batch(texts)]
    fast = getattr(tokenizer, "_fast", None)
    if fast is None:
        return [(ids, np.zeros(len(ids), np.int32)) for ids in tokenizer.encode_batch(texts)]
    out = []
    for text, encoding in zip(texts, fast.encode_batch(list(texts), add_special_tokens=False)):
        ids = np.asarray(encoding.ids, dtype=np.int32)
        char_ends = np.array([end for _, end in encoding.offsets], dtype=np.int64).reshape(-1)
        byte_ends = _char_to_byte_offsets(text)[np.maximum.accumulate(char_ends) if len(ids) else char_ends]
        out.append((ids, np.diff(byte_ends, prepend=0).astype(np.int32)))
    return out


def _char_to_byte_offsets(text: str) -> np.ndarray:
    """int64[len(text) + 1]: the UTF-8 byte offset of every character offset of ``text``."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``'byte'`` -> ``ByteTokenizer``; a directory saved by ``save_pretrained`` (or a
    ``python-package:NAME`` holding one, see train/config/packages.py) -> ``HFTokenizer``."""
    if spec == "byte":
        return ByteTokenizer()
    path = pathlib.Path(packages.resolve(spec, "data.tokenizer"))
    has_tokenizer = path.is_dir() and any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )
    if not has_tokenizer:
        raise ConfigError(
            f"data.tokenizer='{spec}' is not 'byte' or a directory holding a Hugging Face tokenizer; "
            "train one with python -m train.train_tokenizer --out DIR"
        )
    try:
        return HFTokenizer(str(path))
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"data.tokenizer='{spec}' could not be loaded as a Hugging Face tokenizer ({e}); "
            "train one with python -m train.train_tokenizer --out DIR"
        ) from None


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
BYTE_FILE = "byte_tokenizer.json"  # marks a directory whose model reads raw bytes
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def save_tokenizer(tokenizer: Tokenizer, directory: pathlib.Path) -> None:
    """Writes ``tokenizer`` into ``directory`` so that ``saved_tokenizer`` reads it back."""
    if isinstance(tokenizer, ByteTokenizer):
        marker = {"tokenizer": "byte", "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
        (directory / BYTE_FILE).write_text(json.dumps(marker) + "\n")
    else:
        tokenizer.tokenizer.save_pretrained(str(directory))


def saved_tokenizer(directory: pathlib.Path) -> ByteTokenizer | HFTokenizer | None:
    """The tokenizer saved in ``directory`` (``save_tokenizer``, or a Hugging Face model's own files);
    None when it holds none."""
    if (directory / BYTE_FILE).is_file():
        return ByteTokenizer()
    if not any((directory / name).is_file() for name in HF_FILES):
        return None
    try:
        return HFTokenizer(str(directory))
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"the tokenizer files in '{directory}' cannot be loaded ({e}); save the tokenizer again"
        ) from None
