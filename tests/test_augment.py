"""Data augmentation (train/data/augment.py): each operation's effect and rate on a fixed seed, tags
following their words, determinism per (seed, epoch, example), augmentation off == today's batches,
and a tiny augmented classification run that trains and resumes bitwise."""

from __future__ import annotations

import numpy as np
import pytest
from cli_runs import in_this_process
from test_finetune import CLASSIFY, assert_ok, labelled_rows, write_jsonl

from train.config.sections import AugmentConfig, ConfigError, DataConfig
from train.data import augment, examples, tagging
from train.data.files import Row
from train.data.tokenizer import load_tokenizer

WORDS = [f"w{i}" for i in range(2000)]
TAGS = [("B-X", "I-X", "O", "O")[i % 4] for i in range(2000)]


def test_each_operation_changes_about_its_probability_of_the_words():
    rng = np.random.default_rng(0)
    synonyms = {w: [w + "s"] for w in WORDS[::2]}  # every other word has one synonym
    words, tags = augment.synonym_replace(WORDS, TAGS, 0.5, synonyms, rng)
    replaced = [a != b for a, b in zip(words, WORDS)]
    assert sum(replaced) / 1000 == pytest.approx(0.5, abs=0.05)  # of the 1000 words that have a synonym
    assert all(w == WORDS[i] + "s" for i, w in enumerate(words) if replaced[i]) and not any(replaced[1::2])
    assert tags == TAGS

    words, tags = augment.random_insert(WORDS, TAGS, 0.2, {w: [w + "s"] for w in WORDS}, rng)
    assert (len(words) - 2000) / 2000 == pytest.approx(0.2, abs=0.03)
    assert [w for w in words if w in set(WORDS)] == WORDS  # the originals keep their order

    words, tags = augment.random_delete(WORDS, TAGS, 0.3, rng)
    assert len(words) / 2000 == pytest.approx(0.7, abs=0.03)
    assert words == [w for w in WORDS if w in set(words)]
    assert augment.random_delete(["only"], ["O"], 1.0, rng) == (["only"], ["O"])  # one word always stays

    words, tags = augment.random_swap(WORDS, TAGS, 0.1, rng)
    moved = sum(a != b for a, b in zip(words, WORDS))
    assert sorted(words) == sorted(WORDS) and 0.15 < moved / 2000 < 0.2  # ~2 words move per swap, some swaps undo
    assert augment.random_swap(WORDS, TAGS, 0.0, rng) == (WORDS, TAGS)


def test_tags_follow_their_words_and_inserted_words_continue_the_entity():
    tagged = dict(zip(WORDS, TAGS))
    cfg = AugmentConfig(swap=0.3, delete=0.2)
    words, tags = augment.augment(WORDS, TAGS, cfg, {}, augment.rng_for(0, 0, 0))
    assert words != WORDS and tags == [tagged[w] for w in words]
    words, tags = augment.random_insert(
        ["Enter", "Hamlet", "Prince"], ["O", "B-PER", "I-PER"], 1.0, {}, np.random.default_rng(0)
    )
    assert words == ["Enter", "Enter", "Hamlet", "Hamlet", "Prince", "Prince"]
    assert tags == ["O", "O", "B-PER", "I-PER", "I-PER", "I-PER"]


def test_same_seed_epoch_and_example_give_the_same_words_and_another_epoch_others():
    cfg = AugmentConfig(synonym=0.3, insert=0.1, swap=0.1, delete=0.1)
    synonyms = {w: [w + "a", w + "b"] for w in WORDS[:50]}

    def run(seed, epoch, example):
        return augment.augment(WORDS[:50], TAGS[:50], cfg, synonyms, augment.rng_for(seed, epoch, example))

    assert run(3, 1, 7) == run(3, 1, 7)
    assert run(3, 2, 7) != run(3, 1, 7) and run(3, 1, 8) != run(3, 1, 7) and run(4, 1, 7) != run(3, 1, 7)


def test_synonym_file_lines_and_its_errors(tmp_path):
    path = tmp_path / "syn.txt"
    path.write_text("# word synonyms\nhappy glad merry\n\nsad blue\nhappy jolly\n")
    assert augment.read_synonyms(str(path)) == {"happy": ["glad", "merry", "jolly"], "sad": ["blue"]}
    path.write_text("happy\n")
    with pytest.raises(ConfigError, match="line 1 names no synonym"):
        augment.read_synonyms(str(path))
    with pytest.raises(ConfigError, match="cannot be read"):
        augment.read_synonyms(str(tmp_path / "missing.txt"))


def take(it, k: int) -> list[dict]:
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("tagged", [False, True])
def test_zero_probabilities_through_the_per_example_path_are_todays_batches_bitwise(tagged):
    """The per-example path with nothing to do makes bitwise the rows of today's precomputed arrays
    (augmentation off keeps today's path itself: tasks.py passes no per_example)."""
    tokenizer, labels = load_tokenizer("byte"), ["B-X", "I-X", "O"]
    rows = [
        Row({"tokens": WORDS[i : i + 3 + i % 4], "tags": TAGS[i : i + 3 + i % 4], "text": " ".join(WORDS[i : i + 5]),
             "label": TAGS[i]}, "mem.jsonl", i + 1)
        for i in range(10)
    ]  # fmt: skip
    cfg = DataConfig(augment=AugmentConfig(synonym=0.0))
    if tagged:
        make = lambda r: tagging.tagged_arrays(r, cfg, labels, tokenizer, 24)
        arrays = make(rows).arrays
    else:
        make = lambda r: examples.classification_arrays(r, cfg, labels, tokenizer, 24)
        arrays = make(rows)
    maker = augment.example_maker(rows, cfg, 5, make, tagged)
    today = take(examples.example_iterator(arrays, 4, seed=5, shuffle=True), 6)
    per_example = take(examples.example_iterator(arrays, 4, seed=5, shuffle=True, per_example=maker), 6)
    for a, b in zip(today, per_example):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            assert a[k].dtype == b[k].dtype


def test_augmented_batches_resume_exactly_and_each_epoch_draws_afresh():
    tokenizer, labels = load_tokenizer("byte"), ["B-X", "I-X", "O"]
    rows = [Row({"text": " ".join(WORDS[i : i + 8]), "label": TAGS[i]}, "mem.jsonl", i + 1) for i in range(8)]
    cfg = DataConfig(augment=AugmentConfig(swap=0.3, delete=0.2))
    make = lambda r: examples.classification_arrays(r, cfg, labels, tokenizer, 32)
    arrays = make(rows)
    maker = augment.example_maker(rows, cfg, 1, make, False)
    it = examples.example_iterator(arrays, 4, seed=1, shuffle=False, per_example=maker)
    first = take(it, 1)
    state = it.get_state()
    rest = take(it, 3)
    again = examples.example_iterator(arrays, 4, seed=1, shuffle=False, per_example=maker)
    again.set_state(state)
    for a, b in zip(rest, take(again, 3)):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    # unshuffled: batches 0 and 2 hold examples 0-3 in epochs 0 and 1, augmented differently
    assert not np.array_equal(first[0]["inputs"], rest[1]["inputs"])
    np.testing.assert_array_equal(first[0]["targets"], rest[1]["targets"])
    assert not np.array_equal(first[0]["inputs"], arrays["inputs"][:4])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.augment.swap=1.5"], "data.augment.swap=1.5 is not a probability"),
        (["data.augment.synonym=0.1"], "data.augment.synonym > 0 needs data.augment.synonyms=FILE"),
        (["data.augment.delete=0.1", "train.objective=seq2seq"], "data.augment works on classification"),
    ],
)
def test_bad_augment_settings_are_one_line_errors(overrides, message):
    from train.config.sections import build_config, config_tree
    from train.config.validate import validate

    argv = ["train.objective=classification", "model.head=classification", *overrides]
    config = build_config(config_tree("configs/tiny-bert.yaml", argv))
    assert any(message in p for p in validate(config)), validate(config)


@pytest.mark.slow
def test_a_tiny_augmented_classification_run_trains_and_resumes_bitwise(tmp_path):
    data = f"data.train_files={write_jsonl(tmp_path / 'labelled.jsonl', labelled_rows(48))}"
    syn = tmp_path / "syn.txt"
    syn.write_text("".join(f"{w} {w[::-1]}\n" for r in labelled_rows(48) for w in r["text"].split()))
    aug = ["data.augment.swap=0.2", "data.augment.delete=0.1", "data.augment.insert=0.1",
           "data.augment.synonym=0.2", f"data.augment.synonyms={syn}"]  # fmt: skip
    plain = in_this_process([*CLASSIFY, data, "train.steps=2", f"run.dir={tmp_path / 'plain'}"])
    ref = in_this_process([*CLASSIFY, data, *aug, "train.steps=8", f"run.dir={tmp_path / 'ref'}"])
    stopped = in_this_process([*CLASSIFY, data, *aug, "train.steps=3", f"run.dir={tmp_path / 'resumed'}"])
    resumed = in_this_process([*CLASSIFY, data, *aug, "train.steps=8", f"run.dir={tmp_path / 'resumed'}"])
    assert_ok(plain, ref, stopped, resumed)
    assert "data: 36 train / 12 val examples" in ref.out  # 36 rows, batch 16: 8 steps are 3.5 epochs
    losses = list(ref.losses().values())
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    unaugmented = plain.losses()  # the first 2 steps without augmentation: other batches, other losses
    assert len(unaugmented) == 2 and all(loss != ref.losses()[step] for step, loss in unaugmented.items())
    assert resumed.losses() == ref.losses()  # exact float equality, every step


# --- back-translation ---------------------------------------------------------------------------


@pytest.mark.slow
def test_back_translation_runs_rows_through_two_t5_models_and_keeps_the_other_fields(tmp_path, capsys):
    import json

    import torch
    import transformers

    from models import hf
    from models.generate import generate
    from train.augment import main
    from train.data.tokenizer import ByteTokenizer

    t5 = {"vocab_size": 260, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}
    t5 |= {"relative_attention_num_buckets": 8, "decoder_start_token_id": 0, "feed_forward_proj": "relu"}
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        transformers.T5ForConditionalGeneration(transformers.T5Config(**t5)).save_pretrained(tmp_path / name)
    rows = [
        {"text": text, "label": i % 2} for i, text in enumerate(["To be", "or not to be", "that is", "the", "question"])
    ]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "back.jsonl"
    argv = [str(source), "--via", str(tmp_path / "a"), "--back", str(tmp_path / "b"), "--out", str(out)]
    argv += ["--tokenizer", "byte", "--batch-size", "2", "--max-new-tokens", "6", "--via-prefix", "en-de: "]
    assert main(argv) == 0
    assert "back-translated 5 rows" in capsys.readouterr().out

    byte = ByteTokenizer()

    def alone(model, text: str) -> str:  # one row at a time, unbatched: what each row must give
        tokens = list(generate(model, [byte.encode(text) + [byte.eos_id]], 6, eos_id=byte.eos_id, pad_id=0)[0])
        return byte.decode(tokens[: tokens.index(byte.eos_id)] if byte.eos_id in tokens else tokens)

    a, b = hf.load(tmp_path / "a")[0], hf.load(tmp_path / "b")[0]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in written] == [r["label"] for r in rows]
    assert [r["text"] for r in written] == [alone(b, alone(a, "en-de: " + r["text"])) for r in rows]

    bert = transformers.BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    transformers.BertForMaskedLM(bert).save_pretrained(tmp_path / "bert")
    capsys.readouterr()  # save_pretrained's progress bars
    assert main([*argv[:2], str(tmp_path / "bert"), *argv[3:]]) == 2
    assert main([*argv, "--field", "body"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "not a seq2seq (T5) one" in lines[0] and "has no string field 'body'" in lines[1]
