"""Llama-style decoders <-> our decoder with RoPE, RMSNorm, gated MLP and grouped-query heads.

``LlamaForCausalLM`` (Llama 2 and 3.x: scaled RoPE through ``models.hf.rope``), and the families
that change one or two things about it: Mistral (``sliding_window``), Qwen2/2.5 (biases on q, k,
v: ``qkv_bias``), Qwen3 (RMSNorm of queries and keys: ``qk_norm``) and Gemma (RMSNorm scaled by
``1 + w``, which we store as the scale itself; embeddings times sqrt(d): ``scale_embeddings``;
tanh-GELU gate: ``mlp='gated_gelu'``; tied head). Torch ``Linear`` weights are [out, in]; ours are
[in, out], so every projection is transposed. Both sides rotate by halves, so query and key
weights need no permutation. A config.json field we do not implement is a ConversionError naming it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from models.config import ModelConfig
from models.hf.common import Params, Path, Weights, is_causal_lm, require, unstack
from models.hf.rope import rope_fields, rope_parameters

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
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


QK_NORMS = ((("attn", "q_norm", "scale"), "self_attn.q_norm.weight", False),)
QK_NORMS += ((("attn", "k_norm", "scale"), "self_attn.k_norm.weight", False),)
NORMS = (("attn_norm", "scale"), ("mlp_norm", "scale"), ("attn", "q_norm", "scale"), ("attn", "k_norm", "scale"))
# config.json fields every type may hold that change nothing we compute
BENIGN = {
    "_name_or_path",
    "architectures",
    "auto_map",
    "bos_token_id",
    "chunk_size_feed_forward",
    "dtype",
    "eos_token_id",
    "id2label",
    "initializer_range",
    "is_encoder_decoder",
    "label2id",
    "model_type",
    "output_attentions",
    "output_hidden_states",
    "pad_token_id",
    "problem_type",
    "return_dict",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "tokenizer_class",
    "max_position_embeddings",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "num_key_value_heads",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "hidden_act",
}
HANDLED = {  # the type's own fields, each read below
    "llama": {"attention_bias", "mlp_bias", "pretraining_tp"},
    "mistral": {"sliding_window"},
    "qwen2": {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
    "qwen3": {"attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
    "gemma": {"attention_bias", "hidden_activation", "use_bidirectional_attention"},
}
ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "gated_gelu", "gelu_new": "gated_gelu"}


def _sliding_window(hf: dict, kind: str) -> int:
    """The one window every layer uses (0: none); Qwen's per-layer mix of windows is refused."""
    if kind == "mistral":
        return hf.get("sliding_window") or 0
    if kind not in ("qwen2", "qwen3") or not hf.get("use_sliding_window"):
        return 0
    types = set(hf.get("layer_types") or ["sliding_attention"])
    require(
        types == {"sliding_attention"},
        f"{kind} layer_types mixing sliding and full attention (max_window_layers) is not supported; "
        "we give every layer the same window",
    )
    return hf.get("sliding_window") or 0


def config_from_hf(hf: dict, w: Weights | None = None) -> ModelConfig:
    kind = hf["model_type"]
    unknown = sorted(k for k, v in hf.items() if k not in BENIGN | HANDLED[kind] and v not in (None, False, 0, [], {}))
    require(not unknown, f"{kind} config.json field '{unknown[0] if unknown else ''}' is not supported by meshlm")
    require(hf.get("pretraining_tp", 1) == 1, "llama config.json field 'pretraining_tp' != 1 is not supported")
    require(not hf.get("use_bidirectional_attention"), "gemma use_bidirectional_attention is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    require(act in ACTIVATIONS, f"{kind} hidden_act '{act}' is not supported; we implement silu and tanh-GELU gates")
    bias = hf.get("attention_bias", False)
    require(
        bias == hf.get("mlp_bias", False),
        f"{kind} with attention_bias != mlp_bias is not supported; our use_bias covers both",
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
        position="rope",
        **rope_fields(hf),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp=ACTIVATIONS[act],
        use_bias=bias,
        qkv_bias=kind == "qwen2",
        qk_norm=kind == "qwen3",
        scale_embeddings=kind == "gemma",
        sliding_window=_sliding_window(hf, kind),
        tie_embeddings=hf.get("tie_word_embeddings", kind == "gemma"),
        init_std=hf.get("initializer_range", 0.02),
        attention_dropout=hf.get("attention_dropout", 0.0),
    )


def _layer_weights(cfg: ModelConfig):
    biases = LAYER_BIASES if cfg.use_bias else LAYER_BIASES[:3] if cfg.qkv_bias else ()
    return LAYER_WEIGHTS + biases + (QK_NORMS if cfg.qk_norm else ())


def _norm_offset(cfg: ModelConfig, ours: Path) -> float:
    """What Gemma's norms add to the stored weight (it scales by 1 + w); 0 for the others."""
    return 1.0 if cfg.scale_embeddings and ours in NORMS + (("final_norm", "scale"),) else 0.0


def params_from_hf(w: Weights, cfg: ModelConfig, hf: dict) -> Iterator[tuple[Path, np.ndarray]]:
    """Our parameters one at a time (stacked [layers, ...]), so at most one is on the host at once."""
    yield ("embed", "embedding"), w.get("embed_tokens.weight")  # [vocab, embed]
    for ours, theirs, linear in _layer_weights(cfg):
        stacked = np.stack([w.get(f"layers.{i}.{theirs}", transpose=linear) for i in range(cfg.n_layers)])
        yield BLOCKS + ours, stacked + _norm_offset(cfg, ours)
    yield ("final_norm", "scale"), w.get("norm.weight") + _norm_offset(cfg, ("final_norm", "scale"))
    if not cfg.tie_embeddings:
        yield ("head",), w.get("lm_head.weight", transpose=True)  # [vocab, embed] -> [embed, vocab]


def _model_type(cfg: ModelConfig) -> str | None:
    """The HF family that computes what ``cfg`` does, or None."""
    if not is_causal_lm(cfg) or (cfg.position, cfg.norm) != ("rope", "rmsnorm"):
        return None
    plain = not (cfg.qkv_bias or cfg.qk_norm or cfg.sliding_window)
    if cfg.scale_embeddings:
        return "gemma" if plain and cfg.mlp == "gated_gelu" and cfg.tie_embeddings else None
    if cfg.mlp != "swiglu":
        return None
    if cfg.qk_norm:
        return "qwen3" if not (cfg.use_bias or cfg.qkv_bias) else None
    if cfg.qkv_bias:
        return "qwen2" if not cfg.use_bias else None
    return "mistral" if cfg.sliding_window and not cfg.use_bias else "llama" if not cfg.sliding_window else None


def matches(cfg: ModelConfig) -> bool:
    return _model_type(cfg) is not None


def config_to_hf(cfg: ModelConfig):
    import transformers

    kind = _model_type(cfg)
    classes = {
        "llama": (transformers.LlamaConfig, "LlamaForCausalLM"),
        "mistral": (transformers.MistralConfig, "MistralForCausalLM"),
        "qwen2": (transformers.Qwen2Config, "Qwen2ForCausalLM"),
        "qwen3": (transformers.Qwen3Config, "Qwen3ForCausalLM"),
        "gemma": (transformers.GemmaConfig, "GemmaForCausalLM"),
    }
    config, architecture = classes[kind]
    extra = {
        "llama": {"attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias},
        "mistral": {"sliding_window": cfg.sliding_window},
        "qwen3": {"attention_bias": False},
        "gemma": {"attention_bias": False, "hidden_act": "gelu_pytorch_tanh"},
    }.get(kind, {})
    if kind in ("qwen2", "qwen3"):
        window = cfg.sliding_window
        extra |= {"use_sliding_window": bool(window), "sliding_window": window or None, "max_window_layers": 0}
        extra["layer_types"] = ["sliding_attention" if window else "full_attention"] * cfg.n_layers
    return config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_parameters(cfg),
        **({"hidden_act": "silu"} | extra),
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        architectures=[architecture],
    )


def params_to_hf(p: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    pre = PREFIXES[0]
    yield pre + "embed_tokens.weight", p["embed", "embedding"]
    for ours, theirs, linear in _layer_weights(cfg):
        array = p[BLOCKS + ours]
        array = np.swapaxes(array, 1, 2) if linear else array - _norm_offset(cfg, ours)
        yield from unstack(pre + "layers.{i}." + theirs, array)
    yield pre + "norm.weight", p["final_norm", "scale"] - _norm_offset(cfg, ("final_norm", "scale"))
    if not cfg.tie_embeddings:
        yield "lm_head.weight", p["head",].T
