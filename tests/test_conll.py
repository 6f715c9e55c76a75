"""CoNLL column files: the reader and its tag schemes, one-line errors naming file:line, windows that
lose no word of a long sentence, the token-level report."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from cli_runs import REPO

from train.config.sections import ConfigError, DataConfig, load_config
from train.data import conll, windows
from train.data.files import Row
from train.data.tokenizer import load_tokenizer
from train.evaluation.report import token_report
from train.evaluation.scores import token_macro_f1

SAMPLE = REPO / "tests" / "data" / "sample.conll"
CONLL = DataConfig(format="conll")


def test_sample_reads_sentences_skips_docstart_and_rewrites_iob1_as_iob2():
    rows = conll.read_sentences([str(SAMPLE)], CONLL)
    assert [r.line for r in rows] == [3, 13, 16, 21]
    assert rows[0].record["tokens"][:3] == ["EU", "rejects", "German"]
    assert rows[0].record["tags"][:3] == ["B-ORG", "O", "B-MISC"]  # I-ORG / I-MISC start entities in IOB1
    assert rows[1].record["tags"] == ["B-PER", "I-PER"]
    # two adjacent LOC entities: IOB1 writes the second B-LOC, IOB2 both
    assert rows[3].record["tags"] == ["O", "B-ORG", "I-ORG", "O", "B-LOC", "B-LOC", "O", "O"]
    assert [r.record["doc"] for r in rows] == ["sample.conll:0"] * 3 + ["sample.conll:1"]
    assert conll.conll_labels(rows) == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-ORG", "I-PER"]


def test_auto_scheme_and_tag_column_with_tabs(tmp_path):
    assert conll.detect_scheme([["B-PER", "I-PER", "O"]]) == "iob2"
    assert conll.detect_scheme([["O", "I-PER"], ["B-PER"]]) == "iob1"
    assert conll.detect_scheme([["S-PER", "O"], ["B-LOC", "E-LOC"]]) == "bioes"
    path = tmp_path / "bioes.tsv"
    path.write_text("New\tB-LOC\tx\nYork\tE-LOC\tx\nis\tO\tx\n\nBob\tS-PER\tx\n")
    rows = conll.read_sentences([str(path)], DataConfig(format="conll", tag_column=1))
    assert [r.record["tags"] for r in rows] == [["B-LOC", "E-LOC", "O"], ["S-PER"]]  # BIOES kept as is


@pytest.mark.parametrize(
    "text, scheme, message",
    [
        ("a O\nb X O\n", "auto", "line 2: 3 columns where the file's first line has 2"),
        ("", "auto", "line 1: the file is empty"),
        ("a O\nb I-PER\n", "iob2", "line 2: 'I-PER' starts an entity, which IOB2 writes B-PER"),
        ("a O\nb PER\n", "auto", "line 2: tag 'PER' is not O or B-/I-TYPE"),
        ("a S-PER\nb I-PER\n", "bioes", "line 2: 'I-PER' follows 'S-PER', which BIOES does not allow"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, text, scheme, message):
    path = tmp_path / "bad.conll"
    path.write_text(text)
    with pytest.raises(ConfigError, match="bad.conll' " + message.replace("(", r"\(")):
        conll.read_sentences([str(path)], DataConfig(format="conll", tag_scheme=scheme))


def test_not_utf8_and_unknown_tags_name_their_line(tmp_path):
    path = tmp_path / "latin1.conll"
    path.write_bytes("a O\n\nb O\nM\u00fcller B-PER\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.conll' line 4 is not UTF-8"):
        conll.read_sentences([str(path)], CONLL)
    rows = conll.read_sentences([str(SAMPLE)], CONLL)
    with pytest.raises(ConfigError, match="sample.conll' line 5: tag 'B-MISC' is not in the label set"):
        conll.check_tags(rows, ["O", "B-ORG"])


# --- windows ------------------------------------------------------------------------------------


def test_window_plan_fits_the_room_overlaps_and_owns_every_word_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 9, size=rng.integers(1, 60))
        room = int(rng.integers(8, 40))
        plan = windows.plan_windows(counts, room, room // 4)
        owned = np.concatenate([np.arange(a, b) for _, _, a, b in plan])
        np.testing.assert_array_equal(owned, np.arange(len(counts)))  # a partition, in order
        for s, e, a, b in plan:
            assert s <= a <= b <= e and (e - s == 1 or np.minimum(counts, room)[s:e].sum() <= room)
        for (s, e, _, _), (s2, _, _, _) in itertools.pairwise(plan):
            assert s < s2 <= e and np.minimum(counts, room)[s2:e].sum() <= room // 4


def test_long_sentence_is_tagged_in_windows_with_every_word_predicted_once():
    tokenizer = load_tokenizer("byte")
    labels = ["O", "B-X", "I-X"]
    words = [f"w{i}" for i in range(40)]  # 40 words of 2-3 bytes + spaces: ~120 sub-words, seq_len 32
    tags = [labels[i % 3] if i % 3 != 2 or i % 6 == 2 else "O" for i in range(40)]
    rows = [Row({"tokens": words, "tags": tags}, "mem", 1), Row({"tokens": ["a", "b"], "tags": ["O", "B-X"]}, "mem", 2)]
    w = windows.windowed_arrays(rows, DataConfig(), labels, tokenizer, seq_len=32)
    n = len(w.arrays["targets"])
    assert n > 5 and w.words_cut == 0
    assert w.arrays["weights"].sum() == 42  # each word weighs once, over all windows
    perfect = w.arrays["targets"]  # a model that predicts every target
    gold, guessed = windows.word_tags(perfect, w, labels)
    assert gold == guessed == [tags, ["O", "B-X"]]
    flat = np.concatenate(w.positions)
    assert len(set(flat.tolist())) == 42 and (flat >= 0).all()


def test_document_context_fills_a_sentences_window_with_its_documents_neighbours_each_word_still_once():
    tokenizer, cfg = load_tokenizer("byte"), DataConfig(format="conll", document_context=True)
    rows = conll.read_sentences([str(SAMPLE)], cfg)  # doc 0: 3 sentences (9, 2, 2 words); doc 1: 1 (8 words)
    labels = conll.conll_labels(rows)
    w = windows.windowed_arrays(rows, cfg, labels, tokenizer, seq_len=64)
    texts = [tokenizer.decode([int(i) for i in ids if i < 256]) for ids in w.arrays["inputs"]]
    assert texts[1] == "to boycott British lamb . Peter Blackburn BRUSSELS 1996-08-22"  # before, own, after
    assert texts[0].endswith("lamb . Peter") and texts[3] == "The European Commission said Germany France disagree ."
    assert w.arrays["weights"].sum() == 21 and w.words_cut == 0  # context words weigh nothing
    gold, guessed = windows.word_tags(w.arrays["targets"], w, labels)
    assert gold == guessed == [r.record["tags"] for r in rows]
    alone = windows.windowed_arrays(rows, dataclasses.replace(cfg, document_context=False), labels, tokenizer, 64)
    assert tokenizer.decode([int(i) for i in alone.arrays["inputs"][1] if i < 256]) == "Peter Blackburn"
    with pytest.raises(ConfigError, match="data.document_context is for token_classification"):
        load_config(REPO / "configs" / "tiny-bert.yaml", ["data.document_context=true"])


# --- token-level report -----------------------------------------------------------------------


def test_token_report_matches_scikit_learn_with_a_micro_row():
    from sklearn.metrics import f1_score

    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    gold = [["O", "B-PER", "I-PER"], ["B-LOC", "O", "O"]]
    guessed = [["O", "B-PER", "O"], ["B-LOC", "B-PER", "O"]]
    found = token_report(gold, guessed, labels)
    flat_gold, flat_guessed = [t for row in gold for t in row], [t for row in guessed for t in row]
    expected = f1_score(flat_gold, flat_guessed, average="macro", labels=labels, zero_division=0)
    assert found.macro_f1 == pytest.approx(expected) == pytest.approx(token_macro_f1(gold, guessed, labels))
    lines = {
        line.split()[0] if "avg" not in line else line.rsplit("avg")[0].strip() + " avg": line
        for line in found.table.splitlines()
        if line.strip()
    }
    assert {"O", "B-PER", "I-PER", "B-LOC", "micro avg", "macro avg", "weighted avg"} <= set(lines)
    assert lines["micro avg"].split()[-4:] == ["0.667", "0.667", "0.667", "6"]  # 4 of 6 words right
    assert lines["I-PER"].split()[1:] == ["0.000", "0.000", "0.000", "1"]
