"""Transformer block (pre- or post-norm, optional cross-attention) and a stack of them stored
with a leading ``layers`` axis.

The stack's parameters are stacked ([layers, ...]) whether or not it is scanned, so a
checkpoint loads the same with ``scan_layers`` on or off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import Attention, padding_mask
from models.cache import CACHE_AXES, KVCache
from models.config import ModelConfig
from models.layers import MLP, constrain, dropout, norm, site_key

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    # save the projections' outputs (models.layers.Dense names them: its custom gradient hides the dot)
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("projection"),
    ),
}


class Block(nnx.Module):
    """Attention, optional cross-attention, then MLP, each a residual: [B, T, embed] -> [B, T, embed].

    Pre-norm (GPT-2, Llama, T5): ``x + f(norm(x))``. Post-norm (``cfg.post_norm``, BERT):
    ``norm(x + f(x))``. ``cross=True`` adds ``cross_norm`` + ``cross`` (T5 decoder) between them.
    """

    def __init__(self, cfg: ModelConfig, *, cross: bool = False, rngs: nnx.Rngs):
        self.post_norm = cfg.post_norm
        self.dropout = cfg.dropout
        self.attn_norm = norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        if cross:
            self.cross_norm = norm(cfg, rngs=rngs)
            self.cross = Attention(cfg, rngs=rngs)
        self.mlp_norm = norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def _residual(self, x: jax.Array, ln: nnx.Module, f, rng: jax.Array | None = None) -> jax.Array:
        """The branch ``f``'s output goes through dropout (key ``rng``, None: off) before the sum."""
        if self.post_norm:
            return ln(x + dropout(f(x), self.dropout, rng))
        return x + dropout(f(ln(x)), self.dropout, rng)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        causal: bool,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        rng: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        context_segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """mask / bias: self-attention padding mask and score bias; context [B, S, embed] and
        context_mask [B, 1, 1, S] feed the cross-attention (blocks built with ``cross=True``).
        rng: this layer's dropout key (None: no dropout); each site folds in its own number (the attention's
        adapters derive theirs from site 1, the MLP's from site 5). segment_ids [B, T] / context_segment_ids
        [B, S] (int, 0 = padding): packed rows; self- and cross-attention stay inside a segment."""
        attn_rng, cross_rng = site_key(rng, 1), site_key(rng, 3)
        own = None if segment_ids is None else (segment_ids, segment_ids)
        attn = lambda h: self.attn(h, positions, causal=causal, mask=mask, bias=bias, rng=attn_rng, segments=own)
        x = self._residual(x, self.attn_norm, attn, site_key(rng, 0))
        if context is not None:
            pair = None if context_segment_ids is None else (segment_ids, context_segment_ids)
            cross = lambda h: self.cross(
                h, causal=False, mask=context_mask, context=context, rng=cross_rng, segments=pair
            )
            x = self._residual(x, self.cross_norm, cross, site_key(rng, 2))
        x = self._residual(x, self.mlp_norm, lambda h: self.mlp(h, site_key(rng, 5)), site_key(rng, 4))
        return constrain(x, ("batch", "length", "act_embed"))

    def extend(
        self,
        x: jax.Array,
        positions: jax.Array | None,
        kv: tuple[jax.Array, jax.Array],
        at: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        bias: jax.Array | None = None,
        cross: tuple[jax.Array, jax.Array] | None = None,
        cross_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Decoding from a cache (pre-norm stacks): x [B, T, embed] are the tokens of slots ``at[1]`` on.

        kv: the stack's cache (k, v) [layers, B, S, kv_heads, head_dim]; this block writes its new keys
        and values at ``at`` = (layer, slot) and attends over its layer's S slots with ``mask``
        [B, 1, T, S] (and ``bias`` [1, heads, T, S]). cross: this layer's encoder keys/values
        [B, S_enc, kv_heads, head_dim] with ``cross_mask`` [B, 1, 1, S_enc]. Returns (x, k, v).
        """
        h = self.attn_norm(x)
        new_k, new_v = self.attn.keys_values(h, positions)
        layer, slot = at

        def write(cache, new):
            cache = jax.lax.dynamic_update_slice(cache, new[None].astype(cache.dtype), (layer, 0, slot, 0, 0))
            return constrain(cache, CACHE_AXES)

        k, v = write(kv[0], new_k), write(kv[1], new_v)
        q = self.attn.queries(h, positions)
        x = x + self.attn.attend(q, k[layer], v[layer], causal=False, mask=mask, bias=bias, implementation="recompute")
        if cross is not None:
            h = self.cross_norm(x)
            q = self.cross.queries(h)
            x = x + self.cross.attend(q, *cross, causal=False, mask=cross_mask, implementation="recompute")
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "act_embed")), k, v


class Stack(nnx.Module):
    """``n_layers`` blocks (default ``cfg.n_layers``); run with ``jax.lax.scan`` (one compiled body) or a loop."""

    def __init__(self, cfg: ModelConfig, *, n_layers: int | None = None, cross: bool = False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_layers = n_layers or cfg.n_layers

        @nnx.split_rngs(splits=self.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, cross=cross, rngs=rngs)

        self.blocks = make_blocks(rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        *,
        causal: bool = True,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        rng: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        context_segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, T, embed] -> [B, T, embed]; the extra inputs are shared by every layer (see ``Block``).

        rng: the stack's dropout key (None: no dropout); layer i gets ``fold_in(rng, i)``.
        """
        graphdef, stacked = nnx.split(self.blocks)
        dropping = rng is not None and max(self.cfg.dropout, self.cfg.attention_dropout, self.cfg.lora_dropout) > 0
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(self.n_layers)) if dropping else None

        def layer(x, inputs):
            layer_state, key = inputs
            block = nnx.merge(graphdef, layer_state)
            segments = (segment_ids, context_segment_ids)
            return block(x, positions, causal, mask, bias, context, context_mask, key, *segments), None

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(layer, x, (stacked, keys))
            return x
        for i in range(self.n_layers):
            x, _ = layer(x, jax.tree.map(lambda a, i=i: a[i], (stacked, keys)))
        return x

    def extend(
        self, x: jax.Array, positions: jax.Array | None, cache: KVCache, mask: jax.Array, bias: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """x [B, T, embed] at slots ``cache.index`` on -> ([B, T, embed], the cache with their keys/values).

        mask [B, 1, T, S] and bias [1, heads, T, S] are shared by every layer (see ``Block.extend``);
        an encoder-decoder's cache also carries the cross-attention keys/values.
        """
        if self.cfg.post_norm:
            raise ValueError("decoding from a cache needs a pre-norm stack (model.post_norm=false)")
        graphdef, stacked = nnx.split(self.blocks)
        cross_mask = padding_mask(cache.cross_valid)

        def layer(carry, inputs):
            x, k, v = carry
            layer_state, i, cross_k, cross_v = inputs
            block = nnx.merge(graphdef, layer_state)
            cross = None if cross_k is None else (cross_k, cross_v)
            return block.extend(x, positions, (k, v), (i, cache.index), mask, bias, cross, cross_mask), None

        carry = (x, cache.k, cache.v)
        inputs = (stacked, jnp.arange(self.n_layers), cache.cross_k, cache.cross_v)
        if self.cfg.scan_layers:
            carry, _ = jax.lax.scan(layer, carry, inputs)
        else:
            for i in range(self.n_layers):
                carry, _ = layer(carry, jax.tree.map(lambda a, i=i: a[i], inputs))
        x, k, v = carry
        return x, cache._replace(k=k, v=v)

    def cross_keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every layer's cross-attention keys/values of ``context`` [B, S, embed] -> 2 x [layers, B, S, kv_heads, head_dim]."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(_, layer_state):
            return None, nnx.merge(graphdef, layer_state).cross.keys_values(context)

        _, (k, v) = jax.lax.scan(layer, None, stacked)
        return constrain(k, CACHE_AXES), constrain(v, CACHE_AXES)
