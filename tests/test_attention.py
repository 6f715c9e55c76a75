"""``models.dot_attention`` (``model.attention: recompute``, hand-written gradient) against
``jax.nn.dot_product_attention``: outputs and gradients, fp32 and bf16, every masking case."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import segment_mask
from models.dot_attention import dot_product_attention

B, T, S, D = 2, 16, 12, 8


def inputs(heads: int, kv_heads: int, s: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, T, heads, D), dtype)
    k = jax.random.normal(keys[1], (B, s, kv_heads, D), dtype)
    v = jax.random.normal(keys[2], (B, s, kv_heads, D), dtype)
    weights = jax.random.normal(keys[3], (B, T, heads, D), jnp.float32)  # a loss that weighs every output
    return q, k, v, weights


def value_and_grads(attend, q, k, v, weights, bias):
    def loss(q, k, v, bias):
        return jnp.sum(attend(q, k, v, bias).astype(jnp.float32) * weights)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = {  # name: (heads, kv_heads, key length, causal, mask: None / key padding / segment ids, bias)
    "causal": (4, 4, T, True, None, False),
    "causal GQA": (4, 2, T, True, None, False),
    "multi-query": (4, 1, T, True, None, False),
    "bidirectional with key padding": (4, 4, T, False, "padding", False),
    "cross-attention with bias and padding": (4, 4, S, False, "padding", True),
    "causal GQA with bias": (4, 2, T, True, None, True),
    "causal GQA over packed segments": (4, 2, T, True, "segments", False),
    "cross-attention over packed segments with bias": (4, 2, S, False, "segments", True),
}


def segment_ids(length: int) -> jax.Array:
    """[B, length]: two segments then padding (0) in row 0, two segments in row 1."""
    cut = length // 3
    rows = [[1] * cut + [2] * cut + [0] * (length - 2 * cut), [1] * (length - cut) + [2] * cut]
    return jnp.asarray(rows, jnp.int32)


def make_mask(kind: str | None, s: int) -> jax.Array | None:
    if kind == "padding":
        return (jnp.arange(s) < jnp.array([s, s - 3])[:, None])[:, None, None, :]  # [B, 1, 1, S]
    return None if kind is None else segment_mask(segment_ids(T), segment_ids(s))  # [B, 1, T, S]


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_jax_nn(case, dtype, tolerance):
    heads, kv_heads, s, causal, kind, biased = CASES[case]
    q, k, v, weights = inputs(heads, kv_heads, s, dtype)
    mask = make_mask(kind, s)
    bias = jax.random.normal(jax.random.PRNGKey(1), (1, heads, T, s), jnp.float32) if biased else None
    scale = D**-0.5

    def ours(q, k, v, bias):
        return dot_product_attention(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias)

    def reference(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal)

    (loss, grads), (ref_loss, ref_grads) = (value_and_grads(f, q, k, v, weights, bias) for f in (ours, reference))
    assert relative_error(loss, ref_loss) < tolerance
    for name, got, want in zip(("q", "k", "v", "bias"), grads, ref_grads):
        if want is not None:
            assert relative_error(got, want) < tolerance, name


def test_backward_keeps_inputs_output_and_row_statistics_but_no_scores():
    q, k, v, _ = inputs(4, 2, T, jnp.bfloat16)
    _, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, causal=True, scale=1.0), q, k, v)
    saved = [x.shape for x in jax.tree.leaves(vjp) if hasattr(x, "shape")]
    assert saved and all(shape[-1] in (D, 1) for shape in saved), saved  # [..., head_dim] or [..., 1]; scores end in S
