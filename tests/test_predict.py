"""CoNLL data end to end: a tiny tagger trained on CoNLL files with sentences longer than seq_len,
evaluated (token-level table, no word cut) and its predictions written by ``train.predict`` from the
run, its export, its int8 export and its Hugging Face export; a tiny classifier's JSONL predictions."""

from __future__ import annotations

import contextlib
import io
import json
import math
import pathlib

import numpy as np
import pytest
from cli_runs import REPO, in_this_process

from train import evaluate, export, predict, quantize
from train.evaluation import evaluating

EPOCHS = 2  # 30 steps: entity F1 about 0.4 on the validation sentences
TAGGER = [
    "configs/tiny-bert.yaml",
    "train.objective=token_classification",
    "model.head=token_classification",
    "model.num_labels=5",
    "data.format=conll",
    "train.seq_len=32",  # byte sub-words: most sentences need two or more windows
    f"train.epochs={EPOCHS}",
    "train.batch_size=16",
    "train.log_every=4",
    "train.eval_every=0",
    "optimizer.lr=3e-3",
]


def conll_text(n: int, seed: int) -> str:
    """IOB1 sentences of 8-16 words: a capitalised word is a NAME, 'exit word.' a STAGE direction."""
    rng = np.random.default_rng(seed)
    lines = ["-DOCSTART- -X- O", ""]
    for _ in range(n):
        length, words = rng.integers(8, 17), []
        while len(words) < length:
            word = "".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 5)))
            kind = rng.integers(0, 4)
            if kind == 0:
                words.append((word.capitalize(), "I-NAME"))
            elif kind == 1:
                words += [("exit", "I-STAGE"), (word + ".", "I-STAGE")]
            else:
                words.append((word, "O"))
        lines += [f"{w}\tNN\t{t}" for w, t in words] + [""]
    return "\n".join(lines)


def cli(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    root = tmp_path_factory.mktemp("conll")
    (root / "train.conll").write_text(conll_text(96, 0))
    (root / "val.conll").write_text(conll_text(24, 1))
    files = [f"data.train_files={root / 'train.conll'}", f"data.val_files={root / 'val.conll'}"]
    run = in_this_process([*TAGGER, *files, f"run.dir={root / 'run'}"])
    assert run.rc == 0, run.err[-2000:]
    return root, run


def conlleval(lines: list[str]) -> float:
    """Entity F1 of ``word gold pred`` lines counted as conlleval counts (IOB: B- or a type change starts
    a chunk), written here without seqeval."""

    def chunks(tags: list[str]) -> set[tuple[int, int, str]]:
        found, start, kind = set(), None, None
        for i, tag in enumerate([*tags, "O"]):
            prefix, _, t = tag.partition("-")
            if start is not None and (prefix != "I" or t != kind):
                found.add((start, i, kind))
                start = None
            if prefix == "B" or (prefix == "I" and start is None):
                start, kind = i, t
        return found

    gold, guessed, sentence, k = set(), set(), [], 0
    for line in [*lines, ""]:
        if line.strip():
            sentence.append(line.split())
        elif sentence:  # a chunk is (sentence k, start, end, type)
            gold |= {(k, *c) for c in chunks([s[1] for s in sentence])}
            guessed |= {(k, *c) for c in chunks([s[2] for s in sentence])}
            sentence, k = [], k + 1
    right = len(gold & guessed)
    return 2 * right / (len(gold) + len(guessed)) if gold or guessed else 0.0


@pytest.mark.slow
def test_epochs_set_the_steps_and_the_labels_are_the_training_tags_o_first(tagger):
    from train.config.sections import load_config
    from train.run.loop import prepare

    _, run = tagger
    assert "labels O, B-NAME, B-STAGE, I-NAME, I-STAGE" in run.out  # IOB1 rewritten as IOB2

    assert "labels: O,B-NAME,B-STAGE,I-NAME,I-STAGE" in (run.dir / "config.yaml").read_text()
    setup = prepare(load_config(run.dir / "config.yaml"))
    assert setup.task.train_examples > 96  # long sentences: more windows than sentences
    assert setup.config.train.steps == math.ceil(EPOCHS * setup.task.train_examples / 16) == max(run.losses())
    last = run.evals()[-1]
    assert {"eval_token_macro_f1", "eval_entity_f1"} <= set(last)


@pytest.mark.slow
def test_evaluate_scores_every_word_once_and_prints_the_token_table(tagger, capsys):
    root, run = tagger
    result = evaluating.evaluate(evaluate.parse_args([str(run.dir)]))
    table = capsys.readouterr().out
    assert result["words_cut"] == 0 and result["words"] == sum(
        1 for line in (root / "val.conll").read_text().splitlines() if "\t" in line
    )
    last = run.evals()[-1]
    assert result["entity_f1"] == pytest.approx(last["eval_entity_f1"], abs=1e-9)
    assert result["token_macro_f1"] == pytest.approx(last["eval_token_macro_f1"], abs=1e-9)
    for row in ("O", "B-NAME", "I-STAGE", "micro avg", "macro avg", "weighted avg"):
        assert any(line.strip().startswith(row) for line in table.splitlines()), row


@pytest.mark.slow
def test_predictions_score_as_conlleval_counts_from_every_kind_of_source(tagger):
    root, run = tagger
    val = str(root / "val.conll")
    rc, _, err = cli(predict.main, [str(run.dir), "--files", val, "--out", str(root / "run.pred")])
    assert rc == 0, err
    lines = (root / "run.pred").read_text().splitlines()
    assert len([line for line in lines if line]) == sum(
        "\t" in line for line in pathlib.Path(val).read_text().splitlines()
    )
    assert all(len(line.split()) == 3 for line in lines if line)
    # the trainer's entity F1, which train.evaluate reports too (the test above)
    assert conlleval(lines) == pytest.approx(run.evals()[-1]["eval_entity_f1"], abs=1e-9)

    assert export.main([str(run.dir), str(root / "params")]) == 0
    assert json.loads((root / "params" / "labels.json").read_text())["id2label"]["0"] == "O"
    assert quantize.main([str(run.dir), str(root / "int8")]) == 0
    assert export.main([str(run.dir), str(root / "hf"), "--format", "hf"]) == 0
    assert json.loads((root / "hf" / "config.json").read_text())["id2label"]["4"] == "I-STAGE"
    for name in ("params", "int8", "hf"):
        out = root / f"{name}.pred"
        argv = [str(root / name), "--files", val, "--tokenizer", "byte", "--seq-len", "32", "--out", str(out)]
        rc, _, err = cli(predict.main, argv)  # the run's seq_len: the same windows
        assert rc == 0, err
        got, want = out.read_text().splitlines(), (root / "run.pred").read_text().splitlines()
        assert len(got) == len(want), name
        if name == "params":  # the same weights, the same compute dtype: the same tags
            assert got == want
        elif name == "hf":  # Hugging Face sources compute in bf16: a near-tie may flip a tag
            assert np.mean([a == b for a, b in zip(got, want)]) > 0.99


@pytest.mark.slow
def test_text_input_gives_word_and_tag_lines_and_bad_input_one_error_line(tagger):
    root, run = tagger
    rc, out, err = cli(predict.main, [str(run.dir), "--text", "Bob said hello\nexit abc."])
    assert rc == 0, err
    assert [len(line.split()) for line in out.splitlines()] == [2, 2, 2, 0, 2, 2, 0]
    assert out.splitlines()[0].startswith("Bob ")
    bad = root / "bad.conll"
    bad.write_text("Bob\tNN\tI-NAME\n\nzed\tNN\tB-ANIMAL\n")
    rc, _, err = cli(predict.main, [str(run.dir), "--files", str(bad)])
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "bad.conll' line 3: tag 'B-ANIMAL' is not in the label set" in err


@pytest.mark.slow
def test_a_val_tag_outside_the_training_tags_stops_training_naming_its_line(tagger):
    root, _ = tagger
    bad = root / "badval.conll"
    bad.write_text("Bob\tNN\tI-NAME\nran\tNN\tO\n\nzed\tNN\tI-ANIMAL\n")
    files = [f"data.train_files={root / 'train.conll'}", f"data.val_files={bad}"]
    run = in_this_process([*TAGGER, *files, f"run.dir={root / 'badrun'}"])
    assert run.rc == 2 and len(run.err.strip().splitlines()) == 1
    assert "badval.conll' line 4: tag 'B-ANIMAL' is not in the label set" in run.err


@pytest.mark.slow
def test_classifier_writes_jsonl_with_probabilities_from_run_and_export(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        {"text": " ".join(rng.choice(["aa", "bb"] if i % 2 else ["cc", "dd"], 6)), "label": "ab" if i % 2 else "cd"}
        for i in range(64)
    ]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "configs/tiny-bert.yaml",
        "train.objective=classification",
        "model.head=classification",
        "model.num_labels=2",
        "data.format=jsonl",
        f"data.train_files={tmp_path / 'cls.jsonl'}",
        "train.steps=2",  # what it predicts need not be right, only the same from the run and its export
        "train.eval_every=0",
        f"run.dir={tmp_path / 'run'}",
    ]
    assert in_this_process(argv).rc == 0
    assert export.main([str(tmp_path / "run"), str(tmp_path / "params")]) == 0
    outputs = []
    for source, extra in ((tmp_path / "run", []), (tmp_path / "params", ["--tokenizer", "byte"])):
        rc, out, err = cli(predict.main, [str(source), "--text", "aa bb aa\ncc dd cc", *extra])
        assert rc == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["input"] for r in records] == ["aa bb aa", "cc dd cc"]
        for r in records:
            assert set(r["probabilities"]) == {"ab", "cd"} and sum(r["probabilities"].values()) == pytest.approx(1)
            assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        outputs.append(records)
    assert outputs[0] == outputs[1]
