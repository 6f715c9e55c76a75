"""TFDS datasets: a local builder, streamed packing, resume, shards, eval, errors, end to end.

Two datasets are prepared once per module, offline, with ``python -m train.tfds_build``: five
short plays (array_record, read back through ``tfds.data_source``) and 60 JSONL lines of
varied length. The end-to-end runs (train, then stop-and-resume) run in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import grain
import numpy as np
import pytest
from cli_runs import REPO, in_this_process

from train.config.sections import ConfigError, DataConfig, load_config
from train.data import tfds_build
from train.data.pipeline import endless
from train.data.text import eval_batches
from train.data.tfds_source import as_text, open_tfds
from train.data.tokenizer import ByteTokenizer

PLAYS = REPO / "data" / "shakespeare"
TRAIN_PLAYS = ["comedy_of_errors", "midsummer_nights_dream", "cymbeline", "tempest"]
VAL_PLAY = "macbeth"
LINES = [f"line {i}: " + "to be or not " * (i % 7) + "!" * (i % 5) for i in range(60)]
VAL_LINES = [f"held out {i}: " + "so it goes " * i for i in range(1, 13)]
TOK = ByteTokenizer()

# The end-to-end runs: a constant schedule makes train.steps only say where to stop, so a run
# stopped at step 4 and continued to 8 must log the uninterrupted run's losses.
E2E = [
    "configs/tiny-gpt2.yaml",
    "data.format=tfds",
    "data.tfds_name=plays",
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=2",
    "train.seq_len=32",
    "train.log_every=1",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "checkpoint.every=4",
]


def build(data_dir: pathlib.Path, name: str, files: str, *extra: str) -> int:
    """``python -m train.tfds_build``'s exit status."""
    return tfds_build.main(["--name", name, "--data-dir", str(data_dir), "--files", files, *extra])


def build_lines(data_dir: pathlib.Path, name: str, *extra: str) -> int:
    """The JSONL lines as dataset ``name``: ``LINES`` train, ``VAL_LINES`` validation."""
    jsonl = ["--format", "jsonl", "--text-field", "body", "--val-files", str(data_dir / "val.jsonl")]
    return build(data_dir, name, str(data_dir / "*.jsonl"), *jsonl, *extra)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("tfds")
    files = ",".join(str(PLAYS / f"{p}.txt") for p in [*TRAIN_PLAYS, VAL_PLAY])
    assert build(root, "plays", files, "--val-files", str(PLAYS / f"{VAL_PLAY}.txt")) == 0
    (root / "lines.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in LINES))
    (root / "val.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in VAL_LINES))
    assert build_lines(root, "lines") == 0
    return root


@pytest.fixture(scope="module")
def lines(data_dir):
    return open_tfds(DataConfig(format="tfds", tfds_name="lines", tfds_data_dir=str(data_dir), text_field="text"))


def take(it, k: int) -> list[dict]:
    return [next(it) for _ in range(k)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("inputs", "targets"))


def stream(docs: list[str]) -> np.ndarray:
    """The documents' byte tokens, eos after each: int32[N]."""
    return np.concatenate([np.append(TOK.encode(d), TOK.eos_id) for d in docs])


# --- the local builder ----------------------------------------------------------------------


@pytest.mark.slow
def test_records_read_back_equal_the_source_texts_in_file_order(data_dir):
    corpus = open_tfds(DataConfig(format="tfds", tfds_name="plays:1.0.0", tfds_data_dir=str(data_dir)))
    plays = {p: (PLAYS / f"{p}.txt").read_text() for p in [*TRAIN_PLAYS, VAL_PLAY]}
    assert list(corpus.documents("train")) == [plays[p] for p in sorted(TRAIN_PLAYS)]
    assert list(corpus.documents("validation")) == [plays[VAL_PLAY]]
    assert corpus.num_records("train") == 4


@pytest.mark.slow
def test_builder_reports_bad_input_on_one_error_line(data_dir, tmp_path, capsys):
    assert build(tmp_path, "x", str(tmp_path / "none/*.txt")) == 2
    assert "error: --files=" in capsys.readouterr().err
    assert build(tmp_path, "Bad-Name", str(PLAYS / "tempest.txt")) == 2
    assert "is not a TFDS name; use lower_snake_case" in capsys.readouterr().err
    assert build(data_dir, "plays", str(PLAYS / "tempest.txt")) == 2
    assert "already holds a prepared dataset; delete it or pass another --version" in capsys.readouterr().err


# --- training batches -----------------------------------------------------------------------


@pytest.mark.slow
def test_batches_are_shifted_windows_of_the_documents_with_eos_between_them(lines):
    it = lines.train_iterator(TOK, seq_len=16, global_batch=4, seed=0, shuffle=False)
    batches = take(it, 40)  # 40 x 4 x 17 tokens: more than two passes over the 60 lines
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (4, 16) and b["inputs"].dtype == np.int32
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    windows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches])
    epoch = stream(LINES)  # unshuffled: the lines in order, again and again
    expected = np.tile(epoch, -(-windows.size // epoch.size))[: windows.size]
    np.testing.assert_array_equal(windows.reshape(-1), expected)


@pytest.mark.slow
def test_same_seed_gives_the_same_batches_and_another_seed_others(lines):
    a = take(lines.train_iterator(TOK, 16, 4, seed=1, shuffle=True), 10)
    assert same(a, take(lines.train_iterator(TOK, 16, 4, seed=1, shuffle=True), 10))
    assert not same(a, take(lines.train_iterator(TOK, 16, 4, seed=2, shuffle=True), 10))


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 3, 17])  # 0: no remainder, whose (-1, -1) slice JSON makes a list
def test_resume_from_state_after_k_batches_continues_bitwise_identical(lines, k):
    uninterrupted = take(lines.train_iterator(TOK, 16, 4, seed=5, shuffle=True), k + 12)
    it = lines.train_iterator(TOK, 16, 4, seed=5, shuffle=True)
    assert same(take(it, k), uninterrupted[:k])
    state = json.loads(json.dumps(it.get_state()))  # survives the checkpoint's JSON item
    assert len(json.dumps(state)) < 200
    restored = lines.train_iterator(TOK, 16, 4, seed=5, shuffle=True)
    restored.set_state(state)
    assert same(take(restored, 12), uninterrupted[k:])


@pytest.mark.slow
def test_resume_with_worker_processes_continues_bitwise_identical(lines):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs")
    it = lines.train_iterator(TOK, 16, 4, seed=5, shuffle=True, num_workers=2)
    try:
        take(it, 5)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 6)
    finally:
        it.iterator.close()
    restored = lines.train_iterator(TOK, 16, 4, seed=5, shuffle=True, num_workers=2)
    try:
        restored.set_state(state)
        assert same(take(restored, 6), expected)
    finally:
        restored.iterator.close()


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_records(lines, count):
    n = lines.num_records("train")
    shards = []
    for p in range(count):
        source = grain.MapDataset.source(lines.builder.as_data_source(split="train"))
        records = iter(endless(source, seed=4, shuffle=True, shard=(p, count)).map(as_text_field))
        shards.append([next(records) for _ in range(len(range(p, n, count)))])  # one epoch of the shard
    assert sorted(t for shard in shards for t in shard) == sorted(LINES)
    assert sum(len(s) for s in shards) == n


def as_text_field(record: dict) -> str:
    return as_text(record["text"])


@pytest.mark.slow
def test_each_process_packs_its_own_shard_and_resumes_from_its_own_position(lines):
    its = [lines.train_iterator(TOK, 16, 8, seed=3, shuffle=True, process_index=p, process_count=2) for p in (0, 1)]
    first = [take(it, 4) for it in its]
    assert first[0][0]["inputs"].shape == (4, 16) and not same(first[0], first[1])
    state = {"processes": [it.local_state() for it in its]}  # what get_state gathers across processes
    expected = [take(it, 5) for it in its]
    for p in (0, 1):
        restored = lines.train_iterator(TOK, 16, 8, seed=3, shuffle=True, process_index=p, process_count=2)
        restored.set_state(json.loads(json.dumps(state)))
        assert same(take(restored, 5), expected[p])
    single = lines.train_iterator(TOK, 16, 8, seed=3, shuffle=True)
    with pytest.raises(ConfigError, match="saved by 2 processes, and each process packs its own shard"):
        single.set_state(state)


# --- eval -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_uses_the_first_validation_documents_in_order(lines):
    tokens = lines.val_tokens(TOK, seq_len=8, batch_size=2, max_batches=3)  # needs 3 x 2 x 8 + 1 = 49 tokens
    assert tokens.num_tokens >= 49 and tokens.num_documents < len(VAL_LINES)
    np.testing.assert_array_equal(tokens.tokens, stream(VAL_LINES[: tokens.num_documents]))
    assert tokens.num_bytes == sum(len(t.encode()) for t in VAL_LINES[: tokens.num_documents])
    batches = eval_batches(tokens, 8, 2, 3)
    again = eval_batches(lines.val_tokens(TOK, 8, 2, 3), 8, 2, 3)
    assert len(batches) == 3 and same(batches, again)
    everything = lines.val_tokens(TOK, seq_len=64, batch_size=4, max_batches=100)
    assert everything.num_documents == len(VAL_LINES)  # the split runs out first: all of it
    with pytest.raises(ConfigError, match="data.tfds_val_split='validation' of 'lines' gives .* fewer than one eval"):
        lines.val_tokens(TOK, seq_len=512, batch_size=8, max_batches=1)


# --- bad input ------------------------------------------------------------------------------


def tfds_config(data_dir, **kw) -> DataConfig:
    return DataConfig(**{"format": "tfds", "tfds_data_dir": str(data_dir), "tfds_name": "lines", **kw})


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"tfds_name": "c4/en:3.1.0"}, r"TFDS dataset 'c4/en:3.1.0' is not prepared under data.tfds_data_dir='{dir}'"),
        ({"tfds_name": "lines:9.9.9"}, r"'lines:9.9.9' is not prepared under data.tfds_data_dir='{dir}'"),
        ({"tfds_name": "imdb_reviews"}, r"'imdb_reviews' is not prepared under data.tfds_data_dir='{dir}'"),
        ({"tfds_val_split": "test"}, r"data.tfds_val_split='test' is not a split of 'lines'; it has train, validation"),
        ({"tfds_train_split": "train[:0]"}, r"data.tfds_train_split='train\[:0\]' of 'lines' holds no records"),
        (
            {"text_field": "body"},
            r"data.text_field='body' is not a text feature of 'lines'; its text features are: text",
        ),
    ],
)
def test_bad_tfds_inputs_raise_config_errors_naming_the_fix(data_dir, kw, message):
    with pytest.raises(ConfigError, match=message.format(dir=data_dir)):
        open_tfds(tfds_config(data_dir, **kw))


@pytest.mark.slow
def test_a_gcs_data_dir_without_tensorflow_says_how_to_read_it(data_dir):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed (and would try the network)")
    with pytest.raises(ConfigError, match="cannot be read without tensorflow; mount the bucket with gcsfuse"):
        open_tfds(tfds_config(data_dir, tfds_name="c4/en:3.1.0", tfds_data_dir="gs://tfds-data/datasets"))


def test_missing_dataset_error_names_the_default_data_dir_and_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default"))
    with pytest.raises(ConfigError, match=f"under data.tfds_data_dir='{tmp_path}/default'.*python -m train.tfds_build"):
        open_tfds(DataConfig(format="tfds", tfds_name="plays"))


@pytest.mark.slow
def test_tfds_format_needs_a_name_and_tf_data_needs_tensorflow(data_dir, capsys):
    with pytest.raises(ConfigError, match="data.format=tfds needs data.tfds_name"):
        load_config(REPO / "configs" / "tiny-gpt2.yaml", ["data.format=tfds"])
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed")
    with pytest.raises(ConfigError, match=r"data.tfds_reader=tf_data needs TensorFlow; pip install -e '.\[tf\]'"):
        open_tfds(tfds_config(data_dir, tfds_reader="tf_data"))
    assert build(data_dir, "x", str(PLAYS / "tempest.txt"), "--file-format", "tfrecord") == 2
    assert "--file-format tfrecord needs TensorFlow; pip install -e '.[tf]'" in capsys.readouterr().err


@pytest.mark.slow
def test_tf_data_reader_feeds_tfrecord_datasets_into_the_same_packing(data_dir):
    pytest.importorskip("tensorflow")
    assert build_lines(data_dir, "lines_tf", "--file-format", "tfrecord") == 0
    with pytest.raises(ConfigError, match="is stored as tfrecord, which tfds.data_source cannot read"):
        open_tfds(tfds_config(data_dir, tfds_name="lines_tf"))
    corpus = open_tfds(tfds_config(data_dir, tfds_name="lines_tf", tfds_reader="tf_data"))
    windows = take(corpus.train_iterator(TOK, 16, 4, seed=0, shuffle=False), 30)
    tokens = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in windows]).reshape(-1)
    np.testing.assert_array_equal(tokens, np.tile(stream(LINES), 2)[: tokens.size])
    uninterrupted = take(corpus.train_iterator(TOK, 16, 4, seed=5, shuffle=True, process_index=1, process_count=2), 20)
    it = corpus.train_iterator(TOK, 16, 4, seed=5, shuffle=True, process_index=1, process_count=2)
    take(it, 7)
    restored = corpus.train_iterator(TOK, 16, 4, seed=5, shuffle=True, process_index=1, process_count=2)
    restored.set_state(json.loads(json.dumps({"processes": [{}, it.local_state()]})))
    assert same(take(restored, 13), uninterrupted[7:])
    val = corpus.val_tokens(TOK, 8, 2, 3)
    np.testing.assert_array_equal(val.tokens, stream(VAL_LINES[: val.num_documents]))


@pytest.mark.slow
def test_cli_reports_a_missing_dataset_on_one_line_before_writing_anything(data_dir, tmp_path, capsys):
    from train.__main__ import main

    run_dir = tmp_path / "run"
    argv = [
        "configs/tiny-gpt2.yaml",
        "data.format=tfds",
        "data.tfds_name=nope",
        f"data.tfds_data_dir={data_dir}",
        f"run.dir={run_dir}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TFDS dataset 'nope' is not prepared under") and err.count("\n") == 1
    assert not run_dir.exists()


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_tfds_run_trains_evaluates_and_resumes_exactly(data_dir, tmp_path):
    runs = [
        in_this_process([*E2E, f"data.tfds_data_dir={data_dir}", f"run.dir={tmp_path / name}", f"train.steps={steps}"])
        for name, steps in (("whole", 8), ("halves", 4), ("halves", 8))
    ]
    for run in runs:
        assert run.rc == 0, run.err[-3000:]
    whole, half, resumed = (run.metrics for run in runs)
    losses = {r["step"]: r["loss"] for r in whole if "loss" in r}
    evals = {r["step"]: r for r in whole if "eval_loss" in r}
    assert sorted(losses) == list(range(1, 9)) and sorted(evals) == [4, 8]
    assert all(np.isfinite(r["eval_bpb"]) and 0 < r["eval_bpb"] < 12 for r in evals.values())
    assert losses[8] < losses[1]
    assert {r["step"]: r["loss"] for r in half if "loss" in r} == {s: losses[s] for s in range(1, 5)}
    after = [r for r in resumed if r["step"] > 4]
    assert {r["step"]: r["loss"] for r in after if "loss" in r} == {s: losses[s] for s in range(5, 9)}
    assert [r for r in after if "eval_loss" in r] == [evals[8]]
