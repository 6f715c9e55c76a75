"""Packed rows (``segment_ids`` + per-segment ``positions``): every example gets the logits it has alone.

Per family (GPT-2: learned positions; Llama: GQA + RoPE; BERT with an LM head and each pooling of
the classification head; T5 v1.1) and per attention path that runs on CPU (``xla``, ``recompute``;
splash through Pallas interpret mode), on one device and on a data x fsdp x tensor mesh of the 8 fake
devices. fp32 throughout. A token-classification head and T5 v1.0 (ReLU, tied head) differ from these
only in per-token layers, which cannot mix segments.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import REPO
from flax import nnx

from models import abstract_model, build_model
from models.attention import segment_mask, segment_positions
from models.splash import splash_attention
from sharding.mesh import make_mesh
from sharding.rules import RULES, activation_context, batch_sharding, logical_to_mesh
from train.config.sections import MeshConfig, load_config
from train.data.tokenizer import ByteTokenizer
from train.run.loop import resolve_model

TOL = 1e-5
CASES = {  # name -> (preset, model changes)
    "gpt2": ("tiny-gpt2", {}),
    "llama": ("tiny-llama", {}),
    "bert-lm": ("tiny-bert", {}),
    "bert-cls": ("tiny-bert", {"head": "classification", "num_labels": 3}),
    "bert-mean": ("tiny-bert", {"head": "classification", "num_labels": 3, "pooling": "mean"}),
    "t5-v1.1": ("tiny-t5", {}),
}
# Three examples, each drawn from its own token range (so an embedding row belongs to one example),
# packed into 4 rows of 32 in different orders and offsets; padding is token 0, segment 0.
LENGTHS, TARGET_LENGTHS = (7, 4, 11), (5, 3, 6)  # T5: encoder / decoder lengths
RANGES = ((10, 60), (60, 110), (110, 160))
ROWS, ROW_LEN = ((0, 1, 2), (2, 0), (1,), (1, 2, 0)), 32


def model_config(name: str, attention: str = "xla"):
    preset, changes = CASES[name]
    cfg = resolve_model(load_config(REPO / "configs" / f"{preset}.yaml").model, ByteTokenizer.vocab_size)
    return dataclasses.replace(cfg, compute_dtype="float32", attention=attention, **changes)


def examples(lengths: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, n).astype(np.int32) for (lo, hi), n in zip(RANGES, lengths)]


def pack(seqs: list[np.ndarray]) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int, int]]]:
    """``ROWS`` of ``seqs`` -> (tokens, segment_ids, positions, pool_positions) and the placements
    (row, start, slot, example)."""
    tokens, ids, positions = (np.zeros((len(ROWS), ROW_LEN), np.int32) for _ in range(3))
    firsts = np.zeros((len(ROWS), max(map(len, ROWS))), np.int32)  # unused slots point at token 0
    placed = []
    for r, row in enumerate(ROWS):
        at = 0
        for slot, i in enumerate(row):
            n = len(seqs[i])
            tokens[r, at : at + n], ids[r, at : at + n], positions[r, at : at + n] = seqs[i], slot + 1, np.arange(n)
            firsts[r, slot] = at
            placed.append((r, at, slot, i))
            at += n
    return {"tokens": tokens, "segment_ids": ids, "positions": positions, "pool_positions": firsts}, placed


def batches(cfg) -> tuple[dict, list[dict], list[tuple[int, int, int, int]]]:
    """The packed batch of ``cfg``'s family, each example's batch alone, and the placements."""
    inputs = examples(LENGTHS, seed=0)
    packed, placed = pack(inputs)
    if cfg.family != "encoder_decoder":
        batch = {"inputs": packed["tokens"], "segment_ids": packed["segment_ids"], "positions": packed["positions"]}
        if cfg.head == "classification":
            batch["pool_positions"] = packed["pool_positions"]
        return batch, [{"inputs": x[None]} for x in inputs], placed
    targets = examples(TARGET_LENGTHS, seed=1)
    decoder, decoder_placed = pack(targets)
    batch = {
        "encoder_inputs": packed["tokens"],
        "encoder_segment_ids": packed["segment_ids"],
        "decoder_inputs": decoder["tokens"],
        "decoder_segment_ids": decoder["segment_ids"],
    }
    alone = [{"encoder_inputs": x[None], "decoder_inputs": y[None]} for x, y in zip(inputs, targets)]
    return batch, alone, decoder_placed


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef: nnx.GraphDef, params: nnx.State, *batches: dict) -> list[jax.Array]:
    """The logits of each batch, in one program."""
    model = nnx.merge(graphdef, params)
    return [model.forward(batch) for batch in batches]


@functools.cache
def reference(name: str):
    """(cfg, graphdef, params, each example's logits alone) of ``xla`` attention: the reference of every
    attention path (the seed, not the path, gives the parameters)."""
    cfg = model_config(name)
    graphdef, params = nnx.split(build_model(cfg, seed=0))
    _, alone, _ = batches(cfg)
    return cfg, graphdef, params, [np.asarray(logits) for logits in forward(graphdef, params, *alone)]


@functools.cache
def packed(name: str, attention: str) -> tuple[np.ndarray, np.ndarray]:
    """The packed batch's logits and the [vocab] sums of |d loss / d embedding row| for a loss on example 1's
    outputs, from one compiled forward and backward pass."""
    cfg = model_config(name, attention)
    graphdef, _ = abstract_model(cfg)
    params = reference(name)[2]  # the xla model's: the same seed-0 weights
    batch, _, placed = batches(cfg)
    lengths = TARGET_LENGTHS if cfg.family == "encoder_decoder" else LENGTHS
    lo, hi = RANGES[1]

    def loss(p):
        logits = nnx.merge(graphdef, p).forward(batch)
        if cfg.head == "classification":
            return sum(logits[r, slot].sum() for r, _, slot, i in placed if i == 1), logits
        # token logits: only example 1's vocabulary columns, so a tied head adds no other rows
        columns = slice(lo, hi) if cfg.head == "lm" else slice(None)
        return sum(logits[r, at : at + lengths[i], columns].sum() for r, at, _, i in placed if i == 1), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    return np.asarray(logits), np.abs(np.asarray(grads["embed"]["embedding"][...])).sum(axis=1)


def pieces(cfg, logits: np.ndarray, placed, lengths) -> list[tuple[int, np.ndarray]]:
    """(example, its logits) for every placement: the segment's rows of token logits, or its slot's."""
    if cfg.head == "classification":
        return [(i, logits[r, slot]) for r, _, slot, i in placed]
    return [(i, logits[r, at : at + lengths[i]]) for r, at, _, i in placed]


def check_packed_equals_alone(cfg, logits, alone_logits, placed):
    lengths = TARGET_LENGTHS if cfg.family == "encoder_decoder" else LENGTHS
    for i, piece in pieces(cfg, np.asarray(logits), placed, lengths):
        np.testing.assert_allclose(piece, alone_logits[i][0], atol=TOL, rtol=0)


# recompute (the hand-written gradient) on every case; xla only where its attention call differs: GQA +
# causal (llama), bidirectional (BERT, whose heads and pooling come after attention), cross-attention with
# a relative bias (T5). tests/test_attention.py compares the two paths' gradients over packed segments.
PATHS = [(n, "recompute") for n in CASES] + [(n, "xla") for n in ("llama", "bert-lm", "t5-v1.1")]


@pytest.mark.parametrize("name, attention", PATHS)
def test_packed_example_has_the_logits_it_has_alone(name, attention):
    cfg, _, _, alone_logits = reference(name)
    _, _, placed = batches(cfg)
    check_packed_equals_alone(cfg, packed(name, attention)[0], alone_logits, placed)


@pytest.mark.parametrize("name, attention", PATHS)
def test_a_segment_never_changes_another_segments_gradients(name, attention):
    """The gradient of a loss on example 1's outputs reaches the embedding rows of example 1's tokens only."""
    rows = packed(name, attention)[1]  # [vocab]
    assert rows[slice(*RANGES[1])].any()
    for other in (0, 2):
        assert not rows[slice(*RANGES[other])].any(), f"example {other} got a gradient from example 1's loss"


# rope with GQA (Llama); learned positions and mean pooling over a sharded batch (BERT); cross-attention (T5)
@pytest.mark.parametrize("name", ["llama", "bert-mean", "t5-v1.1"])
def test_packed_logits_are_the_same_on_a_data_fsdp_tensor_mesh(name):
    cfg, graphdef, params, alone_logits = reference(name)
    batch, _, placed = batches(cfg)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    with activation_context(mesh):
        sharded = jax.device_put(params, logical_to_mesh(nnx.get_partition_spec(params), mesh, RULES))
        logits = jax.jit(lambda p, b: nnx.merge(graphdef, p).forward(b))(
            sharded, jax.device_put(batch, batch_sharding(mesh))
        )
    assert len(logits.sharding.device_set) == 8
    check_packed_equals_alone(cfg, logits, alone_logits, placed)


def test_positions_restart_at_each_segment_when_omitted():
    ids = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 2, 2, 2, 2, 2, 0]])
    expected = [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 0, 1, 2, 3, 4, 0]]
    np.testing.assert_array_equal(segment_positions(ids), expected)
    cfg, graphdef, params, _ = reference("llama")
    batch, _, _ = batches(cfg)
    [derived] = forward(graphdef, params, {k: v for k, v in batch.items() if k != "positions"})
    tokens = batch["segment_ids"] > 0  # padding positions differ (the packer gives them 0)
    given = packed("llama", "xla")[0]
    np.testing.assert_allclose(np.asarray(derived)[tokens], given[tokens], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "bert-cls", "t5-v1.1"])
def test_without_segment_ids_the_outputs_are_unchanged(name):
    """An unpacked batch whose row is one segment gives the logits of the batch without ids."""
    cfg, graphdef, params, alone_logits = reference(name)
    _, alone, _ = batches(cfg)
    batch, plain = alone[2], alone_logits[2]
    ids = {k.replace("inputs", "segment_ids"): np.ones_like(v) for k, v in batch.items()}
    if cfg.head == "classification":
        ids = {"segment_ids": ids["segment_ids"], "pool_positions": np.zeros((1, 1), np.int32)}
    [with_ids] = forward(graphdef, params, batch | ids)
    np.testing.assert_allclose(np.asarray(with_ids).reshape(plain.shape), plain, atol=TOL, rtol=0)


def test_splash_kernel_keeps_segments_apart_as_the_xla_path_does():
    """The Pallas kernel (interpret mode on CPU) with SegmentIds == jax.nn.dot_product_attention with
    the segment mask, outputs and gradients; GQA, causal, one example per row."""
    rng = np.random.default_rng(0)
    b, t, heads, kv_heads, d = 1, 128, 4, 2, 32
    q = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32) for _ in range(2))
    ids = jnp.asarray(np.repeat([1, 2, 3, 0], [40, 50, 30, 8])[None], jnp.int32)

    def splash(q, k, v):
        return splash_attention(q, k, v, causal=True, scale=d**-0.5, segment_ids=(ids, ids), interpret=True)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(ids, ids), is_causal=True)

    weights = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(f):  # one program each: the output and the gradients of a weighted sum of it
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(weights)

    (out, grads), (want, want_grads) = output_and_grads(splash), output_and_grads(xla)
    np.testing.assert_allclose(out, want, atol=TOL, rtol=0)
    for ours, reference in zip(grads, want_grads):
        np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
