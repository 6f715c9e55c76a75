"""Multi-head attention, and T5's relative position bias.

``Attention`` is self-attention (causal or bidirectional, GQA, optional rope) or, given a
``context``, cross-attention; an optional boolean ``mask`` (padding), ``segments`` (the segment ids
of packed rows, see ``segment_mask``) and additive ``bias`` (relative positions) go to the
implementation ``model.attention`` picks: ``xla``
(``jax.nn.dot_product_attention``, any backend), ``recompute`` (``models.dot_attention``: keeps no
[T, S] probabilities for the backward pass; fastest on CPU), ``cudnn`` (``jax.nn.dot_product_attention``'s
flash kernel on NVIDIA GPUs) or ``splash`` (``models.splash``, the Pallas kernel on TPUs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.dot_attention import dot_product_attention
from models.layers import constrain, dense, norm, residual_std, rope, site_key, table
from models.splash import splash_attention


class Attention(nnx.Module):
    """[B, T, embed] queries attending to [B, S, embed] keys/values (``context``, default the queries).

    Query heads ``n_heads``, key/value heads ``kv_heads`` (GQA when fewer); projections are
    stored flat ([embed, heads * head_dim]) as Hugging Face stores them. With
    ``scale_attention=False`` (T5) scores are not divided by sqrt(head_dim); the query init
    is scaled down by that factor instead, as T5 does. A self-attention of a prefix- or prompt-tuned
    model also attends to ``prefix`` keys/values through its ``prefix_gate`` (models/peft.py).
    """

    prefix = prefix_gate = None  # models.peft attaches them

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        hd = cfg.dim_per_head
        q_std = cfg.init_std if cfg.scale_attention else cfg.init_std / math.sqrt(hd)
        bias = cfg.use_bias or cfg.qkv_bias
        self.q = dense(cfg, cfg.d_model, cfg.n_heads * hd, ("embed", "heads"), rngs=rngs, std=q_std, bias=bias)
        self.k = dense(cfg, cfg.d_model, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs=rngs, bias=bias)
        self.v = dense(cfg, cfg.d_model, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs=rngs, bias=bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm of each head's query and key, [head_dim] scales shared by the heads
            self.q_norm, self.k_norm = norm(cfg, hd, rngs=rngs), norm(cfg, hd, rngs=rngs)
        self.o = dense(cfg, cfg.n_heads * hd, cfg.d_model, ("heads", "embed"), rngs=rngs, std=residual_std(cfg))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array | None = None,
        *,
        causal: bool = True,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        context: jax.Array | None = None,
        rng: jax.Array | None = None,
        segments: tuple[jax.Array, jax.Array] | None = None,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """x: [B, T, embed]; positions: [B, T] int (rope only); context: [B, S, embed] for cross-attention.

        mask: bool broadcastable to [B, heads, T, S], True where a query may attend (e.g. key
        padding [B, 1, 1, S]); segments: the queries' and keys' segment ids ([B, T], [B, S] int,
        0 = padding): a query attends only to keys of its own segment; bias: float [1 or B, heads,
        T, S] added to the scores; rng: the key
        of ``model.attention_dropout`` on the probabilities (None: off), and through ``fold_in(rng, 1)``
        of the LoRA adapters' dropout (q, k, v, o fold in 0, 1, 2, 3); prefix: a prompt's keys/values
        (see ``attend``). Returns [B, T, embed].
        """
        lora = site_key(rng, 1)
        q = self.queries(x, positions if context is None else None, lora)
        k, v = self.keys_values(x if context is None else context, positions if context is None else None, lora)
        return self.attend(
            q, k, v, causal=causal, mask=mask, bias=bias, rng=rng, lora_rng=lora, segments=segments, prefix=prefix
        )

    def queries(self, x: jax.Array, positions: jax.Array | None = None, lora_rng: jax.Array | None = None) -> jax.Array:
        """[B, T, embed] -> [B, T, heads, head_dim]; rotated when ``positions`` [B, T] are given (rope)."""
        cfg = self.cfg
        q = self.q(x, site_key(lora_rng, 0)).reshape(*x.shape[:2], cfg.n_heads, cfg.dim_per_head)
        if cfg.qk_norm:
            q = self.q_norm(q)
        if cfg.position == "rope" and positions is not None:
            q = rope(q, positions, cfg)
        return constrain(q, ("batch", "length", "act_heads", None))

    def keys_values(
        self, kv: jax.Array, positions: jax.Array | None = None, lora_rng: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """[B, S, embed] -> keys and values [B, S, kv_heads, head_dim] (what a KV cache holds)."""
        cfg = self.cfg
        shape = (*kv.shape[:2], cfg.kv_heads, cfg.dim_per_head)
        k, v = self.k(kv, site_key(lora_rng, 1)).reshape(shape), self.v(kv, site_key(lora_rng, 2)).reshape(shape)
        if cfg.qk_norm:
            k = self.k_norm(k)
        if cfg.position == "rope" and positions is not None:
            k = rope(k, positions, cfg)
        axes = ("batch", "length", "act_kv_heads", None)
        return constrain(k, axes), constrain(v, axes)

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        *,
        causal: bool,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        implementation: str | None = None,
        rng: jax.Array | None = None,
        lora_rng: jax.Array | None = None,
        segments: tuple[jax.Array, jax.Array] | None = None,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """q [B, T, heads, head_dim] over k/v [B, S, kv_heads, head_dim], then the output projection -> [B, T, embed].

        ``implementation`` overrides ``model.attention`` (decoding from a cache uses 'recompute'); rng: the
        probabilities' dropout key; lora_rng: the adapters' (the output projection folds in 3). None: off.
        segments: (query, key) segment ids [B, T], [B, S] int; splash takes them natively, the other
        implementations get them as ``segment_mask`` ANDed with ``mask``. prefix: keys/values [P, kv_heads,
        head_dim] (a prompt's, models/peft.py; default this layer's own ``prefix``) the queries also attend to
        in a second softmax scaled by ``prefix_gate`` [heads].
        """
        cfg = self.cfg
        b, t, n, hd = q.shape
        scale = 1.0 / math.sqrt(hd) if cfg.scale_attention else 1.0
        implementation = implementation or cfg.attention
        rate = cfg.attention_dropout if rng is not None else 0.0
        if rate and implementation != "recompute":
            raise ValueError(f"attention dropout needs model.attention='recompute', not '{implementation}'")
        if implementation == "splash":
            if mask is not None or bias is not None:
                raise ValueError(
                    "model.attention='splash' takes no padding mask or score bias (padding can be segment id 0 "
                    "of segment_ids); use model.attention='xla'"
                )
            out = splash_attention(q, k, v, causal=causal, scale=scale, segment_ids=segments)
        elif implementation == "recompute":
            drop = (rate, rng) if rate else None
            mask = attention_mask(mask, segments)
            out = dot_product_attention(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias, dropout=drop)
        else:  # xla or cudnn (which turns the mask into an additive bias)
            out = jax.nn.dot_product_attention(
                q, k, v, bias=bias, mask=attention_mask(mask, segments), scale=scale, is_causal=causal,
                implementation=implementation,
            )
        if prefix is None and self.prefix is not None:
            prefix = self.prefix.keys_values()
        if prefix is not None:
            out = out + prefix_attention(q, *prefix, self.prefix_gate[...], scale)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return self.o(out.reshape(b, t, n * hd).astype(self.o.dtype), site_key(lora_rng, 3))


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, scale: float) -> jax.Array:
    """The gated second softmax: queries q [B, T, heads, head_dim] over prefix keys/values k, v
    [P, kv_heads, head_dim] (the same for every row), times ``gate`` [heads] -> [B, T, heads, head_dim]."""
    shape = (q.shape[0], *k.shape)
    k, v = (jnp.broadcast_to(x.astype(q.dtype)[None], shape) for x in (k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale)
    return out * gate.astype(out.dtype)[:, None]


def padding_mask(mask: jax.Array | None) -> jax.Array | None:
    """[B, S] (1 = token, 0 = padding) -> bool [B, 1, 1, S]: which keys every query may attend to."""
    return None if mask is None else mask.astype(bool)[:, None, None, :]


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Segment ids [B, T] of the queries and [B, S] of the keys (int, 0 = padding) -> bool [B, 1, T, S].

    True where query and key carry the same id: packed examples never see each other, and padding
    sees only padding, so no query row is empty (a causal mask ANDed with it keeps the diagonal).
    """
    return q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


def attention_mask(mask: jax.Array | None, segments: tuple[jax.Array, jax.Array] | None) -> jax.Array | None:
    """Which pairs a query may attend to: ``mask`` (bool broadcastable to [B, heads, T, S], or None)
    AND the ``segment_mask`` of ``segments`` (query, key segment ids, or None). None: every pair."""
    if segments is None:
        return mask
    same = segment_mask(*segments)
    return same if mask is None else mask & same


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """int [B, L] segment ids (each segment a contiguous run) -> int32 [B, L]: each token's index
    inside its segment (0 at every segment start; padding runs count like a segment)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # [B, L]: index of the segment's start
    return index - first
def sliding_window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array | None:
    """Mistral's sliding window: query positions q_pos [..., T] and key positions k_pos [..., S] (int)
    -> bool [..., 1, T, S], True where the key is one of the ``window`` newest up to the query
    (``q - k < window``; the causal mask bounds it from the other side). None when ``window`` is 0.
    AND it with the other masks (padding, segments)."""
    if not window:
        return None
    return (q_pos[..., None, :, None] - k_pos[..., None, None, :]) < window


def both(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """The AND of two broadcastable bool masks, either of which may be None (no constraint)."""
    return b if a is None else a if b is None else a & b


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucket of each ``key_pos - query_pos`` (int array) -> int32 buckets in [0, num_buckets).

    Half the buckets (per direction when bidirectional) are exact distances, the rest grow
    logarithmically up to ``max_distance``. Float32 arithmetic as Hugging Face T5, so bucket
    edges agree exactly.
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class RelativePositionBias(nnx.Module):
    """T5's learned per-head score bias by bucketed relative position: (T, S) -> [1, heads, T, S] float32.

    ``embedding`` [buckets, heads] is Hugging Face's ``relative_attention_bias.weight`` of the
    first layer; T5 computes the bias once and every layer of that stack adds it.
    Bidirectional in the encoder, causal (only keys at or before the query) in the decoder.
    """

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        self.embedding = table(cfg, (cfg.relative_buckets, cfg.n_heads), ("relpos_buckets", "heads"), rngs=rngs)

    def __call__(self, q_len: int, k_len: int) -> jax.Array:
        rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # [T, S]: key pos - query pos
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        values = jnp.take(self.embedding[...], jnp.asarray(buckets), axis=0)  # [T, S, heads]
        bias = jnp.transpose(values, (2, 0, 1))[None]  # [1, heads, T, S]
        return constrain(bias, (None, "act_heads", None, None))

    def at(self, query_positions: jax.Array, k_len: int) -> jax.Array:
        """The bias of queries at ``query_positions`` [T] int (traced, e.g. while decoding from a cache)
        over keys 0..k_len-1 -> [1, heads, T, k_len] float32; ``query_positions`` must lie in [0, k_len).

        Buckets come from a table of every relative position computed as ``__call__`` does, so they agree exactly.
        """
        every = relative_position_bucket(
            np.arange(-(k_len - 1), k_len), self.bidirectional, self.num_buckets, self.max_distance
        )
        rel = jnp.arange(k_len)[None, :] - query_positions[:, None]  # [T, S]: key pos - query pos
        values = jnp.take(self.embedding[...], jnp.asarray(every)[rel + k_len - 1], axis=0)  # [T, S, heads]
        return constrain(jnp.transpose(values, (2, 0, 1))[None], (None, "act_heads", None, None))


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the score and value matmuls (forward + backward, no causal saving)."""
    return 12.0 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len
