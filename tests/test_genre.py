"""The genre task's data: the First Folio table, passages, and a split by whole plays."""

from __future__ import annotations

import collections
import json

import pytest
from cli_runs import REPO

from train.data import genre

PLAYS = REPO / "data" / "shakespeare"


@pytest.fixture(scope="module")
def split() -> tuple[list[dict], list[dict]]:
    return genre.build()


def test_the_table_gives_every_play_its_first_folio_genre():
    table = genre.read_table()
    assert set(table) == {p.name for p in PLAYS.glob("*.txt")}
    assert collections.Counter(table.values()) == {"comedy": 15, "tragedy": 12, "history": 10}
    assert table["troilus_and_cressida.txt"] == table["cymbeline.txt"] == "tragedy"
    assert table["pericles.txt"] == table["winters_tale.txt"] == table["tempest.txt"] == "comedy"
    assert table["henry_viii.txt"] == table["john.txt"] == "history"


def test_validation_is_whole_plays_two_from_each_genre_always_the_same(split):
    train, val = split
    train_plays, val_plays = {r["play"] for r in train}, {r["play"] for r in val}
    assert not train_plays & val_plays
    assert len(train_plays | val_plays) == 37
    per_genre = collections.Counter(genre.read_table()[p + ".txt"] for p in val_plays)
    assert per_genre == {"comedy": 2, "tragedy": 2, "history": 2}
    assert sorted(val_plays) == [
        "henry_iv_part_1", "henry_vi_part_1", "lear", "romeo_and_juliet", "twelfth_night", "winters_tale"
    ]  # fmt: skip
    assert genre.build() == split


def test_every_passage_lies_inside_its_own_play_and_carries_its_plays_label(split):
    table = genre.read_table()
    texts = {p.stem: p.read_text() for p in PLAYS.glob("*.txt")}
    for row in split[0] + split[1]:
        assert row["label"] == table[row["play"] + ".txt"]
        assert row["text"] in texts[row["play"]]  # never spans two plays
        assert 64 <= len(row["text"]) <= 256 or "\n" not in row["text"].strip()


def test_passages_skip_the_title_and_cast_list_and_cut_at_line_ends():
    text = (PLAYS / "hamlet.txt").read_text()
    cut = genre.passages(text, 256)
    assert cut[0].startswith("ACT I.")
    assert not any("HAMLET, PRINCE OF DENMARK" in p or "PERSONS REPRESENTED" in p for p in cut)
    lines = set(text.splitlines())
    assert all(line in lines for p in cut[:50] for line in p.splitlines())
    four, three = "a line\n" * 4, "a line\n" * 3  # 7 characters a line: four fill 28 of 32
    cut = genre.passages("Title\n\nACT I.\n" + "a line\n" * 10, 32)
    assert cut == ["ACT I.\n" + three.strip(), four.strip(), three.strip()]


@pytest.mark.slow
def test_the_command_writes_jsonl_and_names_the_majority_rate(tmp_path, capsys):
    assert genre.main(["--out", str(tmp_path), "--chars", "512", "--val-plays", "1"]) == 0
    out = capsys.readouterr().out
    val = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    label, rate = genre.majority_rate(val)
    assert f"always guessing '{label}' scores {rate:.1%} on val" in out
    assert len({r["play"] for r in val}) == 3


@pytest.mark.slow
def test_a_play_missing_from_the_table_is_one_error_line(tmp_path, capsys):
    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "hamlet.txt").write_text("ACT I.\nWho's there?\n")
    (plays / "cardenio.txt").write_text("ACT I.\nLost.\n")
    assert genre.main(["--out", str(tmp_path / "out"), "--plays", str(plays)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {plays / 'cardenio.txt'} has no genre in {genre.TABLE}; add a 'cardenio.txt<TAB>genre' row"]
