"""Encoder-only Transformer (BERT) with a masked-LM, a sequence- or a token-classification head.

Hugging Face correspondence (``BertForMaskedLM`` / ``BertForSequenceClassification`` /
``BertForTokenClassification``).
Block parameters are stacked, ``[layers, ...]`` = ``bert.encoder.layer.{0..L-1}``; our
kernels are ``[in, out]`` (HF ``Linear.weight`` transposed), LayerNorm ``scale`` is HF ``weight``.

    embed.embedding            bert.embeddings.word_embeddings.weight
    pos_embed                  bert.embeddings.position_embeddings.weight
    type_embed                 bert.embeddings.token_type_embeddings.weight
    embed_norm.{scale,bias}    bert.embeddings.LayerNorm.{weight,bias}
    stack.blocks.attn.q/k/v    bert.encoder.layer.i.attention.self.query/key/value
    stack.blocks.attn.o        bert.encoder.layer.i.attention.output.dense
    stack.blocks.attn_norm     bert.encoder.layer.i.attention.output.LayerNorm
    stack.blocks.mlp.wi        bert.encoder.layer.i.intermediate.dense
    stack.blocks.mlp.wo        bert.encoder.layer.i.output.dense
    stack.blocks.mlp_norm      bert.encoder.layer.i.output.LayerNorm
    mlm.dense                  cls.predictions.transform.dense              (head='lm')
    mlm.norm                   cls.predictions.transform.LayerNorm
    mlm.bias                   cls.predictions.bias (= decoder.bias; decoder.weight is tied to
                               word_embeddings; ``mlm.decoder`` [embed, vocab] only when untied)
    pooler                     bert.pooler.dense                            (head='classification')
    classifier                 classifier                                   (both classification heads)

HF's ``position_ids`` buffer is not a parameter. Dropout (``model.dropout``, given an rng key) is where HF's is:
after the embedding LayerNorm, on each residual branch before its LayerNorm, and on the pooled output
(token classification: on every token's final state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import padding_mask, segment_positions
from models.config import ModelConfig
from models.layers import ACTIVATIONS, constrain, dense, dropout, embedding, matmul, norm, perturbed, site_key, table
from models.transformer import Stack


class MLMHead(nnx.Module):
    """BertLMPredictionHead: [B, T, embed] -> logits [B, T, vocab] float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.activation = cfg.mlp  # HF: config.hidden_act
        self.tied = cfg.tie_embeddings
        self.dense = dense(cfg, cfg.d_model, cfg.d_model, ("embed", "mlp"), rngs=rngs)
        self.norm = norm(cfg, rngs=rngs)
        if not self.tied:
            self.decoder = table(cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), rngs=rngs)
        zeros = nnx.with_partitioning(nnx.initializers.zeros, ("vocab",))
        self.bias = nnx.Param(zeros(rngs.params(), (cfg.vocab_size,)))

    def __call__(self, x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
        """word_embeddings: [vocab, embed], the tied decoder weight."""
        h = self.norm(ACTIVATIONS[self.activation](self.dense(x)))
        weight = word_embeddings.T if self.tied else self.decoder[...]  # [embed, vocab]
        logits = matmul(h, weight.astype(h.dtype))  # [B, T, vocab] float32
        logits = logits + self.bias[...]
        return constrain(logits, ("batch", "length", "act_vocab"))


class EncoderLM(nnx.Module):
    """BERT: tokens [B, T] int -> float32 MLM logits [B, T, vocab], class logits [B, num_labels] (packed:
    [B, K, num_labels], one per segment) or per-token class logits [B, T, num_labels]
    (``head='token_classification'``, no pooler)."""

    embedded_input = "inputs"  # the batch key whose token embeddings ``forward``'s ``embed_delta`` perturbs

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = embedding(cfg, cfg.vocab_size, rngs=rngs)
        if cfg.position == "learned":
            self.pos_embed = table(cfg, (cfg.max_seq_len, cfg.d_model), (None, "embed"), rngs=rngs)
        if cfg.type_vocab_size:
            self.type_embed = table(cfg, (cfg.type_vocab_size, cfg.d_model), (None, "embed"), rngs=rngs)
        self.embed_norm = norm(cfg, rngs=rngs)
        self.stack = Stack(cfg, rngs=rngs)
        if not cfg.post_norm:  # a pre-norm stack ends un-normalised
            self.final_norm = norm(cfg, rngs=rngs)
        if cfg.head == "lm":
            self.mlm = MLMHead(cfg, rngs=rngs)
        elif cfg.head == "token_classification":  # every token's state [embed] -> its class logits
            self.classifier = dense(cfg, cfg.d_model, cfg.num_labels, ("embed", None), rngs=rngs)
        else:
            self.pooler = dense(cfg, cfg.d_model, cfg.d_model, ("embed", "mlp"), rngs=rngs)
            self.classifier = dense(cfg, cfg.d_model, cfg.num_labels, ("mlp", None), rngs=rngs)

    def forward(
        self, batch: dict[str, jax.Array], rng: jax.Array | None = None, embed_delta: jax.Array | None = None
    ) -> jax.Array:
        """Reads ``inputs`` [B, T] and optional ``attention_mask`` [B, T] (1 = token, 0 = padding),
        ``token_types`` [B, T], ``positions`` [B, T] and, for packed rows, ``segment_ids`` [B, T] and
        ``pool_positions`` [B, K] (see ``__call__``); ``rng``: dropout key (None: no dropout);
        ``embed_delta`` [B, T, embed] float32: added to the token embeddings (adversarial training)."""
        inputs = (batch["inputs"], batch.get("attention_mask"), batch.get("token_types"), batch.get("positions"))
        packing = {"segment_ids": batch.get("segment_ids"), "pool_positions": batch.get("pool_positions")}
        return self(*inputs, rng=rng, embed_delta=embed_delta, **packing)

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        token_types: jax.Array | None = None,
        positions: jax.Array | None = None,
        rng: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        pool_positions: jax.Array | None = None,
        embed_delta: jax.Array | None = None,
    ) -> jax.Array:
        """segment_ids [B, T] int (packed rows, 0 = padding): attention stays inside a segment, positions
        default to restarting at each segment start. pool_positions [B, K] int (classification head): the
        index of each segment's first token; the head then classifies every segment -> [B, K, num_labels].
        embed_delta [B, T, embed]: see ``encode``."""
        x = self.encode(
            tokens, attention_mask, token_types, positions, rng, segment_ids=segment_ids, embed_delta=embed_delta
        )
        if self.cfg.head == "lm":
            return self.mlm(x, self.embed.embedding[...])
        if self.cfg.head == "token_classification":
            x = dropout(x, self.cfg.dropout, site_key(rng, 2))
            logits = self.classifier(x).astype(jnp.float32)  # [B, T, num_labels]
            return constrain(logits, ("batch", "length", None))
        if pool_positions is None:
            pooled = self.pool(x, attention_mask)  # [B, embed]
        else:
            pooled = self.pool_segments(x, pool_positions, segment_ids, attention_mask)  # [B, K, embed]
        pooled = dropout(jnp.tanh(self.pooler(pooled)), self.cfg.dropout, site_key(rng, 2))
        logits = self.classifier(pooled).astype(jnp.float32)  # [B, num_labels] or [B, K, num_labels]
        return constrain(logits, ("batch",) + (None,) * (logits.ndim - 1))

    def pool(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """[B, T, embed] -> [B, embed]: the first ([CLS]) state, or the mean over non-padding tokens
        (``pooling='mean'``, as sentence-transformers models such as all-MiniLM-L6-v2 were trained)."""
        if self.cfg.pooling == "cls":
            return x[:, 0]
        weights = jnp.ones(x.shape[:2], x.dtype) if attention_mask is None else attention_mask.astype(x.dtype)
        total = jnp.einsum("btd,bt->bd", x, weights)
        return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1)

    def pool_segments(
        self,
        x: jax.Array,
        pool_positions: jax.Array,
        segment_ids: jax.Array | None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """[B, T, embed] -> [B, K, embed]: ``pool`` of each segment of a packed row, slot k pooling the
        segment of token ``pool_positions`` [B, K] (its first token: the [CLS] state for ``pooling='cls'``;
        ``'mean'`` averages the tokens of that token's segment id in ``segment_ids`` [B, T])."""
        if self.cfg.pooling == "cls":
            return jnp.take_along_axis(x, pool_positions[..., None], axis=1)
        ids = jnp.zeros(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids
        slot_ids = jnp.take_along_axis(ids, pool_positions, axis=1)  # [B, K]
        weights = (ids[:, None, :] == slot_ids[:, :, None]).astype(x.dtype)  # [B, K, T]
        if attention_mask is not None:
            weights = weights * attention_mask[:, None, :].astype(x.dtype)
        total = jnp.einsum("btd,bkt->bkd", x, weights)
        return total / jnp.maximum(weights.sum(axis=2, keepdims=True), 1)

    def encode(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        token_types: jax.Array | None = None,
        positions: jax.Array | None = None,
        rng: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        embed_delta: jax.Array | None = None,
    ) -> jax.Array:
        """tokens [B, T] -> hidden states [B, T, embed] (HF BertModel's ``last_hidden_state``); rng: dropout key.

        segment_ids [B, T] int (0 = padding): packed rows; they replace ``attention_mask`` in the
        attention (padding is segment 0), so the splash kernel takes packed rows too. embed_delta
        [B, T, embed]: added to the token embeddings, before the type and position ones and the norm."""
        cfg = self.cfg
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = perturbed(self.embed(tokens), embed_delta)  # [B, T, embed]
        if cfg.type_vocab_size:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + self.type_embed[...][types].astype(x.dtype)
        if cfg.position == "learned":
            x = x + self.pos_embed[...][positions].astype(x.dtype)
        x = dropout(self.embed_norm(x), cfg.dropout, site_key(rng, 0))
        x = constrain(x, ("batch", "length", "act_embed"))
        mask = None if attention_mask is None or segment_ids is not None else padding_mask(attention_mask)
        x = self.stack(x, positions, causal=False, mask=mask, rng=site_key(rng, 1), segment_ids=segment_ids)
        return x if cfg.post_norm else self.final_norm(x)
