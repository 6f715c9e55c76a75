"""Building blocks with logical axis names on every parameter.

Logical names used here (mapped to mesh axes in ``sharding/rules.py``):
parameters ``vocab, embed, heads, kv_heads, mlp, norm, layers, relpos_buckets``; activations
``batch, length, act_embed, act_heads, act_mlp, act_vocab``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, axes)


def dense(cfg: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs, std: float | None = None) -> nnx.Linear:
    """A Linear whose kernel [d_in, d_out] carries ``axes`` and bias [d_out] carries ``axes[1]``."""
    init = nnx.initializers.normal(cfg.init_std if std is None else std)
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=cfg.use_bias,
        kernel_init=nnx.with_partitioning(init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axes[1],)),
        dtype=DTYPES[cfg.compute_dtype],
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm (GPT-2, with bias when cfg.use_bias) or RMSNorm (Llama) over ``embed``."""
    scale = nnx.with_partitioning(nnx.initializers.ones, ("norm",))
    kwargs = dict(epsilon=cfg.norm_eps, dtype=DTYPES[cfg.compute_dtype], param_dtype=jnp.float32, rngs=rngs)
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.d_model, scale_init=scale, **kwargs)
    bias = nnx.with_partitioning(nnx.initializers.zeros, ("norm",))
    return nnx.LayerNorm(cfg.d_model, use_bias=cfg.use_bias, scale_init=scale, bias_init=bias, **kwargs)


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2, HF 'gelu_new'
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),  # BERT, HF 'gelu'
    "relu": jax.nn.relu,  # T5 v1.0
    "gated_gelu": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1 (HF 'gated-gelu' = gelu_new)
    "swiglu": jax.nn.silu,  # Llama
}
GATED = ("gated_gelu", "swiglu")


class MLP(nnx.Module):
    """wo(act(wi x)), or gated wo(act(wg x) * wi x): [B, T, embed] -> [B, T, embed].

    ``cfg.mlp``: gelu (GPT-2), gelu_exact (BERT), relu (T5 v1.0), gated_gelu (T5 v1.1), swiglu (Llama).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gated = cfg.mlp in GATED
        self.activation = cfg.mlp
        self.wi = dense(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs=rngs)
        if self.gated:
            self.wg = dense(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs=rngs)
        self.wo = dense(cfg, cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs=rngs, std=residual_std(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = act(self.wg(x)) * self.wi(x) if self.gated else act(self.wi(x))
        h = constrain(h, ("batch", "length", "act_mlp"))
        return self.wo(h)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (as Hugging Face Llama).

    x: [B, T, heads, head_dim]; positions: [B, T] int.
    """
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, half]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def embedding(cfg: ModelConfig, num: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    """Token embedding table [num, embed] with logical axes ``('vocab', 'embed')``."""
    init = nnx.initializers.normal(cfg.init_std)
    return nnx.Embed(
        num,
        cfg.d_model,
        embedding_init=nnx.with_partitioning(init, ("vocab", "embed")),
        dtype=DTYPES[cfg.compute_dtype],
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def table(
    cfg: ModelConfig, shape: tuple[int, ...], axes: tuple, *, rngs: nnx.Rngs, std: float | None = None
) -> nnx.Param:
    """A normal-initialised fp32 parameter of ``shape`` carrying logical ``axes`` (position tables, heads)."""
    init = nnx.initializers.normal(cfg.init_std if std is None else std)
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape))
