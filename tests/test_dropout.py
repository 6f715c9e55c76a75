"""Dropout (``model.dropout``, ``model.attention_dropout``): off without a key, deterministic per
(seed, step), independent of the mesh, exact across a resume, and of the right rate and scale."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import REPO, in_this_process
from flax import nnx

from models import abstract_model, build_model
from models.dot_attention import dot_product_attention
from models.layers import dropout
from sharding.mesh import make_mesh
from train.config.sections import ConfigError, MeshConfig, OptimizerConfig, load_config
from train.core.state import init_state, make_state_spec
from train.core.step import make_train_step

ON = {"dropout": 0.2, "attention_dropout": 0.2, "attention": "recompute"}
OFF = {"dropout": 0.0, "attention_dropout": 0.0, "attention": "recompute"}


def model_config(name: str, **changes):
    base = {"d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256, "compute_dtype": "float32"}
    return dataclasses.replace(load_config(REPO / "configs" / f"{name}.yaml").model, **{**base, **changes})


def batch_for(family: str, step: int = 0) -> dict:
    rng = np.random.default_rng(step)
    tokens = rng.integers(0, 256, (8, 17)).astype(np.int32)
    if family == "decoder":
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if family == "encoder":
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "attention_mask": np.ones((8, 16), np.int32)}
    return {"encoder_inputs": tokens[:, :-1], "decoder_inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef: nnx.GraphDef, params: nnx.State, inputs: dict, rng: jax.Array | None = None) -> jax.Array:
    return nnx.merge(graphdef, params).forward(inputs, rng=rng)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5"])
def test_forward_modes(name):
    """No key: dropout > 0 is exactly the model without dropout (and a key with rates 0 changes nothing);
    a key: different outputs, the same for the same key."""
    cfg = model_config(name, **ON)
    graphdef, params = nnx.split(build_model(cfg, seed=0))
    plain_graphdef, _ = abstract_model(dataclasses.replace(cfg, **OFF))  # the same weights, rates 0
    inputs = {k: v for k, v in batch_for(cfg.family).items() if k != "targets"}
    key = jax.random.key(3)
    plain = forward(plain_graphdef, params, inputs)
    np.testing.assert_array_equal(forward(graphdef, params, inputs), plain)
    np.testing.assert_array_equal(forward(plain_graphdef, params, inputs, key), plain)
    dropped = forward(graphdef, params, inputs, key)
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(forward(graphdef, params, inputs, key), dropped)
    assert np.abs(forward(graphdef, params, inputs, jax.random.key(4)) - dropped).max() > 1e-3


def test_attention_dropout_gradient():
    """The recompute attention's hand-written gradient with dropout equals autodiff of a plain softmax
    with the same mask (one query head per key head, so its [B, heads, T, S] layout is the mask's)."""
    b, t, n, d, rate = 2, 8, 2, 4, 0.3
    q, k, v = jax.random.normal(jax.random.key(0), (3, b, t, n, d))
    key = jax.random.key(7)

    def ours(q, k, v):
        return dot_product_attention(q, k, v, causal=True, scale=0.5, dropout=(rate, key))

    def reference(q, k, v):
        scores = jnp.einsum("bthd,bshd->bhts", q, k) * 0.5
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e30)
        keep = jax.random.bernoulli(key, 1 - rate, (b, n, t, t))
        probs = jnp.where(keep, jax.nn.softmax(scores, axis=-1) / (1 - rate), 0.0)
        return jnp.einsum("bhts,bshd->bthd", probs, v)

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(f):
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * jnp.arange(d)), (0, 1, 2))(q, k, v)

    (out, grads), (ref_out, ref_grads) = output_and_grads(ours), output_and_grads(reference)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for g_ours, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5)


def test_attention_dropout_needs_recompute():
    with pytest.raises(ConfigError, match="model.attention=recompute"):
        load_config(REPO / "configs" / "tiny-gpt2.yaml", ["model.attention_dropout=0.1"])
    with pytest.raises(ConfigError, match=r"model.dropout=1.0 must be in \[0, 1\)"):
        load_config(REPO / "configs" / "tiny-gpt2.yaml", ["model.dropout=1.0"])


def train_losses(cfg, mesh, seed=0, grad_accum=2, steps=3) -> list[float]:
    optimizer = OptimizerConfig(lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0)
    spec = make_state_spec(cfg, optimizer, steps, mesh)
    state = init_state(spec, cfg, seed=0)
    step = make_train_step(spec, mesh, grad_accum, seed)
    losses = []
    for i in range(steps):
        state, metrics = step(state, batch_for(cfg.family, i))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow
def test_train_steps_deterministic_and_mesh_independent():
    cfg = model_config("tiny-gpt2", **ON)
    data8 = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    dropped = train_losses(cfg, data8)
    assert train_losses(cfg, data8) == dropped
    alone = train_losses(cfg, one)
    np.testing.assert_allclose(alone, dropped, rtol=2e-5)
    assert train_losses(cfg, one, seed=1) != alone  # the other variants on one device: a cheaper compile
    plain = train_losses(dataclasses.replace(cfg, **OFF), one)
    assert all(abs(a - b) > 1e-4 for a, b in zip(alone, plain)), (alone, plain)


@pytest.mark.slow
def test_resume_with_dropout_is_exact(tmp_path):
    """Stopped at step 2 and continued to 4 == 4 straight, bitwise (grad_accum=2 on a data x fsdp x tensor mesh)."""
    preset = [
        "configs/tiny-gpt2.yaml", "model.dropout=0.1", "model.attention_dropout=0.1", "model.attention=recompute",
        "optimizer.schedule=constant", "optimizer.warmup_steps=2", "train.seq_len=32", "train.log_every=1",
        "train.eval_every=0", "train.sample_tokens=0", "checkpoint.every=2", "train.grad_accum=2",
        "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
    ]  # fmt: skip
    straight = in_this_process([*preset, f"run.dir={tmp_path / 'a'}", "train.steps=4"])
    in_this_process([*preset, f"run.dir={tmp_path / 'b'}", "train.steps=2"])
    resumed = in_this_process([*preset, f"run.dir={tmp_path / 'b'}", "train.steps=4"])
    assert straight.rc == resumed.rc == 0, (straight.err, resumed.err)
    assert "resumed from" in resumed.out
    after = lambda run: {s: v for s, v in run.losses().items() if s > 2}  # metrics.jsonl keeps steps 1-2 too
    assert after(resumed) == after(straight) and len(after(straight)) == 2


def test_hugging_face_configs_bring_their_dropout_rates(tmp_path):
    from models import hf

    gpt2 = {"model_type": "gpt2", "vocab_size": 256, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
    bert = {
        "model_type": "bert", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.15,
        "attention_probs_dropout_prob": 0.05,
    }  # fmt: skip
    t5 = {"model_type": "t5", "vocab_size": 256, "d_model": 32, "num_layers": 2, "num_heads": 4, "d_kv": 8, "d_ff": 64}
    for name, hf_config in {"gpt2": {**gpt2, "resid_pdrop": 0.2, "attn_pdrop": 0.05}, "bert": bert, "t5": t5}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(hf_config))
    cfg = hf.load_config(tmp_path / "gpt2")
    assert (cfg.dropout, cfg.attention_dropout, cfg.attention) == (0.2, 0.05, "recompute")
    cfg = hf.load_config(tmp_path / "bert")
    assert (cfg.dropout, cfg.attention_dropout, cfg.attention) == (0.15, 0.05, "recompute")
    cfg = hf.load_config(tmp_path / "t5")  # T5's dropout_rate (default 0.1) on both
    assert (cfg.dropout, cfg.attention_dropout, cfg.attention) == (0.1, 0.1, "recompute")
    cfg = hf.load_config(tmp_path / "gpt2", dropout=0.0, attention_dropout=0.0, attention="xla")
    assert (cfg.dropout, cfg.attention_dropout, cfg.attention) == (0.0, 0.0, "xla")
    with pytest.raises(hf.ConversionError, match="model.attention=recompute or model.attention_dropout=0"):
        hf.load_config(tmp_path / "gpt2", attention="xla")


def binomial_bound(rate: float, n: int) -> float:
    """Five standard deviations of the share of zeros among ``n`` values each dropped with ``rate``."""
    return 5 * np.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_zeroes_its_rate_and_scales_the_rest_by_one_over_one_minus_rate(rate):
    """The embedding, residual and adapter dropout (``models.layers.dropout``) on 2**16 nonzero values:
    the share of zeros is ``rate`` within five binomial standard deviations, and every kept value is
    ``x / (1 - rate)`` to the float32 rounding."""
    x = np.asarray(jax.random.uniform(jax.random.key(0), (256, 256), minval=0.5, maxval=1.5))
    out = np.asarray(dropout(jnp.asarray(x), rate, jax.random.key(1)))
    zeros = out == 0
    assert abs(zeros.mean() - rate) < binomial_bound(rate, x.size), zeros.mean()
    np.testing.assert_allclose(out[~zeros], x[~zeros] / np.float32(1 - rate), rtol=3e-7)  # XLA: x * (1 / (1 - p))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_attention_dropout_zeroes_its_rate_of_the_probabilities_and_scales_the_rest(rate):
    """With one-hot values (v[s] = e_s) the attention output is the dropped probability matrix itself:
    over [4, 64, 4, 64] = 2**16 probabilities the share of zeros is ``rate`` within five binomial
    standard deviations, and each kept probability is ``softmax / (1 - rate)``."""
    b, t, n = 4, 64, 4
    q, k = jax.random.normal(jax.random.key(0), (2, b, t, n, t))
    v = jnp.broadcast_to(jnp.eye(t)[None, :, None, :], (b, t, n, t))  # key s carries e_s
    out = np.asarray(dot_product_attention(q, k, v, causal=False, scale=0.125, dropout=(rate, jax.random.key(2))))
    probs = np.asarray(jax.nn.softmax(jnp.einsum("bthd,bshd->bths", q, k) * 0.125, axis=-1))  # [B, T, heads, S]
    zeros = out == 0
    assert abs(zeros.mean() - rate) < binomial_bound(rate, out.size), zeros.mean()
    np.testing.assert_allclose(out[~zeros], probs[~zeros] / (1 - rate), rtol=1e-5)
