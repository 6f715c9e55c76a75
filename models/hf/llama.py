"""Llama (``LlamaForCausalLM``) <-> our decoder with RoPE, RMSNorm, SwiGLU and grouped-query heads.

Torch ``Linear`` weights are [out, in]; ours are [in, out], so every projection is transposed.
Both sides rotate by halves with inverse frequencies ``theta ** (-i / (head_dim / 2))``, so
query and key weights need no permutation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from models.config import ModelConfig
from models.hf.common import Params, Path, Weights, is_causal_lm, require, unstack

MODEL_TYPES = ("llama",)
PREFIXES = ("model.",)
IGNORE = (r"rotary_emb\.inv_freq$",)

# (our path under stack.blocks, HF name under layers.{i}, is a torch Linear weight)
LAYER_WEIGHTS = (
    (("attn_norm", "scale"), "input_layernorm.weight", False),
    (("attn", "q", "kernel"), "self_attn.q_proj.weight", True),
    (("attn", "k", "kernel"), "self_attn.k_proj.weight", True),
    (("attn", "v", "kernel"), "self_attn.v_proj.weight", True),
    (("attn", "o", "kernel"), "self_attn.o_proj.weight", True),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", False),
    (("mlp", "wg", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "wi", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "wo", "kernel"), "mlp.down_proj.weight", True),
)
LAYER_BIASES = tuple(
    (ours[:-1] + ("bias",), theirs.replace(".weight", ".bias"), False)
    for ours, theirs, linear in LAYER_WEIGHTS
    if linear
)
BLOCKS = ("stack", "blocks")


def _rope_theta(hf: dict) -> float:
    """RoPE base from transformers 5's ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    require(
        kind == "default",
        f"Llama rope_type '{kind}' (scaled RoPE) is not supported; only unscaled rotary positions are",
    )
    require(rope.get("partial_rotary_factor", 1.0) == 1.0, "Llama with partial_rotary_factor < 1 is not supported")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, w: Weights | None = None) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    require(act == "silu", f"Llama hidden_act '{act}' is not supported; we implement SwiGLU with silu")
    bias = hf.get("attention_bias", False)
    require(
        bias == hf.get("mlp_bias", False),
        "Llama with attention_bias != mlp_bias is not supported; our use_bias covers both",
    )
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=0 if head_dim * heads == d else head_dim,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        position="rope",
        rope_theta=_rope_theta(hf),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        use_bias=bias,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
        attention_dropout=hf.get("attention_dropout", 0.0),
    )


def _layer_weights(cfg: ModelConfig):
    return LAYER_WEIGHTS + (LAYER_BIASES if cfg.use_bias else ())


def params_from_hf(w: Weights, cfg: ModelConfig, hf: dict) -> Iterator[tuple[Path, np.ndarray]]:
    """Our parameters one at a time (stacked [layers, ...]), so at most one is on the host at once."""
    yield ("embed", "embedding"), w.get("embed_tokens.weight")  # [vocab, embed]
    for ours, theirs, linear in _layer_weights(cfg):
        yield BLOCKS + ours, np.stack([w.get(f"layers.{i}.{theirs}", transpose=linear) for i in range(cfg.n_layers)])
    yield ("final_norm", "scale"), w.get("norm.weight")
    if not cfg.tie_embeddings:
        yield ("head",), w.get("lm_head.weight", transpose=True)  # [vocab, embed] -> [embed, vocab]


def matches(cfg: ModelConfig) -> bool:
    return is_causal_lm(cfg) and (cfg.position, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")


def config_to_hf(cfg: ModelConfig):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",
        attention_bias=cfg.use_bias,
        mlp_bias=cfg.use_bias,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=None,
        eos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def params_to_hf(p: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    pre = PREFIXES[0]
    yield pre + "embed_tokens.weight", p["embed", "embedding"]
    for ours, theirs, linear in _layer_weights(cfg):
        array = p[BLOCKS + ours]
        yield from unstack(pre + "layers.{i}." + theirs, np.swapaxes(array, 1, 2) if linear else array)
    yield pre + "norm.weight", p["final_norm", "scale"]
    if not cfg.tie_embeddings:
        yield "lm_head.weight", p["head",].T
