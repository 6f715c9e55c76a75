"""``models.dot_attention`` (``model.attention: recompute``, hand-written gradient) against
``jax.nn.dot_product_attention``: outputs and gradients, fp32 and bf16, every masking case."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


CASES = {  # name: (heads, kv_heads, key length, causal, key-padding mask, bias)
    "causal": (4, 4, T, True, False, False),
    "causal GQA": (4, 2, T, True, False, False),
    "multi-query": (4, 1, T, True, False, False),
    "bidirectional with key padding": (4, 4, T, False, True, False),
    "cross-attention with bias and padding": (4, 4, S, False, True, True),
    "causal GQA with bias": (4, 2, T, True, False, True),
}


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_jax_nn(case, dtype, tolerance):
    heads, kv_heads, s, causal, padded, biased = CASES[case]
    q, k, v, weights = inputs(heads, kv_heads, s, dtype)
    mask = (jnp.arange(s) < jnp.array([s, s - 3])[:, None])[:, None, None, :] if padded else None  # [B, 1, 1, S]
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
