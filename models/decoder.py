"""Decoder-only language model: GPT-2 or Llama by configuration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import both, padding_mask, segment_positions, sliding_window_mask
from models.cache import KVCache, advance, write_slots
from models.config import ModelConfig
from models.layers import DTYPES, constrain, dropout, matmul, norm, perturbed, site_key
from models.transformer import Stack


class DecoderLM(nnx.Module):
    """tokens [B, T] int -> logits [B, T, vocab] float32."""

    embedded_input = "inputs"  # the batch key whose token embeddings ``forward``'s ``embed_delta`` perturbs

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

    def forward(
        self, batch: dict[str, jax.Array], rng: jax.Array | None = None, embed_delta: jax.Array | None = None
    ) -> jax.Array:
        """The training interface every family shares: batch -> logits for ``batch['targets']``;
        ``rng`` (a key) turns dropout on (training), None leaves it off. Packed rows carry
        ``segment_ids`` and ``positions`` [B, T] (see ``__call__``). ``embed_delta`` [B, T, embed]
        float32 is added to the token embeddings of ``batch[embedded_input]`` (adversarial training)."""
        segment_ids = batch.get("segment_ids")
        return self(batch["inputs"], batch.get("positions"), rng=rng, segment_ids=segment_ids, embed_delta=embed_delta)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        cache: KVCache | None = None,
        rng: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        embed_delta: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """tokens [B, T] int, positions [B, T] int (default 0..T-1) -> logits [B, T, vocab] float32.

        mask [B, T] (1 = token, 0 = padding): padding is never attended to. With ``cache`` the
        tokens fill its slots from ``cache.index`` on, attend to every earlier valid slot, and
        ``(logits, updated cache)`` is returned. rng: dropout key (training only; None: no dropout).
        segment_ids [B, T] int (packed rows, 0 = padding; no cache): a token attends only to earlier
        tokens of its segment; positions default to restarting at each segment start. embed_delta
        [B, T, embed]: added to the token embeddings (before any scaling and the positions).
        """
        cfg = self.cfg
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("decoding from a cache takes no segment_ids (generation does not pack)")
            if positions is None:
                positions = segment_positions(segment_ids)
        x = perturbed(self.embed(tokens), embed_delta)  # [B, T, embed]
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if cfg.position == "learned":
            table = self.pos_embed[...]  # [max_seq_len, embed]
            pos = table[None, : tokens.shape[1]] if positions is None else table[positions]
            x = x + pos.astype(x.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = constrain(dropout(x, cfg.dropout, site_key(rng, 0)), ("batch", "length", "act_embed"))
        if cache is None:
            attend = both(padding_mask(mask), sliding_window_mask(positions, positions, cfg.sliding_window))
            x = self.stack(x, positions, causal=True, mask=attend, rng=site_key(rng, 1), segment_ids=segment_ids)
        else:
            slots = cache.index + jnp.arange(tokens.shape[1])  # rows are contiguous: slot gaps are position gaps
            window = sliding_window_mask(slots, jnp.arange(cache.length), cfg.sliding_window)
            cache, attend = write_slots(cache, mask, tokens.shape[1])
            attend = both(attend, window)
            x, cache = self.stack.extend(x, positions, cache, attend)
            cache = advance(cache, tokens.shape[1])
        x = self.final_norm(x)
        head = self.embed.embedding[...].T if cfg.tie_embeddings else self.head[...]  # [embed, vocab]
        logits = constrain(matmul(x, head.astype(x.dtype)), ("batch", "length", "act_vocab"))  # [B, T, vocab] float32
        return logits if cache is None else (logits, cache)
