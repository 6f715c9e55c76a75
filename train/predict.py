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
import dataclasses
import json
import pathlib
import sys

from train import cli
from train.config.sections import ConfigError
from train.config.validate import split_labels


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


def _lines(text: str, where: str) -> list[tuple[str, int]]:
    """(line, its number) of every non-blank line of ``text``; ConfigError when there is none."""
    lines = [(line.strip(), n) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ConfigError(f"{where} holds no input; give a sentence (or text) per line")
    return lines


def tagged_rows(args: argparse.Namespace, cfg, stdin) -> list:
    """The sentences to tag as rows (``cfg.tokens_field`` and, where the input has them, ``cfg.tags_field``)."""
    from train.data.conll import read_tagged_files
    from train.data.files import Row, match_files

    if args.files:
        return read_tagged_files(match_files(args.files, "--files"), cfg, need_tags=False)
    where = "--text" if args.text is not None else "stdin"
    text = args.text if args.text is not None else stdin.read()
    return [Row({cfg.tokens_field: line.split()}, where, n) for line, n in _lines(text, where)]


def texts(args: argparse.Namespace, cfg, stdin) -> list[str]:
    """The inputs of a sequence classifier."""
    from train.data.examples import field
    from train.data.files import match_files, read_rows, read_text

    if args.text is not None or not args.files:
        where = "--text" if args.text is not None else "stdin"
        return [line for line, _ in _lines(args.text if args.text is not None else stdin.read(), where)]
    out = []
    for path in match_files(args.files, "--files"):
        if path.endswith(".jsonl"):
            out += [field(row, cfg.text_field, "data.text_field") for row in read_rows([path])]
        else:
            out += [line for line, _ in _lines(read_text(path), f"data file '{path}'")]
    return out


def predict_tags(s, rows: list) -> list[str]:
    """CoNLL lines (``word [gold] pred``, '' after each sentence) of the rows' predicted tags."""
    from train.data.files import Row
    from train.evaluation import scoring

    d = s.config.data
    labels = split_labels(s.config.data.labels)
    with_gold = all(d.tags_field in r.record for r in rows)
    if not with_gold:  # placeholders: the words must carry some tag to be laid out; only predictions are read
        rows = [
            Row({**r.record, d.tags_field: [labels[0]] * len(r.record.get(d.tokens_field, []))}, r.path, r.line)
            for r in rows
        ]
    config = dataclasses.replace(s.config, data=dataclasses.replace(d, format="conll" if with_gold else d.format))
    gold, guessed, _, _ = scoring.tag_rows(dataclasses.replace(s, config=config), rows)
    out = []
    for row, g, p in zip(rows, gold, guessed):
        words = row.record[d.tokens_field]
        out += [f"{w} {a} {b}" if with_gold else f"{w} {b}" for w, a, b in zip(words, g, p)] + [""]
    return out


def predict_labels(s, inputs: list[str]) -> list[str]:
    """JSONL lines ``{"input", "label", "probabilities"}`` of a sequence classifier's predictions."""
    import numpy as np
    from flax import nnx

    from train.core.step import make_probability_step
    from train.data import examples, objectives
    from train.data.tasks import global_batch, process_rows
    from train.data.tokenizer import markers

    t, labels = s.config.train, split_labels(s.config.data.labels)
    m = markers(s.tokenizer)
    tokens = [ids[: t.seq_len] for ids in s.tokenizer.encode_batch(inputs)]
    arrays = objectives.classification(
        tokens, np.zeros(len(inputs)), seq_len=t.seq_len, pad_id=m.pad, cls_id=m.cls, sep_id=m.sep
    )
    graphdef, params = nnx.split(s.source.model)
    step = make_probability_step(graphdef, s.mesh, s.config.mesh.logical_rules)
    found = [
        np.asarray(step(params, global_batch(process_rows(b), s.mesh)))
        for b in examples.padded_batches(arrays, t.batch_size)
    ]
    probabilities = np.concatenate(found)[: len(inputs)]  # [N, num_labels]
    return [
        json.dumps(
            {
                "input": text,
                "label": labels[int(p.argmax())],
                "probabilities": {name: round(float(q), 6) for name, q in zip(labels, p)},
            }
        )
        for text, p in zip(inputs, probabilities)
    ]


def predict(args: argparse.Namespace, stdin=sys.stdin) -> list[str]:
    """The output lines for ``args``."""
    from train.evaluation.evaluating import setup

    s = setup(args)
    objective = s.config.train.objective
    if objective not in ("classification", "token_classification") or not split_labels(s.config.data.labels):
        raise ConfigError(f"'{args.source}' is not a classifier (objective {objective}); predict needs one")
    if objective == "token_classification":
        return predict_tags(s, tagged_rows(args, s.config.data, stdin))
    return predict_labels(s, texts(args, s.config.data, stdin))


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
