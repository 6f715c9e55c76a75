"""Back-translation of JSONL rows through two seq2seq (T5) model sources: the work of ``python -m train.augment``
(its --help describes it). Greedy, batched decoding through models/generate.py."""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from train.config.sections import ConfigError


def read_texts(path: str, field: str) -> list[dict]:
    """The JSONL rows of ``path``; each must hold a string ``field``."""
    try:
        lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"'{path}' cannot be read ({e.strerror}); give a JSONL file")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"'{path}' line {number} is not JSON; give one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ConfigError(f"'{path}' line {number} has no string field '{field}'; set --field or fix that line")
        rows.append(row)
    if not rows:
        raise ConfigError(f"'{path}' holds no rows")
    return rows


def translator(path: str, tokenizer_spec: str, batch_size: int, max_new_tokens: int):
    """``translate(texts) -> texts`` with the T5 model at ``path``: greedy, ``batch_size`` rows at a time."""
    from models.generate import generate
    from train.checkpoints.sources import load_source, source_tokenizer

    source = load_source(path)
    cfg = source.config
    if cfg.family != "encoder_decoder" or cfg.head != "lm":
        raise ConfigError(f"'{path}' is a {cfg.family} model, not a seq2seq (T5) one; give a T5 model")
    tokenizer = source_tokenizer(source, tokenizer_spec)
    eos = tokenizer.eos_id
    pad = 0 if tokenizer.pad_id is None else tokenizer.pad_id

    def translate(texts: list[str]) -> list[str]:
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            prompts = [list(tokenizer.encode(t))[: cfg.max_seq_len - 1] + [eos] for t in chunk]
            prompts += [prompts[-1]] * (batch_size - len(prompts))  # one batch shape: one compile
            tokens = generate(source.model, prompts, max_new_tokens, eos_id=eos, pad_id=pad)  # [batch, new]
            for row in np.asarray(tokens)[: len(chunk)].tolist():
                out.append(tokenizer.decode(row[: row.index(eos)] if eos in row else row))
        return out

    return translate


def back_translate(args: argparse.Namespace) -> int:
    """Writes ``--out``; returns the number of rows."""
    rows = read_texts(args.source_file, args.field)
    via = translator(args.via, args.tokenizer, args.batch_size, args.max_new_tokens)
    back = translator(args.back, args.tokenizer, args.batch_size, args.max_new_tokens)
    there = via([args.via_prefix + r[args.field] for r in rows])
    again = back([args.back_prefix + t for t in there])
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**row, args.field: text}) + "\n" for row, text in zip(rows, again))
    return len(rows)
