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
from models.layers import DTYPES, MLP, constrain, dropout, norm, site_key

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
    Bottleneck adapters (models/peft.py), when attached, transform each branch's output before the sum.
    """

    attn_adapter = cross_adapter = mlp_adapter = None  # models.peft attaches them

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

    def _branch_input(self, x: jax.Array, ln: nnx.Module) -> jax.Array:
        """What a residual branch reads: ``ln(x)`` (pre-norm) or ``x`` (post-norm)."""
        return x if self.post_norm else ln(x)

    def _add(self, x: jax.Array, ln: nnx.Module, y: jax.Array) -> jax.Array:
        """The residual sum of ``x`` and the branch output ``y``: ``x + y`` (pre-norm) or ``ln(x + y)`` (post-norm)."""
        return ln(x + y) if self.post_norm else x + y

    def _residual(self, x: jax.Array, ln: nnx.Module, f, rng: jax.Array | None = None) -> jax.Array:
        """The branch ``f``'s output goes through dropout (key ``rng``, None: off) before the sum."""
        return self._add(x, ln, dropout(f(self._branch_input(x, ln)), self.dropout, rng))

    @staticmethod
    def _adapted(adapter: nnx.Module | None, y: jax.Array) -> jax.Array:
        """A branch output [B, T, embed] through its bottleneck adapter, if the block has one."""
        return y if adapter is None else adapter(y)

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
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """mask / bias: self-attention padding mask and score bias; context [B, S, embed] and
        context_mask [B, 1, 1, S] feed the cross-attention (blocks built with ``cross=True``).
        rng: this layer's dropout key (None: no dropout); each site folds in its own number (the attention's
        adapters derive theirs from site 1, the MLP's from site 5). segment_ids [B, T] / context_segment_ids
        [B, S] (int, 0 = padding): packed rows; self- and cross-attention stay inside a segment. prefix: this
        layer's prompt keys/values [P, kv_heads, head_dim] (models/peft.py)."""
        attn_rng, cross_rng = site_key(rng, 1), site_key(rng, 3)
        own = None if segment_ids is None else (segment_ids, segment_ids)

        def attn(h):
            y = self.attn(h, positions, causal=causal, mask=mask, bias=bias, rng=attn_rng, segments=own, prefix=prefix)
            return self._adapted(self.attn_adapter, y)

        x = self._residual(x, self.attn_norm, attn, site_key(rng, 0))
        if context is not None:
            pair = None if context_segment_ids is None else (segment_ids, context_segment_ids)
            cross = lambda h: self._adapted(
                self.cross_adapter,
                self.cross(h, causal=False, mask=context_mask, context=context, rng=cross_rng, segments=pair),
            )
            x = self._residual(x, self.cross_norm, cross, site_key(rng, 2))
        mlp = lambda h: self._adapted(self.mlp_adapter, self.mlp(h, site_key(rng, 5)))
        x = self._residual(x, self.mlp_norm, mlp, site_key(rng, 4))
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
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Decoding from a cache: x [B, T, embed] are the tokens of slots ``at[1]`` on.

        kv: the stack's cache (k, v) [layers, B, kv_heads, S, head_dim]; this block writes its new keys
        and values at ``at`` = (layer, slot) and attends over its layer's S slots with ``mask``
        [B, 1, T, S] (and ``bias`` [1, heads, T, S]). cross: this layer's encoder keys/values
        [B, S_enc, kv_heads, head_dim] with ``cross_mask`` [B, 1, 1, S_enc]; prefix: as ``__call__``.
        Returns (x, k, v).
        """
        h = self._branch_input(x, self.attn_norm)
        new_k, new_v = self.attn.keys_values(h, positions)
        layer, slot = at

        def write(cache, new):  # new [B, T, kv_heads, head_dim] into slots slot.. of this layer
            new = new.swapaxes(1, 2)[None].astype(cache.dtype)
            return constrain(jax.lax.dynamic_update_slice(cache, new, (layer, 0, 0, slot, 0)), CACHE_AXES)

        k, v = write(kv[0], new_k), write(kv[1], new_v)
        keys, values = k[layer].swapaxes(1, 2), v[layer].swapaxes(1, 2)  # [B, S, kv_heads, head_dim]
        q = self.attn.queries(h, positions)
        y = self.attn.attend(
            q, keys, values, causal=False, mask=mask, bias=bias, implementation="recompute", prefix=prefix
        )
        x = self._add(x, self.attn_norm, self._adapted(self.attn_adapter, y))
        if cross is not None:
            q = self.cross.queries(self._branch_input(x, self.cross_norm))
            y = self.cross.attend(q, *cross, causal=False, mask=cross_mask, implementation="recompute")
            x = self._add(x, self.cross_norm, self._adapted(self.cross_adapter, y))
        x = self._residual(x, self.mlp_norm, lambda h: self._adapted(self.mlp_adapter, self.mlp(h)))
        return constrain(x, ("batch", "length", "act_embed")), k, v

    def prompt_states(self, x: jax.Array, positions: jax.Array, causal: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A prompt [1, P, embed] through this block on its own (self-attention and MLP, no masks, bias or
        prefix) -> (its next states [1, P, embed], its keys and values [P, kv_heads, head_dim])."""
        h = self._branch_input(x, self.attn_norm)
        k, v = self.attn.keys_values(h, positions)
        y = self.attn.attend(self.attn.queries(h, positions), k, v, causal=causal, implementation="xla")
        x = self._add(x, self.attn_norm, y)
        return self._residual(x, self.mlp_norm, self.mlp), k[0], v[0]


class Stack(nnx.Module):
    """``n_layers`` blocks (default ``cfg.n_layers``); run with ``jax.lax.scan`` (one compiled body) or a loop.

    A prompt-tuned stack also holds ``prompt`` [prompt_length, embed] (models/peft.py).
    """

    prompt = None  # models.peft attaches it
    layers = None  # split_layers attaches it: nnx.List of one Block per layer

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
        prompt = self.prompt_keys_values(graphdef, stacked, causal)

        def layer(x, inputs):
            layer_state, key, prefix = inputs
            block = nnx.merge(graphdef, layer_state)
            segments = (segment_ids, context_segment_ids)
            return block(x, positions, causal, mask, bias, context, context_mask, key, *segments, prefix), None

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(layer, x, (stacked, keys, prompt))
            return x
        for i in range(self.n_layers):
            x, _ = layer(x, jax.tree.map(lambda a, i=i: a[i], (stacked, keys, prompt)))
        return x

    def prompt_keys_values(self, graphdef, stacked, causal: bool) -> tuple[jax.Array, jax.Array] | None:
        """Every layer's keys and values of the ``prompt`` run through the blocks (``Block.prompt_states``)
        -> 2 x [layers, P, kv_heads, head_dim]; None without a prompt."""
        if self.prompt is None:
            return None
        x = self.prompt[...].astype(DTYPES[self.cfg.compute_dtype])[None]  # [1, P, embed]
        positions = jnp.arange(x.shape[1])[None]

        def layer(x, layer_state):
            x, k, v = nnx.merge(graphdef, layer_state).prompt_states(x, positions, causal)
            return x, (k, v)

        return jax.lax.scan(layer, x, stacked)[1]

    def extend(
        self, x: jax.Array, positions: jax.Array | None, cache: KVCache, mask: jax.Array, bias: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """x [B, T, embed] at slots ``cache.index`` on -> ([B, T, embed], the cache with their keys/values).

        mask [B, 1, T, S] and bias [1, heads, T, S] are shared by every layer (see ``Block.extend``);
        an encoder-decoder's cache also carries the cross-attention keys/values. With ``layers``
        attached (``split_layers``) the layers run unrolled from those blocks.
        """
        graphdef, stacked = nnx.split(self.blocks)
        cross_mask = padding_mask(cache.cross_valid)

        def layer(carry, block, inputs):
            x, k, v = carry
            i, cross_k, cross_v, prefix = inputs
            cross = None if cross_k is None else (cross_k.swapaxes(1, 2), cross_v.swapaxes(1, 2))
            return block.extend(x, positions, (k, v), (i, cache.index), mask, bias, cross, cross_mask, prefix)

        carry = (x, cache.k, cache.v)
        prompt = self.prompt_keys_values(graphdef, stacked, causal=True)
        inputs = (jnp.arange(self.n_layers), cache.cross_k, cache.cross_v, prompt)
        if self.layers is None and self.cfg.scan_layers:
            scanned = lambda carry, xs: (layer(carry, nnx.merge(graphdef, xs[0]), xs[1:]), None)
            carry, _ = jax.lax.scan(scanned, carry, (stacked, *inputs))
        else:
            blocks = self.layers
            if blocks is None:
                blocks = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(self.n_layers)]
            for i, block in enumerate(blocks):
                carry = layer(carry, block, (i, *jax.tree.map(lambda a, i=i: a[i], inputs[1:])))
        x, k, v = carry
        return x, cache._replace(k=k, v=v)

    def cross_keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every layer's cross-attention keys/values of ``context`` [B, S, embed] -> 2 x [layers, B, kv_heads, S, head_dim]."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(_, layer_state):
            return None, nnx.merge(graphdef, layer_state).cross.keys_values(context)

        _, (k, v) = jax.lax.scan(layer, None, stacked)
        return constrain(k.swapaxes(2, 3), CACHE_AXES), constrain(v.swapaxes(2, 3), CACHE_AXES)


def split_layers(model: nnx.Module) -> nnx.Module:
    """Attaches to every float ``Stack`` of ``model`` its blocks one per layer (``Stack.layers``), their
    weights sliced out of the stacked arrays here, once; returns the model. A decoding loop calls it
    before the loop: scanned, ``Stack.extend`` slices every layer's weights out of the stack at every
    token, and XLA:CPU copies each slice. An int8 stack stays stacked: split, XLA hoists each
    kernel's float copy out of the loop and every token reads 4x the bytes (a slice is an int8 copy)."""
    for _, stack in list(nnx.iter_modules(model)):
        if not isinstance(stack, Stack):
            continue
        graphdef, stacked = nnx.split(stack.blocks)
        if any(a.dtype == jnp.int8 for a in jax.tree.leaves(stacked)):
            continue
        per_layer = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(stack.n_layers)]
        stack.layers = nnx.List(per_layer)
    return model
