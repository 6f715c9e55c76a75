"""Scaled dot-product attention (``model.attention: recompute``) with a hand-written gradient.

As FlashAttention does, without the tiling: the forward keeps only each query row's log-sum-exp
and the backward recomputes the probabilities, so no [B, heads, T, S] array is saved for the
backward pass (a scanned stack would otherwise stack one per layer). Every matmul takes
compute-dtype operands with float32 accumulation (see ``models.layers.matmul``), and each key/value
head's query heads are folded into the rows of one batched matmul ([G*T, head_dim] per kv head),
so GQA needs no repeated keys and the products need no transposes of the [T, S] scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32
MASKED = -1e30  # score of a masked pair: its weight underflows to 0; a fully masked row stays finite


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    scale: float,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    dropout: tuple[float, jax.Array] | None = None,
) -> jax.Array:
    """q [B, T, heads, head_dim], k/v [B, S, kv_heads, head_dim] -> [B, T, heads, head_dim] in q's dtype.

    mask: bool broadcastable to [B, heads, T, S], True where a query may attend; bias: float
    [1 or B, heads, T, S] added to the scaled scores. ``causal`` lets query i see keys 0..i.
    dropout: (rate, key) drops attention probabilities (inverted dropout); the backward pass
    regenerates the same mask from the key instead of saving it.
    """
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    rows = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)  # [B, kv, G*T, hd]
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv, S, hd]
    mask = None if mask is None else _grouped(mask, kv, n, t, s)
    bias = None if bias is None else _grouped(bias, kv, n, t, s)
    rate, key = dropout if dropout is not None else (0.0, None)
    out = _attention(rows, keys, values, mask, bias, key, scale, causal, t, rate)  # [B, kv, G*T, hd]
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def _grouped(x: jax.Array, kv: int, n: int, t: int, s: int) -> jax.Array:
    """[B or 1, heads or 1, T or 1, S or 1] -> broadcastable to the [B, kv, G*T, S] scores."""
    if x.shape[1] == 1 and x.shape[2] == 1:  # the same for every head and query: broadcasts as it is
        return x
    if x.shape[1] == 1:  # the same for every head (a segment mask): its rows repeat for each group's heads
        return jnp.tile(x, (1, 1, n // kv, 1))  # [B, 1, G*T, S]
    x = jnp.broadcast_to(x, (x.shape[0], n, t, s))
    return x.reshape(x.shape[0], kv, (n // kv) * t, s)


def _scores(q, k, mask, bias, scale, causal, t):
    """float32 [B, kv, R, S] scores, scaled, biased and masked (row r is query r % T)."""
    scores = jnp.einsum("bkrd,bksd->bkrs", q, k, preferred_element_type=F32) * scale
    if bias is not None:
        scores = scores + bias
    if causal:
        sees = (jnp.arange(scores.shape[2]) % t)[:, None] >= jnp.arange(scores.shape[3])[None, :]
        scores = jnp.where(sees, scores, MASKED)
    if mask is not None:
        scores = jnp.where(mask, scores, MASKED)
    return scores


def _dropped(probs, key, rate):
    """Inverted dropout of float32 [B, kv, R, S] probabilities (or their gradient) with the mask of ``key``."""
    if key is None or rate == 0.0:
        return probs
    keep = jax.random.bernoulli(key, 1.0 - rate, probs.shape)
    return jnp.where(keep, probs / (1.0 - rate), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k, v, mask, bias, key, scale, causal, t, rate):
    return _forward(q, k, v, mask, bias, key, scale, causal, t, rate)[0]


def _forward(q, k, v, mask, bias, key, scale, causal, t, rate):
    scores = _scores(q, k, mask, bias, scale, causal, t)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = _dropped(weights / total, key, rate).astype(v.dtype)
    out = jnp.einsum("bkrs,bksd->bkrd", probs, v, preferred_element_type=F32).astype(q.dtype)
    return out, (q, k, v, mask, bias, key, out, peak + jnp.log(total))


def _backward(scale, causal, t, rate, residuals, d_out):
    q, k, v, mask, bias, key, out, lse = residuals
    probs = jnp.exp(_scores(q, k, mask, bias, scale, causal, t) - lse)  # float32 [B, kv, R, S]
    d_out = d_out.astype(q.dtype)
    # with dropout D (a mask / (1 - rate)): out = (P * D) v, so d P = D * (d_out v^T) and
    # sum_s P * dP = d_out . out per row, as without dropout
    d_probs = _dropped(jnp.einsum("bkrd,bksd->bkrs", d_out, v, preferred_element_type=F32), key, rate)
    row_dot = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1, keepdims=True)
    d_scores = probs * (d_probs - row_dot)  # gradient of the biased, scaled scores
    ds = d_scores.astype(q.dtype)
    dq = jnp.einsum("bkrs,bksd->bkrd", ds, k, preferred_element_type=F32) * scale
    dk = jnp.einsum("bkrs,bkrd->bksd", ds, q, preferred_element_type=F32) * scale
    dv = jnp.einsum("bkrs,bkrd->bksd", _dropped(probs, key, rate).astype(v.dtype), d_out, preferred_element_type=F32)
    d_bias = None
    if bias is not None:
        broadcast = tuple(i for i, (a, b) in enumerate(zip(d_scores.shape, bias.shape)) if b == 1 and a != 1)
        d_bias = jnp.sum(d_scores, axis=broadcast, keepdims=True).astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, d_bias, None


_attention.defvjp(_forward, _backward)
