"""Decoder-only language model: GPT-2 or Llama by configuration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import DTYPES, constrain, matmul, norm
from models.transformer import Stack


class DecoderLM(nnx.Module):
    """tokens [B, T] int -> logits [B, T, vocab] float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = DTYPES[cfg.compute_dtype]
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nnx.with_partitioning(init, ("vocab", "embed")),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        if cfg.position == "learned":
            self.pos_embed = nnx.Param(
                nnx.with_partitioning(init, (None, "embed"))(rngs.params(), (cfg.max_seq_len, cfg.d_model))
            )
        self.stack = Stack(cfg, rngs=rngs)
        self.final_norm = norm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.head = nnx.Param(
                nnx.with_partitioning(init, ("embed", "vocab"))(rngs.params(), (cfg.d_model, cfg.vocab_size))
            )

    def forward(self, batch: dict[str, jax.Array]) -> jax.Array:
        """The training interface every family shares: batch -> logits for ``batch['targets']``."""
        return self(batch["inputs"], batch.get("positions"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        x = self.embed(tokens)  # [B, T, embed]
        if cfg.position == "learned":
            table = self.pos_embed[...]  # [max_seq_len, embed]
            pos = table[None, : tokens.shape[1]] if positions is None else table[positions]
            x = x + pos.astype(x.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = constrain(x, ("batch", "length", "act_embed"))
        x = self.stack(x, positions, causal=True)
        x = self.final_norm(x)
        head = self.embed.embedding[...].T if cfg.tie_embeddings else self.head[...]  # [embed, vocab]
        logits = matmul(x, head.astype(x.dtype))  # [B, T, vocab] float32
        return constrain(logits, ("batch", "length", "act_vocab"))
