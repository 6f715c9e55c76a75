"""``python -m train.predict SOURCE (--files F1,F2,... | --text "..." | stdin) [--out FILE] [--best]``

Predicts with a saved classifier (a run directory, an export, an int8 export or a Hugging Face
token / sequence classification directory, train/checkpoints/sources.py) and writes the predictions to
``--out`` (default: stdout).

- Token classifiers write CoNLL: one word a line, ``word gold pred`` where the input has tags and
  ``word pred`` where it has none, a blank line after each sentence; conlleval scores the first
  form. Input: ``--files`` in CoNLL (word first, tag last or ``data.tag_column``, or the words
  alone) or JSONL rows (``data.tokens_field`` / ``data.tags_field``); ``--text`` and stdin hold a
  sentence per line, words split on whitespace. Long sentences are read in windows, every word
  predicted once (train/data/windows.py).
- Classifiers write JSONL: ``{"input", "label", "probabilities": {label: p}}`` per input. Input:
  ``--files`` of JSONL rows (``data.text_field``) or of text (each non-blank line one input);
  ``--text`` and stdin: each non-blank line one input.

User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from train import cli
from train.config.sections import ConfigError
from train.evaluation.predicting import predict


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m train.predict", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="run, export or Hugging Face classifier directory")
    parser.add_argument("--best", action="store_true", help="a run's best checkpoint (checkpoint.keep_best)")
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--files", default="", help="comma-separated globs of CoNLL, JSONL or text files")
    given.add_argument("--text", default=None, help="the input itself: a sentence (or text) per line")
    parser.add_argument("--out", default="", help="file to write the predictions to (default: stdout)")
    parser.add_argument("--seq-len", type=int, default=0, help="sub-words per window (default: the run's)")
    parser.add_argument("--batch", type=int, default=0, help="windows or inputs per batch (default: the run's)")
    parser.add_argument("--tokenizer", default="", help="'byte' or a tokenizer directory (default: the source's)")
    args = parser.parse_args(argv)
    args.stride, args.split = 0, "val"  # what train.evaluate's setup reads
    return args


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.out and pathlib.Path(args.out).is_dir():
            raise ConfigError(f"--out '{args.out}' is a directory; give a file name")
        cli.start_jax()
        lines = predict(args)
        text = "".join(line + "\n" for line in lines)
        if args.out:
            pathlib.Path(args.out).write_text(text, encoding="utf-8")
            print(f"wrote {len(lines)} lines to {args.out}", file=sys.stderr, flush=True)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
