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
import dataclasses
import json
import math
import pathlib
import sys
from typing import TYPE_CHECKING

from train import cli
from train.config.sections import Config, ConfigError
from train.config.validate import EXAMPLE_OBJECTIVES, PRETRAINING_OBJECTIVE

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from train.checkpoints.sources import Source
    from train.data.tokenizer import Tokenizer


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


@dataclasses.dataclass
class Setup:
    """What to score with: the source, its run config (or one made up for it) and the mesh."""

    source: Source
    config: Config  # the run's, or a default one, with the model and the train settings used here
    tokenizer: Tokenizer
    mesh: Mesh
    stride: int


def setup(args: argparse.Namespace) -> Setup:
    from sharding.rules import BATCH_AXES
    from train.checkpoints.sources import load_source, source_mesh, source_tokenizer
    from train.data.files import match_files

    if args.files:
        match_files(args.files, "--files")  # before the model loads
    mesh = source_mesh(args.source)
    source = load_source(args.source, mesh=mesh, best=args.best)
    tokenizer = source_tokenizer(source, args.tokenizer)
    run = source.run_config or Config()
    objective = run.train.objective if source.run_config else PRETRAINING_OBJECTIVE[source.config.family]
    if source.config.head != "lm" and source.run_config is None:
        if not source.labels:
            raise ConfigError(
                f"'{args.source}' is a classifier without label names (no run config.yaml, labels.json or "
                "id2label); export it from its run with python -m train.export"
            )
        objective = source.config.head
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, format="jsonl", labels=",".join(source.labels)))
    seq_len = args.seq_len or (run.train.seq_len if source.run_config else min(source.config.max_seq_len, 1024))
    if not 0 < seq_len <= source.config.max_seq_len:
        raise ConfigError(f"--seq-len={seq_len} must be in [1, {source.config.max_seq_len}] (the model's positions)")
    stride = args.stride or seq_len
    if not 0 < stride <= seq_len or (stride != seq_len and objective != "causal_lm"):
        raise ConfigError(f"--stride={args.stride} must be in [1, --seq-len={seq_len}], and is for causal LMs only")
    batch = args.batch or (run.train.batch_size if source.run_config else 8)
    dp = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if batch <= 0 or batch % dp:
        raise ConfigError(f"--batch={batch} must be a positive multiple of the {dp} data-parallel devices")
    train = dataclasses.replace(run.train, objective=objective, seq_len=seq_len, batch_size=batch)
    config = dataclasses.replace(run, model=source.config, train=train)
    return Setup(source, config, tokenizer, mesh, stride)


def documents(s: Setup, files: str, split: str) -> list[str]:
    """The documents of ``files`` (read as the run reads its data), else of the run's ``split``."""
    from train.data.files import match_files
    from train.data.text import documents_in, read_documents, test_documents

    if files:
        return [d.text for d in documents_in(match_files(files, "--files"), s.config.data)]
    _need_run(s, split)
    if s.config.data.format == "tfds":
        raise ConfigError("the run reads a TFDS dataset; pass --files with the text to score")
    if split == "test":
        return test_documents(s.config.data)
    val = read_documents(s.config.data)[1]
    if not val:
        raise ConfigError("the run holds out no validation documents (data.val_fraction=0); pass --files")
    return val


def rows(s: Setup, files: str, split: str) -> list:
    """The JSONL rows of ``files``, else of the run's ``split``."""
    from train.data.conll import read_tagged_files
    from train.data.examples import split_rows, test_rows
    from train.data.files import match_files, read_rows

    if files:
        paths = match_files(files, "--files")
        tagged = s.config.train.objective == "token_classification"
        return read_tagged_files(paths, s.config.data) if tagged else read_rows(paths)
    _need_run(s, split)
    return test_rows(s.config.data) if split == "test" else split_rows(s.config.data)[1]


def _need_run(s: Setup, split: str) -> None:
    if s.source.run_config is None:
        raise ConfigError(f"'{s.source.path}' is not a run directory, so it has no {split} split; pass --files")


def evaluate(args: argparse.Namespace) -> dict:
    """The JSON record for ``args``; classifiers also print their table and write the PNG."""
    from train.evaluation import scoring

    s = setup(args)
    if s.config.train.objective in EXAMPLE_OBJECTIVES:
        out = pathlib.Path(args.out) if args.out else s.source.path
        result = scoring.score_examples(s, rows(s, args.files, args.split), args.split, out)
    else:
        result = scoring.score_stream(s, documents(s, args.files, args.split))
    return {**result, "step": s.source.step} if args.best else result


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cli.start_jax()
        print(json.dumps(evaluate(args)), flush=True)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
