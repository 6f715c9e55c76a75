"""``python -m train.augment SOURCE_FILE --via MODEL_A --back MODEL_B --out FILE [--field text]
[--via-prefix TEXT] [--back-prefix TEXT] [--batch-size N] [--max-new-tokens N] [--tokenizer DIR]``

Back-translation: every JSONL row of SOURCE_FILE has its ``--field`` text translated by MODEL_A
and the result translated back by MODEL_B; the rows, with that field replaced and every other
field (labels, groups) kept, are written to ``--out`` in order, ready as extra training rows.
MODEL_A and MODEL_B are T5 (seq2seq) models: run directories, export directories or Hugging Face
directories (train/checkpoints/sources.py). ``--via-prefix`` / ``--back-prefix`` go before each input (T5 task
prefixes such as ``translate English to German: ``). Decoding is greedy, batched through the cached
generation of ``models.generate`` (one compile per batch shape); an input longer than the model's
positions is cut to fit. User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from train import cli
from train.config.sections import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m train.augment", description=__doc__.split("\n\n")[1])
    parser.add_argument("source_file", help="JSONL rows whose --field text is back-translated")
    parser.add_argument("--via", required=True, help="the seq2seq model that translates out")
    parser.add_argument("--back", required=True, help="the seq2seq model that translates back")
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--field", default="text", help="the field holding the text (default: text)")
    parser.add_argument("--via-prefix", default="", help="put before every input of --via")
    parser.add_argument("--back-prefix", default="", help="put before every input of --back")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the longest translation, in tokens")
    parser.add_argument("--tokenizer", default="", help="'byte' or a tokenizer directory for both models")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("need --batch-size >= 1 and --max-new-tokens >= 1")
    return args


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


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cli.start_jax()
        n = back_translate(args)
        print(f"back-translated {n} rows via {args.via} and back via {args.back} -> {args.out}", flush=True)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
