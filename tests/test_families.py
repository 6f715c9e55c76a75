"""Encoder (BERT) and encoder-decoder (T5) families: they train sharded, with the rules' shardings."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from cli_runs import REPO
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import build_model
from models.attention import relative_position_bucket
from sharding.mesh import make_mesh
from sharding.rules import RULES
from train.config.sections import ConfigError, MeshConfig, OptimizerConfig, load_config
from train.core.state import abstract_model, count_params, init_state, make_state_spec
from train.core.step import make_train_step
from train.data import objectives

STEPS, BATCH, SEQ = 20, 16, 32


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))


@pytest.fixture(scope="module")
def text() -> np.ndarray:
    """The first 8 KB of a play as byte ids."""
    path = min((REPO / "data" / "shakespeare").glob("*.txt"))
    return np.frombuffer(path.read_bytes()[:8192], np.uint8).astype(np.int32)


def model_config(name: str, **changes):
    return dataclasses.replace(load_config(REPO / "configs" / f"{name}.yaml").model, **changes)


def train(model_cfg, mesh, make_batch) -> tuple[list[float], object, object]:
    """``STEPS`` AdamW steps on ``make_batch(step)``; returns (losses, state, spec)."""
    optimizer = OptimizerConfig(lr=5e-3, warmup_steps=0, schedule="constant", weight_decay=0.0)
    spec = make_state_spec(model_cfg, optimizer, STEPS, mesh)
    state = init_state(spec, model_cfg, seed=0)
    step = make_train_step(spec, mesh, grad_accum=1)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, make_batch(i))
        losses.append(float(metrics["loss"]))
    return losses, state, spec


def jitted_forward(model_cfg):
    """``batch -> logits`` as numpy, on one device, for a fresh model of ``model_cfg``."""
    graphdef, params = nnx.split(build_model(model_cfg, seed=0))
    run = jax.jit(lambda p, batch: nnx.merge(graphdef, p).forward(batch))
    return lambda batch: np.asarray(run(params, {k: v for k, v in batch.items() if k not in ("targets", "weights")}))


def assert_loss_falls(losses: list[float], by: float) -> None:
    assert np.isfinite(losses).all(), losses
    assert np.mean(losses[-3:]) < losses[0] - by, losses


def expected_spec(logical: P) -> P:
    """The mesh PartitionSpec the rules table gives a parameter's logical axis names."""
    table = dict(RULES)
    return P(*(table[name] if name else None for name in logical))


def assert_shardings_follow_rules(state, spec) -> None:
    params = jax.tree.leaves(state.params)
    logical = jax.tree.leaves(spec.logical_specs, is_leaf=lambda x: isinstance(x, P))
    assert len(params) == len(logical)
    for x, names in zip(params, logical):
        assert len(names) == x.ndim, f"parameter of shape {x.shape} has logical names {names}"
        assert x.sharding.spec == expected_spec(names), (x.shape, names, x.sharding.spec)


def specs_by_path(state) -> dict[str, P]:
    """'stack/blocks/attn/q/kernel' -> the PartitionSpec of that parameter's array."""
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    return {"/".join(str(k.key) for k in path if hasattr(k, "key")): x.sharding.spec for path, x in flat}


# --- BERT -----------------------------------------------------------------------------------


def test_bert_masked_lm_trains_with_fsdp_and_tensor_parallel(mesh, text):
    cfg = model_config("tiny-bert")
    windows = text[: BATCH * SEQ].reshape(BATCH, SEQ)
    mask_id = 257  # the first id past the byte tokenizer's

    def batch(i):
        return objectives.masked_lm(windows, mask_id=mask_id, vocab_size=256, seed=(0, i))

    losses, state, spec = train(cfg, mesh, batch)
    assert_loss_falls(losses, by=1.5)
    assert_shardings_follow_rules(state, spec)
    specs = specs_by_path(state)
    assert specs["embed/embedding"] == P("tensor", "fsdp")
    assert specs["stack/blocks/attn/q/kernel"] == P(None, "fsdp", "tensor")
    assert specs["mlm/bias"] == P("tensor")
    assert specs["type_embed"] == P(None, "fsdp")


def test_bert_padding_changes_nothing_and_the_classifier_reads_cls():
    cfg = model_config("tiny-bert", head="classification", num_labels=3)
    forward = jitted_forward(cfg)
    pairs = [(np.arange(40, 50), np.arange(60, 66)), (np.arange(70, 75), np.arange(80, 83))]
    short = objectives.classification(pairs, [0, 2], seq_len=20, cls_id=258, sep_id=259)
    long = objectives.classification(pairs, [0, 2], seq_len=SEQ, cls_id=258, sep_id=259)
    logits = forward(short)
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(forward(long), logits, rtol=0, atol=1e-6)  # 12 more padding tokens
    unmasked = dict(long, attention_mask=np.ones_like(long["attention_mask"]))
    assert np.abs(forward(unmasked) - logits).max() > 1e-4  # (logits at init are ~0.01)


def test_mean_pooling_classifies_the_mean_of_the_real_tokens_whatever_the_padding():
    cfg = model_config("tiny-bert", head="classification", num_labels=3, pooling="mean")
    graphdef, params = nnx.split(build_model(cfg, seed=0))
    pairs = [(np.arange(40, 50), np.arange(60, 66)), (np.arange(70, 75), np.arange(80, 83))]
    short = objectives.classification(pairs, [0, 2], seq_len=20, cls_id=258, sep_id=259)
    long = objectives.classification(pairs, [0, 2], seq_len=SEQ, cls_id=258, sep_id=259)

    def run(batch):
        model = nnx.merge(graphdef, params)
        states = model.encode(batch["inputs"], batch["attention_mask"], batch["token_types"])  # [B, T, embed]
        return model.forward(batch), model.pool(states, batch["attention_mask"]), states

    logits, pooled, states = jax.jit(run)({k: v for k, v in short.items() if k not in ("targets", "weights")})
    mask = short["attention_mask"].astype(bool)
    for row in range(2):
        np.testing.assert_allclose(pooled[row], np.asarray(states)[row][mask[row]].mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(jitted_forward(cfg)(long), logits, rtol=0, atol=1e-6)


# --- T5 -------------------------------------------------------------------------------------


def test_t5_span_corruption_trains_with_fsdp_and_tensor_parallel(mesh, text):
    cfg = model_config("tiny-t5")
    raw, _ = objectives.span_corruption_lengths(SEQ)
    rows = text[: BATCH * raw].reshape(BATCH, raw)

    def batch(i):
        return objectives.span_corruption(rows, vocab_size=cfg.vocab_size, seed=(0, i), eos_id=256)

    assert batch(0)["encoder_inputs"].shape == (BATCH, SEQ)
    losses, state, spec = train(cfg, mesh, batch)
    assert_loss_falls(losses, by=1.5)
    assert_shardings_follow_rules(state, spec)
    specs = specs_by_path(state)
    assert specs["encoder_relpos/embedding"] == P(None, "tensor")
    assert specs["decoder/blocks/cross/k/kernel"] == P(None, "fsdp", "tensor")
    assert specs["head"] == P("fsdp", "tensor")


def test_t5_v1_0_ignores_encoder_padding_and_decodes_causally():
    cfg = model_config("tiny-t5", mlp="relu", tie_embeddings=True)
    forward = jitted_forward(cfg)
    pairs = [(np.arange(10, 30), np.arange(40, 48)), (np.arange(50, 55), np.arange(60, 70))]
    short = objectives.seq2seq(pairs, inputs_length=24, targets_length=12, eos_id=256)
    long = objectives.seq2seq(pairs, inputs_length=SEQ, targets_length=12, eos_id=256)
    logits = forward(short)
    assert logits.shape == (2, 12, cfg.vocab_size)
    np.testing.assert_allclose(forward(long), logits, rtol=0, atol=1e-6)
    later = dict(short, decoder_inputs=short["decoder_inputs"].copy())
    later["decoder_inputs"][:, 6:] = 7  # changing later decoder tokens leaves earlier logits alone
    changed = forward(later)
    np.testing.assert_allclose(changed[:, :6], logits[:, :6], rtol=0, atol=1e-6)
    assert not np.allclose(changed[:, 6:], logits[:, 6:], atol=1e-3)


def test_relative_buckets_are_t5s():
    # Hugging Face T5Attention._relative_position_bucket(rel, bidirectional, 32, 128).
    rel = [-1000, -128, -127, -64, -20, -16, -15, -9, -8, -7, -1, 0, 1, 7, 8, 9, 15, 16, 17, 64, 127, 128, 1000]
    encoder = [15, 15, 15, 14, 10, 10, 9, 8, 8, 7, 1, 0, 17, 23, 24, 24, 25, 26, 26, 30, 31, 31, 31]
    decoder = [31, 31, 31, 26, 17, 16, 15, 9, 8, 7, 1, 0] + [0] * 11
    np.testing.assert_array_equal(relative_position_bucket(np.array(rel), True, 32, 128), encoder)
    np.testing.assert_array_equal(relative_position_bucket(np.array(rel), False, 32, 128), decoder)


# --- presets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params",
    # Hugging Face's BertForMaskedLM / T5ForConditionalGeneration parameter counts.
    [("bert-base", 109_514_298), ("t5-small", 60_506_624), ("t5-base", 222_903_552)],
)
def test_presets_have_the_hugging_face_parameter_counts(name, params):
    _, abstract = abstract_model(load_config(REPO / "configs" / f"{name}.yaml").model)
    assert count_params(abstract) == params


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.position=learned", "does not fit model.family='encoder_decoder'"),
        ("model.head=classification", "needs family='encoder'"),
        ("model.relative_max_distance=8", "must exceed relative_buckets"),
    ],
)
def test_impossible_family_settings_fail_at_load_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny-t5.yaml", [override])
