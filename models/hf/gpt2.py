"""GPT-2 (``GPT2LMHeadModel``) <-> our decoder with learned positions, LayerNorm, tanh-GELU, biases.

Hugging Face stores GPT-2's projections as ``Conv1D`` weights, already [in, out] like ours; the
query, key and value projections are one fused ``c_attn`` [embed, 3 * embed] that we split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from models.config import ModelConfig
from models.hf.common import Params, Path, Weights, is_causal_lm, require, unstack

MODEL_TYPES = ("gpt2",)
PREFIXES = ("transformer.",)
IGNORE = (r"\.attn\.(masked_)?bias$",)  # causal-mask buffers in older checkpoints
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")

# (our path under stack.blocks, HF name under h.{i}) for the weights that map one to one.
LAYER_WEIGHTS = (
    (("attn_norm", "scale"), "ln_1.weight"),
    (("attn_norm", "bias"), "ln_1.bias"),
    (("attn", "o", "kernel"), "attn.c_proj.weight"),
    (("attn", "o", "bias"), "attn.c_proj.bias"),
    (("mlp_norm", "scale"), "ln_2.weight"),
    (("mlp_norm", "bias"), "ln_2.bias"),
    (("mlp", "wi", "kernel"), "mlp.c_fc.weight"),
    (("mlp", "wi", "bias"), "mlp.c_fc.bias"),
    (("mlp", "wo", "kernel"), "mlp.c_proj.weight"),
    (("mlp", "wo", "bias"), "mlp.c_proj.bias"),
)
BLOCKS = ("stack", "blocks")


def config_from_hf(hf: dict, w: Weights | None = None) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    require(act in TANH_GELUS, f"GPT-2 activation_function '{act}' is not supported; we implement {TANH_GELUS}")
    require(hf.get("scale_attn_weights", True), "GPT-2 with scale_attn_weights=false is not supported")
    require(
        not hf.get("scale_attn_by_inverse_layer_idx", False),
        "GPT-2 with scale_attn_by_inverse_layer_idx=true is not supported",
    )
    require(not hf.get("add_cross_attention", False), "GPT-2 with cross-attention is not supported")
    d = hf["n_embd"]
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        max_seq_len=hf["n_positions"],
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
        dropout=hf.get("resid_pdrop", 0.1),  # embd_pdrop: the same rate in every released GPT-2
        attention_dropout=hf.get("attn_pdrop", 0.1),
    )


def params_from_hf(w: Weights, cfg: ModelConfig, hf: dict) -> Iterator[tuple[Path, np.ndarray]]:
    """Our parameters one at a time (stacked [layers, ...]), so at most one is on the host at once."""
    L, d = cfg.n_layers, cfg.d_model
    yield ("embed", "embedding"), w.get("wte.weight")  # [vocab, embed]
    yield ("pos_embed",), w.get("wpe.weight")  # [max_seq_len, embed]
    for ours, theirs in LAYER_WEIGHTS:
        yield BLOCKS + ours, np.stack([w.get(f"h.{i}.{theirs}") for i in range(L)])
    for j, name in enumerate("qkv"):  # c_attn: [embed, 3 * embed] = [q | k | v]
        yield (
            BLOCKS + ("attn", name, "kernel"),
            np.stack([w.get(f"h.{i}.attn.c_attn.weight")[:, j * d : (j + 1) * d] for i in range(L)]),
        )
        yield (
            BLOCKS + ("attn", name, "bias"),
            np.stack([w.get(f"h.{i}.attn.c_attn.bias")[j * d : (j + 1) * d] for i in range(L)]),
        )
    yield ("final_norm", "scale"), w.get("ln_f.weight")
    yield ("final_norm", "bias"), w.get("ln_f.bias")
    if not cfg.tie_embeddings:
        yield ("head",), w.get("lm_head.weight", transpose=True)  # torch Linear [vocab, embed] -> [embed, vocab]


def matches(cfg: ModelConfig) -> bool:
    return (
        is_causal_lm(cfg)
        and (cfg.position, cfg.norm, cfg.mlp, cfg.use_bias) == ("learned", "layernorm", "gelu", True)
        and cfg.kv_heads == cfg.n_heads
        and cfg.dim_per_head * cfg.n_heads == cfg.d_model
    )


def config_to_hf(cfg: ModelConfig):
    import transformers

    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        architectures=["GPT2LMHeadModel"],
    )


def params_to_hf(p: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    pre = PREFIXES[0]
    yield pre + "wte.weight", p["embed", "embedding"]
    yield pre + "wpe.weight", p["pos_embed",]
    for ours, theirs in LAYER_WEIGHTS:
        yield from unstack(pre + "h.{i}." + theirs, p[BLOCKS + ours])
    qkv = [p[BLOCKS + ("attn", n, "kernel")] for n in "qkv"]  # 3 x [layers, embed, embed]
    yield from unstack(pre + "h.{i}.attn.c_attn.weight", np.concatenate(qkv, axis=-1))
    qkv_bias = [p[BLOCKS + ("attn", n, "bias")] for n in "qkv"]
    yield from unstack(pre + "h.{i}.attn.c_attn.bias", np.concatenate(qkv_bias, axis=-1))
    yield pre + "ln_f.weight", p["final_norm", "scale"]
    yield pre + "ln_f.bias", p["final_norm", "bias"]
    if not cfg.tie_embeddings:
        yield "lm_head.weight", p["head",].T
