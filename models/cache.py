"""The key/value cache that lets a model decode one token at a time.

A fixed-size functional cache: a pytree the model takes and returns (``DecoderLM(tokens, positions,
cache=cache)``, ``EncoderDecoderLM.decode(tokens, cache=cache)``), so a jitted loop carries it and
compiles once per (batch, cache length). Slots are written left to right from ``index``; a
slot's *position* (rope, learned table) is given separately, so left-padded prompts keep the
positions each prompt has alone. Arrays carry the activations' logical axes: batch over
``data``/``fsdp``, kv heads over ``tensor``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import DTYPES, constrain

CACHE_AXES = ("layers", "batch", "act_kv_heads", "length", None)  # k, v, cross_k, cross_v
VALID_AXES = ("batch", "length")


class KVCache(NamedTuple):
    """Keys and values of every layer of a stack, and where the next tokens go.

    k, v: [layers, B, kv_heads, S, head_dim] self-attention keys/values (rope applied): heads before
    slots, so a layer's keys are the [B, kv_heads, S, head_dim] operand attention multiplies by as
    they lie (slots before heads cost a transposing copy of the whole layer's cache per token).
    valid: bool [B, S], slots that hold a token (False: padding or not yet written).
    index: int32 [], the slot the next token is written to (the same for every row).
    cross_k, cross_v, cross_valid: an encoder-decoder's cross-attention keys/values
    [layers, B, kv_heads, S_enc, head_dim] of the encoder output, computed once, and its
    padding mask bool [B, S_enc]; None for decoder-only models.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    cross_k: jax.Array | None = None
    cross_v: jax.Array | None = None
    cross_valid: jax.Array | None = None

    @property
    def length(self) -> int:
        return self.k.shape[3]


def init_cache(cfg: ModelConfig, n_layers: int, batch: int, length: int) -> KVCache:
    """An empty cache of ``length`` slots for ``n_layers`` layers, in the compute dtype."""
    shape = (n_layers, batch, cfg.kv_heads, length, cfg.dim_per_head)
    zeros = constrain(jnp.zeros(shape, DTYPES[cfg.compute_dtype]), CACHE_AXES)
    valid = constrain(jnp.zeros((batch, length), bool), VALID_AXES)
    return KVCache(zeros, zeros, valid, jnp.zeros((), jnp.int32))


def write_slots(cache: KVCache, mask: jax.Array | None, t: int) -> tuple[KVCache, jax.Array]:
    """Marks the next ``t`` slots as holding tokens where ``mask`` [B, t] (1 = token) says so.

    Returns the cache with ``valid`` updated and the attention mask bool [B, 1, t, S]: the query
    in slot ``index + i`` may see the valid slots up to and including its own.
    """
    b, s = cache.valid.shape
    new = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
    valid = jax.lax.dynamic_update_slice(cache.valid, new, (0, cache.index))
    causal = jnp.arange(s)[None, :] <= (cache.index + jnp.arange(t))[:, None]  # [t, S]
    return cache._replace(valid=constrain(valid, VALID_AXES)), valid[:, None, None, :] & causal[None, None]


def advance(cache: KVCache, t: int) -> KVCache:
    """The cache after ``t`` tokens were written at ``index``."""
    return cache._replace(index=cache.index + t)
