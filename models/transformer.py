"""Pre-norm Transformer block and a stack of them stored with a leading ``layers`` axis.

The stack's parameters are stacked ([layers, ...]) whether or not it is scanned, so a
checkpoint loads the same with ``scan_layers`` on or off.
"""

from __future__ import annotations

import jax
from flax import nnx

from models.attention import SelfAttention
from models.config import ModelConfig
from models.layers import MLP, constrain, norm

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)): [B, T, embed] -> [B, T, embed]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = norm(cfg, rngs=rngs)
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.mlp_norm = norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, causal: bool) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions, causal=causal)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "act_embed"))


class Stack(nnx.Module):
    """``cfg.n_layers`` blocks; run with ``jax.lax.scan`` (one compiled body) or a Python loop."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, *, causal: bool = True) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, positions, causal), None

        if self.cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(layer, x, stacked)
            return x
        for i in range(self.cfg.n_layers):
            x, _ = layer(x, jax.tree.map(lambda a: a[i], stacked))
        return x
