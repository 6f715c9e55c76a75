"""Encoder-decoder Transformer (T5 v1.0 / v1.1) with relative position buckets.

Hugging Face correspondence (``T5ForConditionalGeneration``). Block parameters are stacked,
``[layers, ...]`` = ``{encoder,decoder}.block.{0..L-1}``; our kernels are ``[in, out]`` (HF
``Linear.weight`` transposed), RMSNorm ``scale`` is ``T5LayerNorm.weight``.

    embed.embedding              shared.weight (= encoder/decoder.embed_tokens.weight)
    encoder_relpos.embedding     encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    encoder.blocks.attn_norm     encoder.block.i.layer.0.layer_norm
    encoder.blocks.attn.q/k/v/o  encoder.block.i.layer.0.SelfAttention.q/k/v/o
    encoder.blocks.mlp_norm      encoder.block.i.layer.1.layer_norm
    encoder.blocks.mlp.wi/wo     encoder.block.i.layer.1.DenseReluDense.wi/wo          (mlp='relu')
    encoder.blocks.mlp.wg/wi/wo  encoder.block.i.layer.1.DenseReluDense.wi_0/wi_1/wo   (mlp='gated_gelu')
    encoder_norm                 encoder.final_layer_norm
    decoder_relpos.embedding     decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    decoder.blocks.attn_norm     decoder.block.i.layer.0.layer_norm
    decoder.blocks.attn.q/k/v/o  decoder.block.i.layer.0.SelfAttention.q/k/v/o
    decoder.blocks.cross_norm    decoder.block.i.layer.1.layer_norm
    decoder.blocks.cross.q/k/v/o decoder.block.i.layer.1.EncDecAttention.q/k/v/o
    decoder.blocks.mlp_norm      decoder.block.i.layer.2.layer_norm
    decoder.blocks.mlp.*         decoder.block.i.layer.2.DenseReluDense.*   (as the encoder)
    decoder_norm                 decoder.final_layer_norm
    head                         lm_head.weight.T   (only when untied, v1.1)

With ``tie_embeddings`` (v1.0) the decoder output is scaled by d_model**-0.5 before the tied
head, as HF does when ``scale_decoder_outputs``. Scores are not scaled (``scale_attention``
false in the presets). Dropout (``model.dropout``, given an rng key) is where HF's is: on the embeddings,
on each residual branch and after each stack's final norm (not inside the MLP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import RelativePositionBias, padding_mask
from models.cache import KVCache, advance, init_cache, write_slots
from models.config import ModelConfig
from models.layers import constrain, dropout, embedding, matmul, norm, perturbed, site_key, table
from models.transformer import Stack


def _positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


class EncoderDecoderLM(nnx.Module):
    """T5: encoder tokens [B, S] and decoder tokens [B, T] int -> logits [B, T, vocab] float32."""

    embedded_input = "encoder_inputs"  # the batch key whose token embeddings ``forward``'s ``embed_delta`` perturbs

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = embedding(cfg, cfg.vocab_size, rngs=rngs)
        self.encoder_relpos = RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
        self.encoder = Stack(cfg, rngs=rngs)
        self.encoder_norm = norm(cfg, rngs=rngs)
        self.decoder_relpos = RelativePositionBias(cfg, bidirectional=False, rngs=rngs)
        self.decoder = Stack(cfg, n_layers=cfg.decoder_layers, cross=True, rngs=rngs)
        self.decoder_norm = norm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.head = table(cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), rngs=rngs)

    def forward(
        self, batch: dict[str, jax.Array], rng: jax.Array | None = None, embed_delta: jax.Array | None = None
    ) -> jax.Array:
        """Reads ``encoder_inputs`` [B, S], ``decoder_inputs`` [B, T] (targets shifted right) and
        optional ``encoder_mask`` [B, S], ``decoder_mask`` [B, T] (1 = token, 0 = padding) and, for
        packed rows, ``encoder_segment_ids`` [B, S] with ``decoder_segment_ids`` [B, T] (an example's
        target carries its input's id); ``rng``: dropout key (None: no dropout); ``embed_delta`` [B, S, embed]
        float32: added to the encoder's token embeddings (adversarial training; the decoder's stay clean)."""
        segments = {key: batch.get(key) for key in ("encoder_segment_ids", "decoder_segment_ids")}
        encoder = (batch["encoder_inputs"], batch.get("encoder_mask"), site_key(rng, 0))
        encoded = self.encode(*encoder, segment_ids=segments["encoder_segment_ids"], embed_delta=embed_delta)
        masks = (batch.get("encoder_mask"), batch.get("decoder_mask"))
        return self.decode(batch["decoder_inputs"], encoded, *masks, rng=site_key(rng, 1), **segments)

    def encode(
        self,
        tokens: jax.Array,
        mask: jax.Array | None = None,
        rng: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        embed_delta: jax.Array | None = None,
    ) -> jax.Array:
        """tokens [B, S] -> encoder states [B, S, embed] (after the final norm); rng: dropout key.

        segment_ids [B, S] int (packed rows, 0 = padding; each segment contiguous): attention stays inside
        a segment and replaces ``mask``. The relative bias needs no per-segment positions: inside a
        contiguous segment, index differences are position differences. embed_delta [B, S, embed]: added to
        the token embeddings."""
        rate = self.cfg.dropout
        x = dropout(perturbed(self.embed(tokens), embed_delta), rate, site_key(rng, 0))
        x = constrain(x, ("batch", "length", "act_embed"))
        bias = self.encoder_relpos(tokens.shape[1], tokens.shape[1])  # [1, heads, S, S]
        mask = None if segment_ids is not None else padding_mask(mask)
        x = self.encoder(
            x, _positions(tokens), causal=False, mask=mask, bias=bias, rng=site_key(rng, 1), segment_ids=segment_ids
        )
        return dropout(self.encoder_norm(x), rate, site_key(rng, 2))

    def decode(
        self,
        tokens: jax.Array,
        encoded: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
        decoder_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        rng: jax.Array | None = None,
        *,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """tokens [B, T], encoded [B, S, embed] -> logits [B, T, vocab] float32; rng: dropout key (no cache).

        With ``cache`` (from ``init_cache``, which holds the encoder side) the tokens fill its
        slots from ``cache.index`` on and ``(logits, updated cache)`` is returned. Packed rows (no
        cache) give both ``decoder_segment_ids`` [B, T] and ``encoder_segment_ids`` [B, S] (0 = padding):
        self-attention stays inside a decoder segment, cross-attention inside the encoder segment of the
        same id; they replace the padding masks.
        """
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("packed T5 rows need both encoder_segment_ids and decoder_segment_ids")
        packed = decoder_segment_ids is not None
        if packed and cache is not None:
            raise ValueError("decoding from a cache takes no segment ids (generation does not pack)")
        rate = self.cfg.dropout
        x = constrain(dropout(self.embed(tokens), rate, site_key(rng, 0)), ("batch", "length", "act_embed"))
        t = tokens.shape[1]
        if cache is None:
            x = self.decoder(
                x,
                _positions(tokens),
                causal=True,
                mask=None if packed else padding_mask(decoder_mask),
                bias=self.decoder_relpos(t, t),  # [1, heads, T, T]
                context=encoded,
                context_mask=None if packed else padding_mask(encoder_mask),
                rng=site_key(rng, 1),
                segment_ids=decoder_segment_ids,
                context_segment_ids=encoder_segment_ids,
            )
        else:
            cache, attend = write_slots(cache, decoder_mask, t)
            bias = self.decoder_relpos.at(cache.index + jnp.arange(t), cache.length)  # [1, heads, T, S]
            x, cache = self.decoder.extend(x, None, cache, attend, bias)
            cache = advance(cache, t)
        logits = self._logits(dropout(self.decoder_norm(x), rate, site_key(rng, 2)))
        return logits if cache is None else (logits, cache)

    def init_cache(self, encoded: jax.Array, encoder_mask: jax.Array | None, length: int) -> KVCache:
        """A decoder cache of ``length`` slots holding every layer's cross-attention keys/values of
        ``encoded`` [B, S, embed] (encoder padding ``encoder_mask`` [B, S], 1 = token)."""
        b, s = encoded.shape[:2]
        cross_k, cross_v = self.decoder.cross_keys_values(encoded)
        valid = jnp.ones((b, s), bool) if encoder_mask is None else encoder_mask.astype(bool)
        cache = init_cache(self.cfg, self.cfg.decoder_layers, b, length)
        return cache._replace(cross_k=cross_k, cross_v=cross_v, cross_valid=valid)

    def _logits(self, x: jax.Array) -> jax.Array:
        """Final decoder states [B, T, embed] -> logits [B, T, vocab] float32."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            x = x * (cfg.d_model**-0.5)
            head = self.embed.embedding[...].T  # [embed, vocab]
        else:
            head = self.head[...]
        logits = matmul(x, head.astype(x.dtype))  # [B, T, vocab] float32
        return constrain(logits, ("batch", "length", "act_vocab"))
