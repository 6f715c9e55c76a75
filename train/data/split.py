"""Which data trains, which validates and which tests: one rule for text documents, JSONL examples
and TFDS builds.

The validation set is either given as files (``data.val_files``: they are the validation set and
leave the training files) or held out of the training files by name: each item has a name (its
file for a text document, ``file:line`` for a JSONL row, or the row's ``data.group_field``), and
``data.val_fraction`` of the distinct names, ranked by SHA-256, validate. Items sharing a name stay
together, the split is the same on every run, and adding data leaves earlier choices alone.

A test set, which training never reads (a model picked on validation is reported on it), is held
out the same way and first: ``data.test_files``, or ``data.test_fraction`` of the names ranked by
SHA-256 of ``'test:' + name`` (another order, so switching it on moves few validation names);
validation is then drawn from the names left. Without one the split is as it always was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from train.config.sections import ConfigError, DataConfig
from train.data.files import match_files

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SplitKeys:
    """How the settings are called where they come from (config keys or CLI flags)."""

    files: str = "data.train_files"
    val_files: str = "data.val_files"
    test_files: str = "data.test_files"


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
    train, val, _ = three_way_split(files, val_files, val_fraction, "", 0.0, read, name, keys)
    return train, val


def three_way_split(
    files: str,
    val_files: str,
    val_fraction: float,
    test_files: str,
    test_fraction: float,
    read: Callable[[list[str]], list[T]],
    name: Callable[[T], str],
    keys: SplitKeys = SplitKeys(),
) -> tuple[list[T], list[T], list[T]]:
    """(training, validation, test items), each in file order, as the module docstring says."""
    paths = match_files(files, keys.files)
    given = {}
    for key, patterns in ((keys.val_files, val_files), (keys.test_files, test_files)):
        if patterns:
            given[key] = match_files(patterns, key)
            held = {os.path.realpath(p) for p in given[key]}
            paths = [p for p in paths if os.path.realpath(p) not in held]
            if not paths:
                raise ConfigError(
                    f"every file of {keys.files}='{files}' is also in {key}='{patterns}'; "
                    f"point {keys.files} at other files"
                )
    items = read(paths)
    names = [name(item) for item in items]
    distinct = sorted(set(names))
    test_names = (
        set() if test_files else {distinct[i] for i in held_out([f"test:{n}" for n in distinct], test_fraction)}
    )
    left = [n for n in distinct if n not in test_names]
    val_names = set() if val_files else {left[i] for i in held_out(left, val_fraction)}
    train = [item for item, n in zip(items, names) if n not in test_names | val_names]
    val = read(given[keys.val_files]) if val_files else [item for item, n in zip(items, names) if n in val_names]
    test = read(given[keys.test_files]) if test_files else [item for item, n in zip(items, names) if n in test_names]
    return train, val, test


def split_data(cfg: DataConfig, read: Callable[[list[str]], list[T]], name: Callable[[T], str]):
    """``three_way_split`` as the data config says: (training, validation, test items)."""
    return three_way_split(
        cfg.train_files, cfg.val_files, cfg.val_fraction, cfg.test_files, cfg.test_fraction, read, name
    )


def require_test_split(cfg: DataConfig) -> None:
    """Raises ConfigError when the data config sets no test split."""
    if not (cfg.test_files or cfg.test_fraction):
        raise ConfigError("the run has no test split (set data.test_files or data.test_fraction when training)")
