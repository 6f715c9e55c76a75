"""Post-training weight-only int8: symmetric, per output channel, dequantised on the fly.

A quantised model (``ModelConfig.quant='int8'``) is built as the float one, then every ``Dense``
whose path (``'stack/blocks/attn/q'``, joined by ``/``) does not match ``cfg.quant_skip`` is
swapped for a ``QDense``: ``kernel`` int8 [..., d_in, d_out] with the float kernel's logical axes
and ``scale`` float32 [..., d_out] with the same axes less the reduced input one (so
``('layers', 'embed', 'heads')`` -> ``('layers', 'heads')``), and the model shards as the float one.
With ``cfg.quant_embeddings`` every token table (``nnx.Embed``) becomes a ``QEmbed`` too: int8
``table`` [vocab, embed] with a float32 ``scale`` per row [vocab] (axes ``('vocab',)``), which is also
per output channel of a tied LM head. Untied LM heads, position tables, norms and biases stay float.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.layers import Dense, adapter, matmul

QMAX = 127  # symmetric int8: [-127, 127], so 0 is exact and the range is the same both ways


def quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [..., d_in, d_out] float -> (q int8 [..., d_in, d_out], scale float32 [..., d_out]).

    scale = absmax over d_in / 127 (1 for an all-zero channel), q = round(w / scale), so
    |w - q * scale| <= scale / 2 for every element.
    """
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(absmax > 0, absmax / QMAX, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """(q int8 [..., d_in, d_out], scale [..., d_out]) -> float32 [..., d_in, d_out]."""
    return q.astype(jnp.float32) * scale[..., None, :]


class QDense(nnx.Module):
    """``Dense`` with an int8 kernel: ``(x @ kernel) * scale + bias``.

    The int8 kernel is cast to the compute dtype inside the jitted matmul (exact: bf16 holds every
    integer up to 256) and the per-channel scale multiplies the float32 product, which equals
    ``x @ (kernel * scale)``; the weights stay int8 in memory. LoRA adapters (``models.lora``,
    QLoRA) add their float update as on a ``Dense`` (``models.layers.adapter``).
    """

    lora_a = lora_b = None  # [d_in, r], [r, d_out] when models.lora attaches them

    def __init__(self, dense: Dense):
        kernel = dense.kernel
        axes = kernel.get_metadata().get("out_sharding")
        q, scale = quantize(kernel[...])
        self.kernel = nnx.Param(q, out_sharding=axes, eager_sharding=False)
        scale_axes = None if axes is None else tuple(axes[:-2]) + (axes[-1],)
        self.scale = nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False)
        self.bias = dense.bias
        self.dtype = dense.dtype

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x [..., d_in] -> [..., d_out]; rng: the adapters' dropout key (None: off)."""
        x = x.astype(self.dtype)
        y = adapter(self, x, matmul(x, self.kernel[...].astype(self.dtype)) * self.scale[...], rng)  # [..., d_out] f32
        if self.bias is not None:
            y = y + self.bias[...]
        return checkpoint_name(y.astype(self.dtype), "projection")


class QEmbed(nnx.Module):
    """``nnx.Embed`` with an int8 table: ``tokens [...] -> table[tokens] * scale[tokens]`` [..., embed].

    ``embedding`` is the dequantised float32 table [vocab, embed], for the tied LM heads that read
    ``embed.embedding[...]`` (a jax array indexes with ``[...]`` as a Param does); it is computed
    inside the jitted forward, so only the int8 table and its scales are kept.
    """

    def __init__(self, embed: nnx.Embed):
        axes = embed.embedding.get_metadata().get("out_sharding")
        q, scale = quantize(embed.embedding[...].T)  # per row: the rows are the output channels of w.T
        self.table = nnx.Param(q.T, out_sharding=axes, eager_sharding=False)
        self.scale = nnx.Param(scale, out_sharding=None if axes is None else (axes[0],), eager_sharding=False)
        self.dtype = embed.dtype

    @property
    def embedding(self) -> jax.Array:
        return dequantize(self.table[...].T, self.scale[...]).T

    def __call__(self, tokens: jax.Array) -> jax.Array:
        rows = self.table[...][tokens].astype(jnp.float32) * self.scale[...][tokens][..., None]
        return rows.astype(self.dtype)


def quantize_model(model: nnx.Module, skip: str = "", embeddings: bool = False) -> list[str]:
    """Swaps in place every ``Dense`` (and with ``embeddings`` every ``nnx.Embed``) of ``model`` whose
    path does not match the regex ``skip`` (``re.search``; '' skips none) for its int8 twin; returns
    the quantised paths."""
    pattern = re.compile(skip) if skip else None
    kinds = {Dense: QDense, nnx.Embed: QEmbed} if embeddings else {Dense: QDense}
    done = []
    for path, module in list(nnx.iter_modules(model)):
        name = "/".join(str(p) for p in path)
        twin = kinds.get(type(module))
        if twin is None or (pattern is not None and pattern.search(name)):
            continue
        parent = model
        for p in path[:-1]:
            parent = getattr(parent, p) if isinstance(p, str) else parent[p]
        setattr(parent, path[-1], twin(module))
        done.append(name)
    return done


def dequantize_params(flat: dict[tuple, jax.Array]) -> dict[tuple, jax.Array]:
    """Flat parameters of a quantised model (path tuple -> array) -> those of its float twin: each int8
    ``kernel`` and its ``scale`` become the float32 ``kernel`` q * scale, each int8 ``table`` and its
    ``scale`` the ``embedding`` (one scale per row); the rest is unchanged."""
    out = dict(flat)
    for path, q in flat.items():
        parent, name = path[:-1], path[-1]
        scale = flat.get((*parent, "scale"))
        if name not in ("kernel", "table") or scale is None or q.dtype != jnp.int8:
            continue
        del out[(*parent, "scale")]
        if name == "kernel":
            out[path] = dequantize(q, scale)
        else:
            del out[path]
            out[(*parent, "embedding")] = dequantize(q.T, scale).T
    return out
