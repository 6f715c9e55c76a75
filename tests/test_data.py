"""Data pipeline: tokenizers, document split, packing, resumable per-process batches."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib

import numpy as np
import pytest
from cli_runs import REPO

from train import train_tokenizer
from train.config.sections import ConfigError, DataConfig
from train.data import bpe
from train.data.text import PackedTokens, eval_batches, read_documents, train_iterator
from train.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

PLAYS = str(REPO / "data" / "shakespeare" / "*.txt")
NUM_PLAYS = 37


class CountingTokenizer:
    """Document "n" -> ids 0..n-1, so a window's first id tells where it starts."""

    vocab_size, eos_id = 1 << 30, -1

    def encode_batch(self, texts):
        return [np.arange(int(t), dtype=np.int32) for t in texts]


def counting_tokens(n: int) -> PackedTokens:
    return PackedTokens([str(n)], CountingTokenizer())  # tokens 0..n-1, then eos


def take(it, k: int) -> list[dict]:
    return [next(it) for _ in range(k)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


def write_jsonl(path: pathlib.Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


# --- tokenizers -----------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_utf8_and_ignores_eos():
    tok = ByteTokenizer()
    text = "ROMEO.\nBut soft! — naïve 🌹"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([ids[:6], [tok.eos_id], ids[6:]])) == text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert [list(a) for a in tok.encode_batch(["ab", ""])] == [[97, 98], []]


def test_byte_tokenizer_packs_shakespeare_into_one_stream_with_an_eos_after_each_play():
    docs, _ = read_documents(DataConfig(train_files=PLAYS, val_fraction=0.0))
    packed = PackedTokens(docs, ByteTokenizer())  # its speed: benchmarks/data_packing.py
    assert packed.num_tokens == packed.num_bytes + NUM_PLAYS  # one eos per play
    assert packed.num_bytes > 4_500_000


def test_load_tokenizer_rejects_a_directory_without_a_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="is not 'byte' or a directory holding a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ConfigError, match="train.train_tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_bpe_training_is_deterministic_and_round_trips_through_auto_tokenizer(tmp_path):
    import transformers

    plays = sorted(glob.glob(PLAYS))[:3]
    bpe.train_bpe(plays, 512, str(tmp_path / "a"))
    bpe.train_bpe(plays[::-1], 512, str(tmp_path / "b"))
    a = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    b = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    assert a["model"]["vocab"] == b["model"]["vocab"] and a["model"]["merges"] == b["model"]["merges"]

    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert len(auto) == 512 and auto.eos_token == "<|endoftext|>"
    text = pathlib.Path(plays[0]).read_text()[:5000] + " ünïcödé ✓"
    assert auto.decode(auto(text, add_special_tokens=False)["input_ids"]) == text

    tok = load_tokenizer(str(tmp_path / "a"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 512
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text) / 1.5  # merges learned
    assert tok.decode(np.append(ids, tok.eos_id)) == text
    np.testing.assert_array_equal(tok.encode_batch([text, "x"])[0], ids)
    packed = PackedTokens(["to be", "or not"], tok)
    assert packed.tokens[len(tok.encode("to be"))] == tok.eos_id == packed.tokens[-1]


@pytest.mark.slow
def test_train_tokenizer_cli_reports_errors_on_one_line(tmp_path, capsys):
    assert train_tokenizer.main(["--files", str(tmp_path / "*.txt"), "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.startswith("error: --files pattern")
    args = ["--files", PLAYS, "--vocab-size", "100", "--out", str(tmp_path / "t")]
    assert train_tokenizer.main(args) == 2
    assert "error: vocab size 100 is below 257" in capsys.readouterr().err
    assert train_tokenizer.main(["--files", PLAYS, "--exclude", PLAYS, "--out", str(tmp_path / "t")]) == 2


# --- documents ------------------------------------------------------------------------------


def test_split_holds_out_whole_plays_deterministically():
    cfg = DataConfig(train_files=PLAYS, val_fraction=0.05)
    train, val = read_documents(cfg)
    plays = [pathlib.Path(p).read_text() for p in sorted(glob.glob(PLAYS))]
    assert len(val) == round(0.05 * NUM_PLAYS) == 2 and len(train) == NUM_PLAYS - 2
    assert sorted(train + val) == sorted(plays)  # whole documents, none lost or split
    assert read_documents(cfg) == (train, val)
    assert len(read_documents(dataclasses.replace(cfg, val_fraction=0.001))[1]) == 1  # at least one
    assert read_documents(dataclasses.replace(cfg, val_fraction=0.0))[1] == []


def test_held_out_plays_do_not_depend_on_the_working_directory(monkeypatch):
    _, val = read_documents(DataConfig(train_files=PLAYS))
    monkeypatch.chdir(REPO / "data")
    assert read_documents(DataConfig(train_files="shakespeare/*.txt"))[1] == val


def test_val_files_are_the_validation_set_and_leave_the_training_set():
    hamlet = str(REPO / "data" / "shakespeare" / "hamlet.txt")
    train, val = read_documents(DataConfig(train_files=PLAYS, val_files=hamlet, val_fraction=0.3))
    assert val == [pathlib.Path(hamlet).read_text()]
    assert len(train) == NUM_PLAYS - 1 and val[0] not in train


def test_jsonl_gives_one_document_per_line(tmp_path):
    rows = [{"text": f"doc {i}", "id": i} for i in range(20)]
    path = write_jsonl(tmp_path / "a.jsonl", rows[:10] + [""] + rows[10:])  # blank lines are skipped
    cfg = DataConfig(train_files=path, format="jsonl", val_fraction=0.1)
    train, val = read_documents(cfg)
    assert len(val) == 2 and sorted(train + val) == sorted(r["text"] for r in rows)
    body = write_jsonl(tmp_path / "b.jsonl", [{"body": "x y"}, {"body": "z"}])
    assert read_documents(DataConfig(train_files=body, format="jsonl", text_field="body", val_fraction=0)) == (
        ["x y", "z"],
        [],
    )


@pytest.mark.parametrize(
    "rows, format, message",
    [
        (None, "text", r"data.train_files='.*nothing/\*.txt' matches no file.*; point it at text files"),
        ([{"text": "a"}, "{not json"], "jsonl", r"data file '.*bad.jsonl' line 2 is not valid JSON"),
        ([{"text": "a"}, {"body": "b"}], "jsonl", r"line 2 has no field 'text'; set data.text_field"),
        ([{"text": ""}, {"text": ""}], "jsonl", "holds only empty documents"),
        ([{"text": "only one"}], "jsonl", "holds one document, too few to hold out whole documents"),
    ],
)
def test_bad_corpora_raise_config_errors_naming_the_fix(tmp_path, rows, format, message):
    path = str(tmp_path / "nothing" / "*.txt") if rows is None else write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=message):
        read_documents(DataConfig(train_files=path, format=format))


def test_empty_text_files_are_an_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ConfigError, match="holds only empty documents; point it at text"):
        read_documents(DataConfig(train_files=str(tmp_path / "*.txt"), val_fraction=0))


# --- packing and batches --------------------------------------------------------------------


def test_windows_shift_by_one_and_eos_follows_every_document():
    packed = PackedTokens(["abc", "de"], ByteTokenizer())
    assert list(packed.tokens) == [97, 98, 99, 256, 100, 101, 256]
    assert (packed.num_tokens, packed.num_bytes, packed.num_windows(2), packed.num_windows(3)) == (7, 5, 3, 2)
    windows = packed.windows(3)
    assert len(windows) == 2 and list(windows[0]) == [97, 98, 99, 256] and list(windows[1]) == [256, 100, 101, 256]
    (batch,) = eval_batches(packed, 3, 2, max_batches=5)
    assert batch["inputs"].tolist() == [[97, 98, 99], [256, 100, 101]]
    assert batch["targets"].tolist() == [[98, 99, 256], [100, 101, 256]]


def test_train_batches_are_shifted_windows_of_the_stream():
    docs, _ = read_documents(DataConfig(train_files=PLAYS, val_fraction=0.0))
    packed = PackedTokens(docs[:4], ByteTokenizer())
    batch = next(train_iterator(packed, 64, 8, seed=3, shuffle=True))
    assert batch["inputs"].shape == batch["targets"].shape == (8, 64) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    for row, target in zip(batch["inputs"], batch["targets"]):
        start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(packed.tokens, 64) == row, 1))[0])
        assert start % 64 == 0 and packed.tokens[start + 64] == target[-1]


def test_every_epoch_visits_every_window_once_in_a_new_order():
    packed = counting_tokens(20 * 4 + 1)  # 20 windows of 4 + 1 tokens
    it = train_iterator(packed, 4, 5, seed=7, shuffle=True)
    starts = np.concatenate([b["inputs"][:, 0] for b in take(it, 8)]) // 4  # 2 epochs
    epoch0, epoch1 = starts[:20], starts[20:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert list(epoch0) != list(epoch1) != list(range(20))
    unshuffled = train_iterator(packed, 4, 5, seed=7, shuffle=False)
    assert list(np.concatenate([b["inputs"][:, 0] for b in take(unshuffled, 8)]) // 4) == list(range(20)) * 2


def test_resume_from_state_continues_bitwise_identical():
    packed = counting_tokens(23 * 8 + 5)  # 23 windows: batches of 4 straddle epoch boundaries
    uninterrupted = take(train_iterator(packed, 8, 4, seed=11, shuffle=True), 30)
    for k in (0, 5, 17):
        it = train_iterator(packed, 8, 4, seed=11, shuffle=True)
        assert_same_batches(take(it, k), uninterrupted[:k])
        state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
        assert len(json.dumps(state)) < 100
        restored = train_iterator(packed, 8, 4, seed=11, shuffle=True)
        restored.set_state(state)
        assert_same_batches(take(restored, 30 - k), uninterrupted[k:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_single_process_global_batch(process_count):
    packed = counting_tokens(50 * 4 + 1)
    single = take(train_iterator(packed, 4, 8, seed=5, shuffle=True), 15)  # crosses two epochs
    per_process = [
        take(train_iterator(packed, 4, 8, seed=5, shuffle=True, process_index=p, process_count=process_count), 15)
        for p in range(process_count)
    ]
    for step, whole in enumerate(single):
        for key in ("inputs", "targets"):
            joined = np.concatenate([batches[step][key] for batches in per_process])
            np.testing.assert_array_equal(joined, whole[key])


def test_different_seeds_give_different_batches():
    packed = counting_tokens(64 * 4 + 1)
    a = next(train_iterator(packed, 4, 8, seed=0, shuffle=True))["inputs"]
    b = next(train_iterator(packed, 4, 8, seed=1, shuffle=True))["inputs"]
    assert not np.array_equal(a, b)


def test_train_iterator_rejects_batches_that_do_not_fit():
    packed = counting_tokens(10 * 4 + 1)  # 10 windows
    with pytest.raises(ConfigError, match="train.batch_size=6 does not split evenly over 4 processes"):
        train_iterator(packed, 4, 6, seed=0, shuffle=True, process_count=4)
    with pytest.raises(
        ConfigError,
        match=r"gives 10 windows of seq_len\+1=5 tokens, fewer than train.batch_size=16; lower train.seq_len",
    ):
        train_iterator(packed, 4, 16, seed=0, shuffle=True)


def test_eval_batches_are_the_first_windows_in_order_without_the_ragged_tail():
    packed = counting_tokens(11 * 4 + 3)  # 11 windows of 4 + 1
    batches = eval_batches(packed, 4, 3, max_batches=10)
    assert len(batches) == 3  # 11 // 3; the 2 leftover windows are dropped
    starts = np.concatenate([b["inputs"][:, 0] for b in batches])
    assert list(starts) == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert len(eval_batches(packed, 4, 3, max_batches=2)) == 2
    with pytest.raises(ConfigError, match="fewer than one eval batch of 12; hold out more documents"):
        eval_batches(packed, 4, 12, max_batches=10)
    with pytest.raises(ConfigError, match="validation corpus gives 0 windows"):
        eval_batches(PackedTokens([], ByteTokenizer()), 4, 1, max_batches=1)


@pytest.mark.slow
def test_num_workers_do_not_change_the_batches():
    if os.cpu_count() is None or os.cpu_count() < 2:
        pytest.skip("needs two CPUs")
    packed = counting_tokens(40 * 4 + 1)
    expected = take(train_iterator(packed, 4, 4, seed=2, shuffle=True), 12)
    it = train_iterator(packed, 4, 4, seed=2, shuffle=True, num_workers=2)
    try:
        assert_same_batches(take(it, 12), expected)
    finally:
        it.close()
