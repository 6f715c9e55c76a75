"""Data augmentation for example tasks (EDA: Wei & Zou 2019): pure functions of (words, tags, rng).

    synonyms = read_synonyms("syn.txt")                      # lines 'word syn1 syn2 ...'
    words, tags = augment(["Enter", "HAMLET"], ["O", "B-PER"], cfg, synonyms, rng_for(seed, epoch, example))

Each operation visits every word with its probability (``data.augment.*``), in this order:

- synonym replacement (``synonym``): the word becomes one of its synonyms (words without any stay);
- random insertion (``insert``): a synonym of the word (else a copy of it) goes right after it;
  its tag continues the word's entity (``B-X``/``I-X`` -> ``I-X``; ``O`` stays ``O``);
- random swap (``swap``): the word trades places with another random word; tags go with words;
- random deletion (``delete``): the word is dropped (at least one word always stays).

The rng is ``numpy.random.default_rng([seed, epoch, example])``: the same (seed, epoch, example)
gives the same words on every run and after a resume; another epoch draws afresh. ``nlpaug`` is
not used: its augmenters draw from a global random state and return text, not (word, tag) pairs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from train.config.sections import AugmentConfig, ConfigError

Synonyms = dict[str, list[str]]  # word -> its synonyms


def enabled(cfg: AugmentConfig) -> bool:
    return any(p > 0 for p in (cfg.synonym, cfg.insert, cfg.swap, cfg.delete))


def read_synonyms(path: str) -> Synonyms:
    """``{word: [synonyms]}`` from lines ``word syn1 syn2 ...`` (blank lines and ``#`` comments skipped)."""
    if not path:
        return {}
    try:
        lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"data.augment.synonyms='{path}' cannot be read ({e.strerror}); point it at a synonyms file")
    out: Synonyms = {}
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2:
            raise ConfigError(f"{path} line {number} names no synonym; write 'word syn1 syn2 ...' or drop the line")
        out.setdefault(parts[0], []).extend(parts[1:])
    return out


def rng_for(seed: int, epoch: int, example: int) -> np.random.Generator:
    """The generator of one example in one epoch: a pure function of its three ints."""
    return np.random.default_rng([seed % 2**32, epoch, example])


def _continued(tag: str) -> str:
    """The tag of a word inserted right after a word tagged ``tag``: inside the same entity."""
    return "I-" + tag[2:] if tag[:2] in ("B-", "I-") else tag


def synonym_replace(words, tags, p: float, synonyms: Synonyms, rng: np.random.Generator):
    out = list(words)
    for i, word in enumerate(words):
        options = synonyms.get(word) or synonyms.get(word.lower())
        if options and rng.random() < p:
            out[i] = options[rng.integers(len(options))]
    return out, None if tags is None else list(tags)


def random_insert(words, tags, p: float, synonyms: Synonyms, rng: np.random.Generator):
    out_w, out_t = [], []
    for i, word in enumerate(words):
        out_w.append(word)
        if tags is not None:
            out_t.append(tags[i])
        if rng.random() < p:
            options = synonyms.get(word) or synonyms.get(word.lower()) or [word]
            out_w.append(options[rng.integers(len(options))])
            if tags is not None:
                out_t.append(_continued(tags[i]))
    return out_w, None if tags is None else out_t


def random_swap(words, tags, p: float, rng: np.random.Generator):
    order = list(range(len(words)))
    if len(words) > 1:
        for i in range(len(words)):
            if rng.random() < p:
                j = int(rng.integers(len(words) - 1))
                j += j >= i  # another word
                order[i], order[j] = order[j], order[i]
    return [words[k] for k in order], None if tags is None else [tags[k] for k in order]


def random_delete(words, tags, p: float, rng: np.random.Generator):
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k], None if tags is None else [t for t, k in zip(tags, keep) if k]


def augment(
    words: Sequence[str], tags: Sequence[str] | None, cfg: AugmentConfig, synonyms: Synonyms, rng: np.random.Generator
) -> tuple[list[str], list[str] | None]:
    """(words, tags) after the enabled operations in the module docstring's order; ``tags`` is
    None for classification (one label per example) and stays aligned with the words otherwise."""
    words, tags = list(words), None if tags is None else list(tags)
    if not words:
        return words, tags
    if cfg.synonym > 0:
        words, tags = synonym_replace(words, tags, cfg.synonym, synonyms, rng)
    if cfg.insert > 0:
        words, tags = random_insert(words, tags, cfg.insert, synonyms, rng)
    if cfg.swap > 0:
        words, tags = random_swap(words, tags, cfg.swap, rng)
    if cfg.delete > 0:
        words, tags = random_delete(words, tags, cfg.delete, rng)
    return words, tags


def example_maker(rows, cfg, seed: int, make, tagged: bool) -> Callable[[int, int], dict]:
    """``row(epoch, i)``: training row ``i`` of ``rows`` augmented with ``rng_for(seed, epoch, i)``
    and made into one example by ``make`` (a list of Rows -> arrays [1, ...] or TaggedArrays).
    Classification text is split on whitespace and its words joined back with single spaces.
    cfg: the DataConfig (its ``augment`` section and field names)."""
    synonyms = read_synonyms(cfg.augment.synonyms)

    def row(epoch: int, i: int) -> dict:
        source = rows[i]
        record = dict(source.record)
        rng = rng_for(seed, epoch, i)
        if tagged:
            words, tags = augment(record[cfg.tokens_field], record[cfg.tags_field], cfg.augment, synonyms, rng)
            record[cfg.tokens_field], record[cfg.tags_field] = words, tags
        else:
            words, _ = augment(str(record[cfg.text_field]).split(), None, cfg.augment, synonyms, rng)
            record[cfg.text_field] = " ".join(words)
        made = make([dataclasses.replace(source, record=record)])
        arrays = getattr(made, "arrays", made)
        return {k: v[0] for k, v in arrays.items()}

    return row
