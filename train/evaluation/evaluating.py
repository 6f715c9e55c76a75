"""Scoring a model source on text or rows: the work of ``python -m train.evaluate`` (its --help says what is
scored for each kind of model). ``setup`` reads the source and settles the config, mesh and tokenizer that
``train.predict`` shares; ``evaluate`` returns the JSON record (train/evaluation/scoring.py scores)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
from typing import TYPE_CHECKING

from train.config.sections import Config, ConfigError
from train.config.validate import EXAMPLE_OBJECTIVES, PRETRAINING_OBJECTIVE

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from train.checkpoints.sources import Source
    from train.data.tokenizer import Tokenizer


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
        run = dataclasses.replace(
            run, data=dataclasses.replace(run.data, format="jsonl", labels=",".join(source.labels))
        )
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
