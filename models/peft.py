"""The parameter-efficient methods besides LoRA (models/lora.py): bottleneck adapters, prefix tuning
and prompt tuning, attached to a built model so its base parameters stay what the seed gives.

Every method starts equal to its base model (step 0 == base, exactly):

- ``adapter_size`` (Houlsby): every block's attention, cross-attention (T5 decoder) and MLP output
  ``y`` [B, T, embed] becomes ``y + up(gelu(down(y)))`` before the residual sum (and a post-norm
  block's LayerNorm): ``attn_adapter``, ``cross_adapter``, ``mlp_adapter``, each ``down`` [layers,
  embed, size] (normal(init_std)), ``up`` [layers, size, embed] and both biases zero-initialised.
  They cannot be folded into the base weights (a non-linearity sits between them): exports carry them
  as extra modules.
- ``prefix_length`` (prefix tuning): every self-attention (decoder, encoder, both T5 stacks; not
  cross-attention) gets ``prefix`` keys and values [layers, prefix_length, kv_heads * head_dim] and a
  per-head ``prefix_gate`` [layers, heads] initialised at 0. A prefix in the same softmax as the tokens
  changes its normalisation, so no prefix is exactly inert; instead the queries attend to the prefix in
  a second softmax whose output is scaled by the gate and added to the tokens' (LLaMA-Adapter's
  zero-init attention, ``models.attention.prefix_attention``):
  ``attend(q, K, V) + gate * softmax(q P_k^T * scale) P_v``. Prefix positions
  carry no rope or relative bias and are seen by every query (every packed segment, padding), so masks,
  segment ids and KV caches are untouched. ``prefix_hidden > 0`` reparameterises them (Li & Liang):
  ``embed`` [layers, length, embed] -> tanh(down) [.., hidden] -> ``up_k`` / ``up_v``; ``fold`` computes
  the plain keys and values (what exports hold).
- ``prompt_length`` (prompt tuning): learned input embeddings ``prompt`` [prompt_length, embed] of
  the (first, for T5 the encoder) stack run through its frozen blocks on their own (causal in the
  decoder, positions 0..P-1, no relative bias); each layer's keys and values of those prompt states
  are that layer's gated prefix. The tokens keep their positions and length, so labels, masks and
  packing need no shifting (token classification has no prompt positions to label), and the prompt
  does not depend on the input: one computation per step serves every row and segment.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from models.config import ModelConfig
from models.layers import DTYPES, matmul
from models.transformer import Stack

FIELDS = ("adapter_size", "prefix_length", "prefix_hidden", "prompt_length")  # their ModelConfig fields
# path parts of the parameters these methods add (what trains, what an adapter-only checkpoint holds)
PARTS = frozenset({"attn_adapter", "cross_adapter", "mlp_adapter", "prefix", "prefix_gate", "prompt"})


def is_peft_path(path: str) -> bool:
    """Whether the parameter path ('stack/blocks/attn/prefix/k') belongs to a PEFT method (LoRA's too)."""
    parts = path.split("/")
    return parts[-1] in ("lora_a", "lora_b") or not PARTS.isdisjoint(parts)


def _param(value: jax.Array, axes: tuple) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes)


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


class Bottleneck(nnx.Module):
    """``y + up(gelu(down(y)))``: [B, T, embed] -> [B, T, embed]; ``up`` zero-initialised (the identity at init)."""

    def __init__(self, cfg: ModelConfig, layers: int, key: jax.Array):
        d, s = cfg.d_model, cfg.adapter_size
        self.dtype = DTYPES[cfg.compute_dtype]
        self.down = _param(_normal(key, (layers, d, s), cfg.init_std), ("layers", "embed", None))
        self.down_bias = _param(jnp.zeros((layers, s)), ("layers", None))
        self.up = _param(jnp.zeros((layers, s, d)), ("layers", None, "embed"))
        self.up_bias = _param(jnp.zeros((layers, d)), ("layers", "embed"))

    def __call__(self, y: jax.Array) -> jax.Array:
        h = jax.nn.gelu(matmul(y.astype(self.dtype), self.down[...].astype(self.dtype)) + self.down_bias[...])
        out = matmul(h.astype(self.dtype), self.up[...].astype(self.dtype)) + self.up_bias[...]
        return (y + out).astype(y.dtype)


class Prefix(nnx.Module):
    """Learned keys and values of one self-attention: ``k`` / ``v`` [layers, length, kv_heads * head_dim]
    (normal(1)), or with ``prefix_hidden`` their reparameterisation ``embed`` -> ``down`` -> ``up_k`` / ``up_v``."""

    def __init__(self, cfg: ModelConfig, layers: int, key: jax.Array):
        p, d, h, kv = cfg.prefix_length, cfg.d_model, cfg.prefix_hidden, cfg.kv_heads * cfg.dim_per_head
        self.shape = (p, cfg.kv_heads, cfg.dim_per_head)
        keys = jax.random.split(key, 4)
        if not h:
            self.k = _param(_normal(keys[0], (layers, p, kv), 1.0), ("layers", None, "kv_heads"))
            self.v = _param(_normal(keys[1], (layers, p, kv), 1.0), ("layers", None, "kv_heads"))
            return
        self.embed = _param(_normal(keys[0], (layers, p, d), 1.0), ("layers", None, "embed"))
        self.down = _param(_normal(keys[1], (layers, d, h), d**-0.5), ("layers", "embed", "mlp"))
        self.down_bias = _param(jnp.zeros((layers, h)), ("layers", "mlp"))
        for name, k in (("up_k", keys[2]), ("up_v", keys[3])):
            setattr(self, name, _param(_normal(k, (layers, h, kv), h**-0.5), ("layers", "mlp", "kv_heads")))
            setattr(self, f"{name}_bias", _param(jnp.zeros((layers, kv)), ("layers", "kv_heads")))

    def keys_values(self) -> tuple[jax.Array, jax.Array]:
        """This layer's prefix keys and values, each [length, kv_heads, head_dim] float32."""
        tree = {name: x[...] for name, x in vars(self).items() if isinstance(x, nnx.Param)}
        k, v = reparameterised(tree)
        return k.reshape(self.shape), v.reshape(self.shape)


def reparameterised(tree: dict) -> tuple[jax.Array, jax.Array]:
    """A prefix's arrays (one layer's or stacked [..., length, ...]) -> its keys and values [..., length, kv]."""
    if "k" in tree:
        return tree["k"], tree["v"]
    h = jnp.tanh(jnp.einsum("...pd,...dh->...ph", tree["embed"], tree["down"]) + tree["down_bias"][..., None, :])
    return tuple(
        jnp.einsum("...ph,...hk->...pk", h, tree[f"up_{n}"]) + tree[f"up_{n}_bias"][..., None, :] for n in ("k", "v")
    )


def add_peft(model: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    """Attaches ``cfg``'s method (module docstring) to every layer stack of ``model``."""
    stacks = [m for _, m in nnx.iter_modules(model) if isinstance(m, Stack)]
    for stack in stacks:
        blocks, layers, cross = stack.blocks, stack.n_layers, hasattr(stack.blocks, "cross")
        if cfg.adapter_size:
            blocks.attn_adapter = Bottleneck(cfg, layers, rngs.params())
            if cross:
                blocks.cross_adapter = Bottleneck(cfg, layers, rngs.params())
            blocks.mlp_adapter = Bottleneck(cfg, layers, rngs.params())
        if cfg.prefix_length:
            blocks.attn.prefix = Prefix(cfg, layers, rngs.params())
        prompt = cfg.prompt_length and stack is stacks[0]
        if cfg.prefix_length or prompt:
            blocks.attn.prefix_gate = _param(jnp.zeros((layers, cfg.n_heads)), ("layers", "heads"))
        if prompt:
            stack.prompt = _param(_normal(rngs.params(), (cfg.prompt_length, cfg.d_model), 1.0), (None, "embed"))


def folded_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` as exports hold it: a prefix without its reparameterisation MLP (plain keys and values)."""
    return dataclasses.replace(cfg, prefix_hidden=0)


def fold(params: nnx.State, target: nnx.State) -> nnx.State:
    """Parameters of ``folded_config(cfg)``: every reparameterised prefix replaced by its keys and values
    (fp32); ``target``: the abstract parameters of the folded config, filled in place and returned."""

    def walk(tree: dict) -> dict:
        out = {}
        for name, value in tree.items():
            if name == "prefix" and "embed" in value:
                k, v = reparameterised(value)
                out[name] = {"k": k, "v": v}
            else:
                out[name] = walk(value) if isinstance(value, dict) else value
        return out

    nnx.replace_by_pure_dict(target, walk(nnx.to_pure_dict(params)))
    return target


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The same model without these methods (their fields at the defaults)."""
    defaults = ModelConfig()
    return dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in FIELDS})


def peft_params(params: nnx.State | dict) -> dict[str, jax.Array]:
    """'a/b/c' -> array of every parameter a PEFT method added."""
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    flat = traverse_util.flatten_dict(pure, sep="/")
    return {p: x for p, x in flat.items() if is_peft_path(p)}
