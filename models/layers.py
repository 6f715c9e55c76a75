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
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.config import ModelConfig

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, axes)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., k] @ w [k, n] -> [..., n] float32, from operands in their own (compute) dtype.

    The gradient flowing back is cast to x's dtype first, so the two backward matmuls also take
    compute-dtype operands and accumulate in float32, as the TPU MXU does. Without this, a bf16
    model's backward dots mix a float32 gradient with bf16 operands, which XLA:CPU upcasts to
    float32 matmuls; bf16 x bf16 -> float32 dots run on AMX/YNNPACK about 8x faster.
    """
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_fwd(x, w):
    return matmul(x, w), (x, w)


def _matmul_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    tokens = tuple(range(x.ndim - 1))
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def plain(x, g):  # [k, n]
        return jax.lax.dot_general(x, g, ((tokens, tokens), ((), ())), preferred_element_type=jnp.float32)

    def cpu(x, g):
        # XLA:CPU copies the left operand transposed; let that be the narrower one. The barrier keeps XLA
        # from folding a transpose after the dot (the one below, or a caller's, as a tied head's
        # ``embedding.T``) back into it: a dot contracting its left operand's first axis runs 1.5-3x slower.
        if x.shape[-1] > g.shape[-1]:
            return jax.lax.optimization_barrier(plain(g, x)).T
        return jax.lax.optimization_barrier(plain(x, g))

    # TPU and GPU compilers pick their own layouts: the plain dot there
    dw = jax.lax.platform_dependent(x, g, cpu=cpu, default=plain)
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nnx.Linear):
    """``nnx.Linear`` (same parameters) computing ``matmul(x, kernel) + bias`` in float32, then the compute dtype.

    Adding the fp32 bias before the one rounding also makes its gradient an fp32 sum, which
    XLA:CPU reduces fast; a bf16 bias add leaves a bf16 reduction it rewrites into a slow tree.
    The output is named ``projection`` for the ``save_dots`` remat policy (``models.transformer``),
    which cannot see the matmul inside ``matmul``'s custom gradient. With LoRA adapters (attached by
    ``models.lora``) it adds ``lora_scale * (dropout(x) @ lora_a) @ lora_b`` (``adapter``).
    """

    lora_a = lora_b = None  # [d_in, r], [r, d_out] when models.lora attaches them

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x [..., d_in] -> [..., d_out]; rng: the adapters' dropout key (None: off)."""
        x = x.astype(self.dtype)
        y = adapter(self, x, matmul(x, self.kernel[...].astype(self.dtype)), rng)  # [..., d_out] float32
        if self.bias is not None:
            y = y + self.bias[...]
        return checkpoint_name(y.astype(self.dtype), "projection")  # what remat='save_dots' keeps


def adapter(layer: nnx.Module, x: jax.Array, y: jax.Array, rng: jax.Array | None) -> jax.Array:
    """``y`` [..., d_out] float32 plus the LoRA update of ``layer`` (a Dense or QDense) if it has
    adapters: ``lora_scale * (dropout(x, lora_dropout, rng) @ lora_a) @ lora_b``, x [..., d_in] in
    the compute dtype. The base path never sees the dropout."""
    if layer.lora_a is None:
        return y
    x = dropout(x, layer.lora_dropout, rng)
    h = matmul(x, layer.lora_a[...].astype(layer.dtype)).astype(layer.dtype)  # [..., r]
    return y + layer.lora_scale * matmul(h, layer.lora_b[...].astype(layer.dtype))


def dense(
    cfg: ModelConfig,
    d_in: int,
    d_out: int,
    axes: tuple[str, str],
    *,
    rngs: nnx.Rngs,
    std: float | None = None,
    bias: bool | None = None,
) -> Dense:
    """A Dense whose kernel [d_in, d_out] carries ``axes`` and bias [d_out] (``bias``, default
    ``cfg.use_bias``) carries ``axes[1]``."""
    init = nnx.initializers.normal(cfg.init_std if std is None else std)
    return Dense(
        d_in,
        d_out,
        use_bias=cfg.use_bias if bias is None else bias,
        kernel_init=nnx.with_partitioning(init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, (axes[1],)),
        dtype=DTYPES[cfg.compute_dtype],
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def norm(cfg: ModelConfig, dim: int | None = None, *, rngs: nnx.Rngs) -> nnx.Module:
    """LayerNorm (GPT-2, with bias when cfg.use_bias) or RMSNorm (Llama) over the last ``dim``
    (default ``embed``: d_model) features."""
    scale = nnx.with_partitioning(nnx.initializers.ones, ("norm",))
    kwargs = {"epsilon": cfg.norm_eps, "dtype": DTYPES[cfg.compute_dtype], "param_dtype": jnp.float32, "rngs": rngs}
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(dim or cfg.d_model, scale_init=scale, **kwargs)
    bias = nnx.with_partitioning(nnx.initializers.zeros, ("norm",))
    return nnx.LayerNorm(dim or cfg.d_model, use_bias=cfg.use_bias, scale_init=scale, bias_init=bias, **kwargs)


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

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """rng: the key of the LoRA adapters' dropout (None: off); wi, wg, wo fold in 0, 1, 2."""
        act = jax.checkpoint(ACTIVATIONS[self.activation])  # keep only its input for the backward pass
        wi = self.wi(x, site_key(rng, 0))
        h = act(self.wg(x, site_key(rng, 1))) * wi if self.gated else act(wi)
        h = constrain(h, ("batch", "length", "act_mlp"))
        return self.wo(h, site_key(rng, 2))


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """The rotary inverse frequencies [head_dim / 2] float32 and the cos/sin multiplier of ``cfg.rope_scaling``.

    As transformers' ``ROPE_INIT_FUNCTIONS``: none ``theta ** (-2i / d)``; linear divides them by
    ``rope_factor``; dynamic (NTK) leaves them unscaled up to the context it was given (our
    ``max_seq_len``); llama3 divides the low frequencies by the factor and blends the middle band;
    yarn ramps between interpolated and original frequencies and scales cos/sin.
    """
    dim = cfg.dim_per_head
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim / 2]
    factor, kind, attention = cfg.rope_factor, cfg.rope_scaling, 1.0
    if kind == "linear":
        inv = inv / factor
    elif kind == "llama3":
        original, low, high = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > original / low, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        middle = (wavelen >= original / high) & (wavelen <= original / low)
        inv = np.where(middle, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind == "yarn":

        def correction(rotations: float) -> float:  # the dimension that turns ``rotations`` times over the context
            return (
                dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
            )

        low = max(math.floor(correction(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(correction(cfg.rope_beta_slow)), dim - 1)
        ramp = np.clip((np.arange(dim // 2) - low) / ((high - low) or 0.001), 0, 1)
        inv = inv / factor * ramp + inv * (1 - ramp)
        attention = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv.astype(np.float32), attention


def rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding, rotate-half convention (as Hugging Face Llama), frequencies from ``rope_frequencies``.

    x: [B, T, heads, head_dim]; positions: [B, T] int.
    """
    inv_freq, attention = rope_frequencies(cfg)
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, half]
    if attention != 1.0:
        sin, cos = sin * attention, cos * attention
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


def perturbed(x: jax.Array, delta: jax.Array | None) -> jax.Array:
    """Token embeddings [B, T, embed] plus an adversarial ``delta`` of the same shape (cast to their
    dtype); None leaves them untouched."""
    return x if delta is None else x + delta.astype(x.dtype)


def table(
    cfg: ModelConfig, shape: tuple[int, ...], axes: tuple, *, rngs: nnx.Rngs, std: float | None = None
) -> nnx.Param:
    """A normal-initialised fp32 parameter of ``shape`` carrying logical ``axes`` (position tables, heads)."""
    init = nnx.initializers.normal(cfg.init_std if std is None else std)
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape))


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout: zeroes each element with probability ``rate`` and scales the rest by 1 / (1 - rate).

    The identity when ``rng`` (a key) is None (eval, generation) or ``rate`` is 0. The bits come from
    a partitionable threefry key, so they do not depend on how ``x`` is sharded.
    """
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def site_key(rng: jax.Array | None, site: int) -> jax.Array | None:
    """The key of one dropout site (a fixed small int) derived from ``rng``; None stays None."""
    return None if rng is None else jax.random.fold_in(rng, site)
