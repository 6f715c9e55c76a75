"""Sampling from a decoder-only model: temperature and top-k over a fixed-length window.

Each new token re-runs the model on the last ``window`` tokens (no KV cache): simple and
correct for the short samples the trainer prints.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "top_k"))
def _sample(graphdef, params, buffer, length, key, num_tokens: int, temperature, top_k: int):
    """buffer: int32[1, window] holding ``length`` prompt tokens (left-aligned)."""
    model = nnx.merge(graphdef, params)
    window = buffer.shape[1]

    def one(carry, key):
        buffer, length = carry
        logits = model(buffer)[0, length - 1].astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
        if top_k > 0:
            cutoff = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        token = jax.random.categorical(key, logits).astype(jnp.int32)
        full = length >= window  # slide the window left by one when it is full
        buffer = jnp.where(full, jnp.roll(buffer, -1, axis=1), buffer)
        position = jnp.minimum(length, window - 1)
        buffer = buffer.at[0, position].set(token)
        return (buffer, jnp.minimum(length + 1, window)), token

    _, tokens = jax.lax.scan(one, (buffer, length), jax.random.split(key, num_tokens))
    return tokens


def generate(
    graphdef,
    params,
    prompt: np.ndarray,
    num_tokens: int,
    window: int,
    *,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> np.ndarray:
    """Continues ``prompt`` (int32[P]) by ``num_tokens`` tokens; returns int32[num_tokens]."""
    prompt = np.asarray(prompt, np.int32)[-window:]
    if len(prompt) == 0:
        raise ValueError("generation needs a non-empty prompt")
    buffer = np.zeros((1, window), np.int32)
    buffer[0, : len(prompt)] = prompt
    tokens = _sample(graphdef, params, buffer, len(prompt), jax.random.PRNGKey(seed), num_tokens, temperature, top_k)
    return np.asarray(tokens)
