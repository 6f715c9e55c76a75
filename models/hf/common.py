"""What every family converter shares: the error type, a safetensors reader and layer stacking.

A converter sees Hugging Face tensors by their names with the base-model prefix removed
(``h.0.ln_1.weight``, not ``transformer.h.0.ln_1.weight``) and names our parameters by their
path in the NNX state (``('stack', 'blocks', 'attn', 'q', 'kernel')``).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Iterator

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so bf16 safetensors read as numpy
import numpy as np

from models.config import ConfigError

Path = tuple[str, ...]
Params = dict[Path, np.ndarray]  # flat: our parameter path -> array


class ConversionError(ConfigError):
    """A checkpoint or config we cannot convert; the message names the problem and the fix."""


def read_config(path: pathlib.Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ConversionError(f"{path} has no config.json; pass a Hugging Face model directory")
    return json.loads(file.read_text())


class Weights:
    """The tensors of a Hugging Face directory (``model.safetensors`` or a sharded index), read lazily.

    ``get(name)`` returns float32 numpy; names may omit any of ``prefixes``. ``unused()`` lists
    the tensors nobody read, so a converter that misses weights fails instead of guessing.
    """

    def __init__(self, path: pathlib.Path, prefixes: Iterable[str] = (), ignore: Iterable[str] = ()):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ConversionError(
                f"{path} has no model.safetensors; save the model with save_pretrained(..., safe_serialization=True)"
            )
        self._handles = {f: safe_open(str(path / f), framework="numpy") for f in files}
        self._where: dict[str, tuple[str, str]] = {}  # short name -> (file, stored name)
        for f, handle in self._handles.items():
            for stored in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                short = stored
                for prefix in prefixes:
                    if short.startswith(prefix):
                        short = short[len(prefix) :]
                        break
                self._where[short] = (f, stored)
        self._ignore = [re.compile(p) for p in ignore]
        self._read: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, transpose: bool = False) -> np.ndarray:
        """The tensor as float32; ``transpose`` turns a torch Linear weight [out, in] into our [in, out]."""
        if name not in self._where:
            raise ConversionError(f"the checkpoint has no tensor '{name}'; its config.json does not match its weights")
        f, stored = self._where[name]
        self._read.add(name)
        array = np.asarray(self._handles[f].get_tensor(stored), dtype=np.float32)
        return array.T if transpose else array

    def unused(self) -> list[str]:
        return sorted(n for n in self._where if n not in self._read and not any(p.search(n) for p in self._ignore))


def unstack(name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """``name`` with ``{i}`` filled in, paired with ``array[i]`` for every layer."""
    for i, layer in enumerate(array):
        yield name.format(i=i), layer


def is_causal_lm(cfg) -> bool:
    """A pre-norm decoder with the usual scaled attention and an LM head (what GPT-2 and Llama share)."""
    return (
        cfg.family == "decoder"
        and not cfg.post_norm
        and cfg.scale_attention
        and not cfg.type_vocab_size
        and cfg.head == "lm"
    )


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)
