"""A classifier's predictions on files, text or stdin: the work of ``python -m train.predict`` (its --help gives
the input and output forms). Taggers: CoNLL lines scored as train/evaluation/scoring.py scores them; sequence
classifiers: JSONL lines with each label's probability."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from train.config.sections import ConfigError
from train.config.validate import split_labels


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
