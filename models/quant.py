"""Post-training weight-only int8: symmetric, per output channel, dequantised on the fly.

A quantised model (``ModelConfig.quant='int8'``) is built as the float one, then every ``Dense``
whose path (``'stack/blocks/attn/q'``, joined by ``/``) does not match ``cfg.quant_skip`` is
swapped for a ``QDense``: ``kernel`` int8 [..., d_in, d_out] with the float kernel's logical axes
and ``scale`` float32 [..., d_out] with the same axes less the reduced input one (so
``('layers', 'embed', 'heads')`` -> ``('layers', 'heads')``), and the model shards as the float one.
Embeddings and LM heads (tied or untied) are not ``Dense`` and stay float.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.layers import Dense, matmul

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
    ``x @ (kernel * scale)``; the weights stay int8 in memory.
    """

    def __init__(self, dense: Dense):
        kernel = dense.kernel
        axes = kernel.get_metadata().get("out_sharding")
        q, scale = quantize(kernel[...])
        self.kernel = nnx.Param(q, out_sharding=axes, eager_sharding=False)
        scale_axes = None if axes is None else tuple(axes[:-2]) + (axes[-1],)
        self.scale = nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False)
        self.bias = dense.bias
        self.dtype = dense.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype)) * self.scale[...]  # [..., d_out] f32
        if self.bias is not None:
            y = y + self.bias[...]
        return checkpoint_name(y.astype(self.dtype), "projection")


def quantize_model(model: nnx.Module, skip: str = "") -> list[str]:
    """Swaps in place every ``Dense`` of ``model`` whose path does not match the regex ``skip``
    (``re.search``; '' skips none) for a ``QDense``; returns the quantised paths."""
    pattern = re.compile(skip) if skip else None
    done = []
    for path, module in list(nnx.iter_modules(model)):
        name = "/".join(str(p) for p in path)
        if not isinstance(module, Dense) or (pattern is not None and pattern.search(name)):
            continue
        parent = model
        for p in path[:-1]:
            parent = getattr(parent, p) if isinstance(p, str) else parent[p]
        setattr(parent, path[-1], QDense(module))
        done.append(name)
    return done
