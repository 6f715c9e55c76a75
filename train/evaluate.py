"""``python -m train.evaluate SOURCE [--best] [--files F1,F2,...] [--seq-len N] [--stride N] [--batch N] [--split S]``

Scores a saved model (a run directory, an export directory or a Hugging Face model directory,
train/checkpoints/sources.py; a classifier export needs its label names: a run's, ``labels.json`` or
``id2label``) on text and prints one JSON line. ``--best``: a run's best checkpoint
(``checkpoint.keep_best``) instead of its newest step; the line then holds the checkpoint's ``step``.

- Causal LMs: every token of the files after the first is predicted exactly once, from
  windows of ``--seq-len`` tokens (documents packed with eos after each, as in training).
  Windows do not overlap by default; with ``--stride S`` (< seq-len) each window starts S
  tokens after the previous one and only its last S targets, the new ones, are scored, so
  every token sees at least ``seq_len - S`` tokens of context. Prints ``eval_loss``
  (nats/token), ``perplexity`` (exp of it), ``eval_bpb`` (bits per UTF-8 byte of exactly the
  tokens scored), ``tokens`` and ``bytes``.
- Masked LMs and T5 (span corruption): the run's objective on non-overlapping windows, with the
  trainer's fixed eval seed; ``eval_loss`` and ``perplexity`` over the ``tokens`` it scores.
- Classifiers: accuracy, macro-F1 and scikit-learn's per-class table on stdout, a confusion
  matrix PNG (``--out``, default the source directory), then the JSON line. Seq2seq: loss and
  token accuracy. Token classifiers: word accuracy, entity precision / recall / F1 (micro, exact
  spans), seqeval's per-entity-type table and scikit-learn's per-tag (token-level) table on stdout,
  then the JSON line (per type and ``token_macro_f1`` too); long sentences are scored in windows,
  every word once (``words_cut`` 0). ``--files`` may be CoNLL or JSONL.

Without ``--files`` a run is scored on its own validation split (``--split test``: its test
split, which training never reads). ``--tokenizer`` replaces the source's tokenizer (every export
carries its own). The model runs sharded over the devices as the run's mesh says (all devices
otherwise). User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from train import cli
from train.evaluation.evaluating import evaluate


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="run directory, export directory or Hugging Face model directory")
    parser.add_argument("--best", action="store_true", help="a run's best checkpoint (checkpoint.keep_best)")
    parser.add_argument(
        "--files", default="", help="comma-separated globs of files to score (default: the run's split)"
    )
    parser.add_argument(
        "--split", default="val", choices=["val", "test"], help="the run's split when --files is absent"
    )
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per window (default: the run's train.seq_len)")
    parser.add_argument(
        "--stride", type=int, default=0, help="causal LMs: tokens between window starts (default: seq-len)"
    )
    parser.add_argument("--batch", type=int, default=0, help="windows or examples per batch (default: the run's)")
    parser.add_argument("--tokenizer", default="", help="'byte' or a tokenizer directory (default: the source's)")
    parser.add_argument("--out", default="", help="directory for the confusion-matrix PNG (default: the source's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cli.start_jax()
        print(json.dumps(evaluate(args)), flush=True)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
