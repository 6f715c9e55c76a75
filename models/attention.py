"""Multi-head self-attention with grouped-query heads, through ``jax.nn.dot_product_attention``."""

from __future__ import annotations

import jax
from flax import nnx

from models.config import ModelConfig
from models.layers import constrain, dense, residual_std, rope


class SelfAttention(nnx.Module):
    """Causal (decoder) or bidirectional self-attention: [B, T, embed] -> [B, T, embed].

    Query heads ``n_heads``, key/value heads ``kv_heads`` (GQA when fewer); projections are
    stored flat ([embed, heads * head_dim]) as Hugging Face stores them.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        hd = cfg.dim_per_head
        self.q = dense(cfg, cfg.d_model, cfg.n_heads * hd, ("embed", "heads"), rngs=rngs)
        self.k = dense(cfg, cfg.d_model, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs=rngs)
        self.v = dense(cfg, cfg.d_model, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs=rngs)
        self.o = dense(cfg, cfg.n_heads * hd, cfg.d_model, ("heads", "embed"), rngs=rngs, std=residual_std(cfg))

    def __call__(self, x: jax.Array, positions: jax.Array, *, causal: bool = True) -> jax.Array:
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.dim_per_head
        q = self.q(x).reshape(b, t, cfg.n_heads, hd)  # [B, T, heads, head_dim]
        k = self.k(x).reshape(b, t, cfg.kv_heads, hd)  # [B, T, kv_heads, head_dim]
        v = self.v(x).reshape(b, t, cfg.kv_heads, hd)
        if cfg.position == "rope":
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        implementation = "cudnn" if cfg.attention == "cudnn" else None
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return self.o(out.reshape(b, t, cfg.n_heads * hd).astype(x.dtype))


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the score and value matmuls (forward + backward, no causal saving)."""
    return 12.0 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len

