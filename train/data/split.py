"""Which data trains and which validates: one rule for text documents, JSONL examples and TFDS builds.

The validation set is either given as files (``data.val_files``: they are the validation set and
leave the training files) or held out of the training files by name: each item has a name (its
file for a text document, ``file:line`` for a JSONL row, or the row's ``data.group_field``), and
``data.val_fraction`` of the distinct names, ranked by SHA-256, validate. Items sharing a name stay
together, the split is the same on every run, and adding data leaves earlier choices alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from train.config import ConfigError
from train.data.files import match_files

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SplitKeys:
    """How the settings are called where they come from (config keys or CLI flags)."""

    files: str = "data.train_files"
    val_files: str = "data.val_files"


def held_out(names: Sequence[str], fraction: float) -> list[int]:
    """Indices of round(fraction * n) names (>= 1 when fraction > 0, < n), the same on every run.

    Ranks names by SHA-256, so adding names leaves earlier choices alone.
    """
    n = len(names)
    if fraction <= 0 or n < 2:
        return []
    count = min(max(round(fraction * n), 1), n - 1)
    order = sorted(range(n), key=lambda i: (hashlib.sha256(names[i].encode()).digest(), i))
    return sorted(order[:count])


def train_val_split(
    files: str,
    val_files: str,
    val_fraction: float,
    read: Callable[[list[str]], list[T]],
    name: Callable[[T], str],
    keys: SplitKeys = SplitKeys(),
) -> tuple[list[T], list[T]]:
    """(training items, validation items), each in file order, as the module docstring says.

    ``read(paths)`` gives the items of files; ``name(item)`` the name that decides where it goes.
    Nothing is held out of fewer than two names.
    """
    paths = match_files(files, keys.files)
    if val_files:
        val_paths = match_files(val_files, keys.val_files)
        held = {os.path.realpath(p) for p in val_paths}
        paths = [p for p in paths if os.path.realpath(p) not in held]
        if not paths:
            raise ConfigError(
                f"every file of {keys.files}='{files}' is also in {keys.val_files}='{val_files}'; "
                f"point {keys.files} at other files"
            )
        return read(paths), read(val_paths)
    items = read(paths)
    names = [name(item) for item in items]
    distinct = sorted(set(names))
    held_names = {distinct[i] for i in held_out(distinct, val_fraction)}
    train = [item for item, n in zip(items, names) if n not in held_names]
    val = [item for item, n in zip(items, names) if n in held_names]
    return train, val
