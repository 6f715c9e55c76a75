"""Transformer block (pre- or post-norm, optional cross-attention) and a stack of them stored
with a leading ``layers`` axis.

The stack's parameters are stacked ([layers, ...]) whether or not it is scanned, so a
checkpoint loads the same with ``scan_layers`` on or off.
"""

from __future__ import annotations

import jax
from flax import nnx

from models.attention import Attention
from models.config import ModelConfig
from models.layers import MLP, constrain, norm

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
        self.attn_norm = norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        if cross:
            self.cross_norm = norm(cfg, rngs=rngs)
            self.cross = Attention(cfg, rngs=rngs)
        self.mlp_norm = norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def _residual(self, x: jax.Array, ln: nnx.Module, f) -> jax.Array:
        return ln(x + f(x)) if self.post_norm else x + f(ln(x))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        causal: bool,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
    ) -> jax.Array:
        """mask / bias: self-attention padding mask and score bias; context [B, S, embed] and
        context_mask [B, 1, 1, S] feed the cross-attention (blocks built with ``cross=True``)."""
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, positions, causal=causal, mask=mask, bias=bias))
        if context is not None:
            cross = lambda h: self.cross(h, causal=False, mask=context_mask, context=context)
            x = self._residual(x, self.cross_norm, cross)
        x = self._residual(x, self.mlp_norm, self.mlp)
        return constrain(x, ("batch", "length", "act_embed"))


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
    ) -> jax.Array:
        """x: [B, T, embed] -> [B, T, embed]; the extra inputs are shared by every layer (see ``Block``)."""
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x, positions, causal, mask, bias, context, context_mask), None

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(layer, x, stacked)
            return x
        for i in range(self.n_layers):
            x, _ = layer(x, jax.tree.map(lambda a, i=i: a[i], stacked))
        return x
