"""Packing on the data/train side (issue 18): what a packed row holds, what a packed step computes,
and that packed evaluation and resume are exact.

Tiny models (tiny-bert, tiny-t5, tiny-gpt2, fp32) on one CPU device (rows never share a segment, so
sharding them changes nothing; tests/test_packing_model.py runs packed rows on a sharded mesh); a
packed batch is compared with the same examples one per padded row, the way they were fed before packing.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import REPO, in_this_process
from test_token_classification import TRAIN as TAGGER
from test_token_classification import synthetic_rows

from sharding.mesh import make_mesh
from train.config.sections import load_config
from train.core.state import init_state, make_state_spec
from train.core.step import make_eval_step, make_predict_step, make_train_step
from train.data import chat, examples, objectives, packing, tagging
from train.data.files import Row
from train.data.tasks import global_batch, make_task, packs
from train.data.text import PackedTokens, eval_batches
from train.data.tokenizer import ByteTokenizer, markers
from train.evaluation.evaluators import make_evaluator
from train.run.loop import resolve_model

TOK = ByteTokenizer()
BATCH = 8  # rows
# the rows of the examples below: one shape per model, so the train steps of a model compile once
SEQ_LEN = 64  # BERT and GPT-2
T5_LENGTHS = (32, 8)  # encoder, decoder: span corruption's at train.seq_len=32, seq2seq's too
EOS = TOK.eos_id


# --- what the rows hold ---------------------------------------------------------------------


def test_padding_fraction_of_six_examples_packed_first_fit_and_padded():
    lengths = [5, 3, 8, 2, 6, 4]  # 28 tokens; rows of 8, two rows packed at a time
    arrays = objectives.classification([[7] * n for n in lengths], np.zeros(6), seq_len=8)
    packed, _ = packing.eval_batches(arrays, 2)
    # 8 rows open: [5 3] [8] [2 6] [4]
    assert [list(r[r > 0]) for b in packed for r in b["segment_ids"]] == [
        [1] * 5 + [2] * 3,
        [1] * 8,
        [1] * 2 + [2] * 6,
        [1] * 4,
    ]
    assert packing.padding_fraction(packed) == pytest.approx(1 - 28 / 32)  # 12.5%
    assert packing.padding_fraction(examples.padded_batches(arrays, 2)) == pytest.approx(1 - 28 / 48)  # 41.7%


def test_text_windows_number_documents_restart_positions_and_drop_the_cross_document_target():
    tokens = PackedTokens(["ab", "cde", "f"], TOK)  # a b E c d e E f E
    np.testing.assert_array_equal(tokens.starts, [0, 3, 7])
    (batch,) = eval_batches(tokens, 4, 2, max_batches=1, segments=True)
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 2]])  # a b E c | d e E f
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 1, 2, 0]])  # d: the window's start
    np.testing.assert_array_equal(batch["weights"], [[1, 1, 0, 1], [1, 1, 0, 1]])  # E -> next document: 0
    # bits per byte count the scored targets' bytes only: b, c, d, e, f and the eoses (no bytes)
    counted = PackedTokens(["ab", "cde", "f"], TOK, count_bytes=True)
    assert counted.target_bytes(4, 2) == 5 and counted.target_bytes(4, 2, segments=True) == 3


def test_masked_lm_masks_each_document_of_a_row_at_the_rate():
    tokens = np.arange(10, 50, dtype=np.int32)[None]  # 40 tokens: documents of 10, 25 and 5
    segments = np.repeat([1, 2, 3], [10, 25, 5])[None]
    batch = objectives.masked_lm(tokens, mask_id=3, vocab_size=64, seed=0, segment_ids=segments)
    assert [int(batch["weights"][0, segments[0] == s].sum()) for s in (1, 2, 3)] == [2, 4, 1]  # round(0.15 n)


def test_packing_is_on_by_default_for_every_objective_and_off_when_asked():
    assert all(
        packs(load_config(REPO / "configs" / name)) for name in ("tiny-bert.yaml", "tiny-gpt2.yaml", "tiny-t5.yaml")
    )
    assert not packs(load_config(REPO / "configs" / "tiny-t5.yaml", ["data.packing=false"]))


def _uncorrupted(inputs: np.ndarray, targets: np.ndarray, eos: int) -> list[int]:
    """One example's tokens again: each sentinel of its inputs replaced by the span after it in its targets."""
    spans, sentinel = {}, None
    for t in targets[:-1].tolist():
        sentinel, spans = (t, spans | {t: []}) if t >= 300 else (sentinel, spans)
        if t < 300:
            spans[sentinel].append(t)
    return [u for t in inputs[:-1].tolist() for u in (spans[t] if t >= 300 else [t])]


def test_span_corruption_corrupts_each_document_of_a_window_alone_with_its_own_sentinels():
    docs = [np.arange(10, 10 + n) for n in (40, 9, 19)]  # a window of 70: the end of one document, two whole ones
    tokens = np.concatenate([docs[0], [EOS], docs[1], [EOS], docs[2]]).astype(np.int32)
    segments = np.repeat([1, 2, 3], [41, 10, 19])
    batch = objectives.packed_span_corruption(tokens[None], segments[None], vocab_size=384, seed=4, eos_id=EOS)
    assert batch["encoder_inputs"].shape == (1, 64) and batch["targets"].shape == (1, 14)  # as one document's
    enc, dec = batch["encoder_segment_ids"][0], batch["decoder_segment_ids"][0]
    kept = [_uncorrupted(batch["encoder_inputs"][0][enc == s], batch["targets"][0][dec == s], EOS) for s in (1, 2, 3)]
    assert kept[:2] == [d.tolist() for d in docs[:2]]  # no span crosses a boundary, each document whole
    assert kept[2] == docs[2][: len(kept[2])].tolist() and len(kept[2]) > 0  # the last one cut to what fits
    for s in (1, 2, 3):
        assert batch["targets"][0][dec == s][0] == 383  # sentinels count down from the top in every document
        np.testing.assert_array_equal(batch["encoder_positions"][0][enc == s], np.arange((enc == s).sum()))
        mine = batch["decoder_inputs"][0][dec == s]
        np.testing.assert_array_equal(mine, np.concatenate([[0], batch["targets"][0][dec == s][:-1]]))
    np.testing.assert_array_equal(batch["weights"][0], dec > 0)
    # a window of one document is the row span_corruption gives it
    whole = np.arange(10, 80, dtype=np.int32)[None]
    alone = objectives.packed_span_corruption(whole, np.ones_like(whole), vocab_size=384, seed=4, eos_id=EOS)
    padded = objectives.span_corruption(whole, vocab_size=384, seed=4, eos_id=EOS)
    for key in ("encoder_inputs", "decoder_inputs", "targets", "weights"):
        np.testing.assert_array_equal(alone[key], padded[key])


# --- a packed step == its examples alone ----------------------------------------------------


def _words(rng, n) -> str:
    return " ".join("".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 6))) for _ in range(n))


def _setup(preset: str, *overrides: str):
    config = load_config(
        REPO / "configs" / preset, ["model.compute_dtype=float32", "mesh.data=1", "mesh.fsdp=1", *overrides]
    )
    model_cfg = resolve_model(config.model, TOK.vocab_size)
    return config, model_cfg, *_state(model_cfg, config.optimizer, config.mesh, config.seed)


@functools.cache
def _state(model_cfg, optimizer, mesh_config, seed):
    """(mesh, spec, initial state), built once for the tests of the same model."""
    mesh = make_mesh(mesh_config, jax.devices()[:1])
    spec = make_state_spec(model_cfg, optimizer, 10, mesh)
    return mesh, spec, init_state(spec, model_cfg, seed)


def _step_loss(spec, mesh, state, batch) -> float:
    """The loss of one train step on ``batch``, from a copy of ``state`` (the step donates its input)."""
    _, metrics = make_train_step(spec, mesh, 1)(jax.tree.map(jnp.copy, state), global_batch(batch, mesh))
    return float(metrics["loss"])


TAGGING = [
    "train.objective=token_classification",
    "model.head=token_classification",
    "model.num_labels=4",
    "data.format=jsonl",
]


def _example_arrays(objective: str):
    rng = np.random.default_rng(1)
    if objective == "token_classification":
        cut = [{k: r[k][: 2 + i % 4] for k in ("tokens", "tags")} for i, r in enumerate(synthetic_rows(24))]
        rows = [Row(r, "tagged.jsonl", i + 1) for i, r in enumerate(cut)]  # 2 to 5 words
        config, _, *rest = _setup("tiny-bert.yaml", *TAGGING)
        labels = examples.label_names(rows, config.data, tagged=True)
        return tagging.tagged_arrays(rows, config.data, labels, TOK, SEQ_LEN).arrays, rest
    if objective == "classification":
        texts = [TOK.encode(_words(rng, rng.integers(1, 6))) for _ in range(24)]
        m = markers(TOK)
        arrays = objectives.classification(
            texts, rng.integers(0, 3, 24), seq_len=SEQ_LEN, pad_id=m.pad, cls_id=m.cls, sep_id=m.sep
        )
        return arrays, _setup(
            "tiny-bert.yaml",
            "train.objective=classification",
            "model.head=classification",
            "model.num_labels=3",
            "data.format=jsonl",
        )[2:]
    if objective == "sft":
        records = [
            {"prompt": _words(rng, rng.integers(1, 4)), "completion": _words(rng, rng.integers(1, 4))}
            for _ in range(24)
        ]
        config, _, *rest = _setup("tiny-gpt2.yaml", "train.objective=sft", "data.format=jsonl")
        rows = [Row(r, "sft.jsonl", i + 1) for i, r in enumerate(records)]
        return chat.sft_arrays(rows, config.data, TOK, SEQ_LEN, "assistant")[0], rest
    pairs = [(TOK.encode(_words(rng, rng.integers(1, 5))), TOK.encode(_words(rng, 1))) for _ in range(24)]
    m = markers(TOK)
    inputs_length, targets_length = T5_LENGTHS
    arrays = objectives.seq2seq(
        pairs,
        inputs_length=inputs_length,
        targets_length=targets_length,
        eos_id=m.eos,
        pad_id=m.pad,
        decoder_start_id=m.pad,
    )
    return arrays, _setup("tiny-t5.yaml", "train.objective=seq2seq", "data.format=jsonl")[2:]


def _summed(spec, mesh, params, batches) -> tuple[float, float]:
    step = make_eval_step(spec, mesh)
    sums = [step(params, global_batch(b, mesh)) for b in batches]
    return sum(float(s) for s, _ in sums), sum(float(w) for _, w in sums)


@pytest.mark.parametrize("objective", ["token_classification", "classification", "seq2seq", "sft"])
def test_a_packed_train_step_loss_is_the_loss_of_its_examples_each_in_its_own_padded_row(objective):
    arrays, (mesh, spec, state) = _example_arrays(objective)
    packed, unpack = packing.eval_batches(arrays, BATCH)
    marks = unpack(
        [np.ones_like(b["targets"]) if i == 0 else np.zeros_like(b["targets"]) for i, b in enumerate(packed)]
    )
    members = np.flatnonzero(marks.reshape(len(marks), -1).max(axis=1))  # the examples of the first batch
    assert len(members) > BATCH  # more examples than rows: they really share rows
    alone = examples.padded_batches({k: v[members] for k, v in arrays.items()}, BATCH)
    total, weight = _summed(spec, mesh, state.params, alone)
    assert _step_loss(spec, mesh, state, packed[0]) == pytest.approx(total / weight, rel=1e-5)


def test_a_packed_causal_lm_step_loss_is_the_loss_of_each_documents_piece_in_its_own_row():
    rng = np.random.default_rng(2)
    docs = [_words(rng, rng.integers(1, 5)) for _ in range(80)]  # 3 to 30 bytes each
    _, _, mesh, spec, state = _setup("tiny-gpt2.yaml")
    (packed,) = eval_batches(PackedTokens(docs, TOK), SEQ_LEN, BATCH, max_batches=1, segments=True)
    alone = {k: np.zeros((0, SEQ_LEN), v.dtype) for k, v in packed.items() if k not in ("segment_ids", "positions")}
    for row in range(BATCH):
        for segment in np.unique(packed["segment_ids"][row]):
            mine = packed["segment_ids"][row] == segment
            for key, rows in alone.items():
                piece = np.zeros((1, SEQ_LEN), rows.dtype)
                piece[0, : mine.sum()] = packed[key][row, mine]
                alone[key] = np.concatenate([rows, piece])
    assert len(alone["inputs"]) > 2 * BATCH  # documents share rows
    n = len(alone["inputs"])
    alone = {k: np.concatenate([v, np.zeros((-n % BATCH, SEQ_LEN), v.dtype)]) for k, v in alone.items()}
    batches = [{k: v[b : b + BATCH] for k, v in alone.items()} for b in range(0, len(alone["inputs"]), BATCH)]
    total, weight = _summed(spec, mesh, state.params, batches)
    assert _step_loss(spec, mesh, state, packed) == pytest.approx(total / weight, rel=1e-5)


def test_a_packed_span_corruption_step_loss_is_the_loss_of_each_documents_example_in_its_own_padded_row():
    rng = np.random.default_rng(5)
    docs = [_words(rng, rng.integers(1, 6)) for _ in range(60)]  # 2 to 36 bytes each
    _, model_cfg, mesh, spec, state = _setup("tiny-t5.yaml", f"train.seq_len={T5_LENGTHS[0]}")
    window = objectives.raw_length("span_corruption", T5_LENGTHS[0], 0.15, 3.0) - 1
    (rows,) = eval_batches(PackedTokens(docs, TOK), window, BATCH, max_batches=1, segments=True)
    transform = objectives.text_objective(
        "span_corruption", vocab_size=model_cfg.vocab_size, eos_id=EOS, mask_id=0, seed=0, rate=0.15, noise_density=0.15, mean_span=3.0
    )  # fmt: skip
    packed = transform(rows, 0, 0)
    pairs = []
    for row in range(BATCH):
        enc, dec = packed["encoder_segment_ids"][row], packed["decoder_segment_ids"][row]
        for s in range(1, enc.max() + 1):  # each example as it is, eos included: seq2seq adds none
            pairs.append((packed["encoder_inputs"][row][enc == s], packed["targets"][row][dec == s]))
    assert len(pairs) > 2 * BATCH  # documents share rows
    alone = objectives.seq2seq(
        pairs, inputs_length=T5_LENGTHS[0], targets_length=packed["targets"].shape[1], eos_id=None
    )
    n = len(pairs)
    alone = {k: np.concatenate([v, np.zeros((-n % BATCH, *v.shape[1:]), v.dtype)]) for k, v in alone.items()}
    batches = [{k: v[b : b + BATCH] for k, v in alone.items()} for b in range(0, len(alone["targets"]), BATCH)]
    total, weight = _summed(spec, mesh, state.params, batches)
    assert _step_loss(spec, mesh, state, packed) == pytest.approx(total / weight, rel=1e-5)


# --- evaluation and resume stay exact -------------------------------------------------------


def _task(tmp_path, objective: str, packed: bool):
    rng = np.random.default_rng(3)
    data = tmp_path / f"{objective}.jsonl"
    if objective == "token_classification":
        rows = [
            r | {"tokens": r["tokens"][: 2 + i % 9], "tags": r["tags"][: 2 + i % 9]}
            for i, r in enumerate(synthetic_rows(64))
        ]
        argv = [*TAGGING, "data.group_field=doc"]
    else:
        rows = [
            {"text": _words(rng, rng.integers(1, 8)), "label": str(rng.integers(0, 3)), "doc": f"d{i // 4}"}
            for i in range(64)
        ]
        argv = [
            "train.objective=classification",
            "model.head=classification",
            "model.num_labels=3",
            "data.format=jsonl",
        ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        *argv,
        f"data.train_files={data}",
        "data.val_fraction=0.5",
        "train.batch_size=8",
        "train.seq_len=64",
        f"data.packing={packed}",
    ]
    config, model_cfg, mesh, spec, state = _setup("tiny-bert.yaml", *overrides)
    return make_task(config, model_cfg, TOK), mesh, spec, state


@pytest.mark.parametrize("objective", ["token_classification", "classification"])
def test_a_packed_evaluation_gives_every_example_the_predictions_and_scores_of_an_unpacked_one(tmp_path, objective):
    (padded, mesh, spec, state), (packed, *_) = _task(tmp_path, objective, False), _task(tmp_path, objective, True)
    assert len(packed.eval_set) < len(padded.eval_set)  # fewer rows to compute
    predict = make_predict_step(spec, mesh)
    predictions = [
        task.unpack([np.asarray(predict(state.params, global_batch(b, mesh))[2]) for b in task.eval_set])
        for task in (padded, packed)
    ]
    real = padded.val["attention_mask"] > 0 if objective == "token_classification" else slice(None)
    np.testing.assert_array_equal(predictions[0][real], predictions[1][real])  # on every token of every example
    unpacked = make_evaluator(padded, spec, mesh)(state.params)
    repacked = make_evaluator(packed, spec, mesh)(state.params)
    assert repacked.keys() == unpacked.keys()
    for key, value in unpacked.items():
        assert repacked[key] == pytest.approx(value, rel=1e-5), key


def test_a_packed_example_iterator_resumes_exactly_from_its_state():
    arrays = objectives.classification([[7] * (1 + i % 13) for i in range(40)], np.arange(40) % 3, seq_len=16)
    uninterrupted = examples.example_iterator(arrays, 4, seed=5, shuffle=True, packing=True)
    expected = [next(uninterrupted) for _ in range(12)]  # crosses epochs
    it = examples.example_iterator(arrays, 4, seed=5, shuffle=True, packing=True)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint keeps it
    restored = examples.example_iterator(arrays, 4, seed=5, shuffle=True, packing=True)
    restored.set_state(state)
    for want in expected[5:]:
        got = next(restored)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_packed_token_classification_run_stopped_and_continued_is_bitwise_the_uninterrupted_run(tmp_path):
    data = tmp_path / "tagged.jsonl"
    rows = [
        r | {"tokens": r["tokens"][: 2 + i % 9], "tags": r["tags"][: 2 + i % 9]}
        for i, r in enumerate(synthetic_rows(96))
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fast = ["optimizer.schedule=constant", "checkpoint.every=2", "train.log_every=1"]
    argv = [*TAGGER, *fast, f"data.train_files={data}"]
    ref = in_this_process([*argv, f"run.dir={tmp_path / 'ref'}", "train.steps=4"])
    stopped = in_this_process([*argv, f"run.dir={tmp_path / 'resumed'}", "train.steps=2"])
    resumed = in_this_process([*argv, f"run.dir={tmp_path / 'resumed'}", "train.steps=4"])
    assert ref.rc == stopped.rc == resumed.rc == 0, resumed.err[-2000:]
    assert "padding" in ref.out.splitlines()[0] and "(packed rows of whole examples)" in ref.out.splitlines()[0]
    assert "resumed from" in resumed.out
    assert list(resumed.losses()) == list(range(1, 5)) and resumed.losses() == ref.losses()  # exact, every step
