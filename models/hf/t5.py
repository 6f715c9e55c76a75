"""T5 (``T5ForConditionalGeneration``, v1.0 and v1.1) <-> our encoder-decoder.

Relative position buckets (one bias table per stack, in block 0), RMSNorm, no biases, no
1/sqrt(head_dim) on scores; MLP 'relu' (v1.0) or 'gated-gelu' (v1.1: wi_0 is the gate).
transformers 5 always ties ``lm_head`` to ``shared`` unless the checkpoint holds a different
``lm_head.weight``, and scales the decoder output by d_model**-0.5 when
``scale_decoder_outputs`` (v1.0). Our model scales exactly when the head is tied, so a tied
head without scaling (or an untied one with it) becomes our untied ``head`` (scale folded in).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from models.config import ModelConfig
from models.hf.common import Params, Path, Weights, require, unstack

MODEL_TYPES = ("t5",)
PREFIXES = ()
IGNORE = (r"^(encoder|decoder)\.embed_tokens\.weight$", r"EncDecAttention\.relative_attention_bias")
MLPS = {"relu": "relu", "gated-gelu": "gated_gelu"}

ATTENTION = tuple((name, f"{name}.weight") for name in "qkvo")


def _layers(mlp: str, decoder: bool) -> tuple[tuple[tuple[str, ...], str], ...]:
    """(our path under blocks, HF name under block.{i}) of every layer weight, all but norms [out, in]."""
    out = [(("attn", q, "kernel"), f"layer.0.SelfAttention.{w}") for q, w in ATTENTION]
    out.append((("attn_norm", "scale"), "layer.0.layer_norm.weight"))
    if decoder:
        out += [(("cross", q, "kernel"), f"layer.1.EncDecAttention.{w}") for q, w in ATTENTION]
        out.append((("cross_norm", "scale"), "layer.1.layer_norm.weight"))
    ff = "layer.2" if decoder else "layer.1"
    if mlp == "gated_gelu":
        out += [
            (("mlp", "wg", "kernel"), f"{ff}.DenseReluDense.wi_0.weight"),
            (("mlp", "wi", "kernel"), f"{ff}.DenseReluDense.wi_1.weight"),
        ]
    else:
        out.append((("mlp", "wi", "kernel"), f"{ff}.DenseReluDense.wi.weight"))
    out.append((("mlp", "wo", "kernel"), f"{ff}.DenseReluDense.wo.weight"))
    out.append((("mlp_norm", "scale"), f"{ff}.layer_norm.weight"))
    return tuple(out)


def _is_norm(name: str) -> bool:
    return name.endswith("layer_norm.weight")


def _scales_output(hf: dict) -> bool:
    """transformers 5 writes ``scale_decoder_outputs``; older configs say ``tie_word_embeddings``."""
    return hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)


def config_from_hf(hf: dict, w: Weights | None = None) -> ModelConfig:
    """``w``: the weights, when at hand; a separate ``lm_head.weight`` among them unties the head."""
    proj = hf.get("feed_forward_proj", "relu")
    require(proj in MLPS, f"T5 feed_forward_proj '{proj}' is not supported; supported: {', '.join(MLPS)}")
    d, heads = hf["d_model"], hf["num_heads"]
    return ModelConfig(
        family="encoder_decoder",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        n_heads=heads,
        head_dim=0 if hf["d_kv"] * heads == d else hf["d_kv"],
        d_ff=hf["d_ff"],
        max_seq_len=hf.get("n_positions", 512),
        position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        mlp=MLPS[proj],
        use_bias=False,
        scale_attention=False,
        tie_embeddings=_scales_output(hf) and not (w is not None and "lm_head.weight" in w),
        dropout=hf.get("dropout_rate", 0.1),
        attention_dropout=hf.get("dropout_rate", 0.1),
    )


def params_from_hf(w: Weights, cfg: ModelConfig, hf: dict) -> Iterator[tuple[Path, np.ndarray]]:
    """Our parameters one at a time (stacked [layers, ...]), so at most one is on the host at once."""
    yield ("embed", "embedding"), w.get("shared.weight")  # [vocab, embed]
    for side, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        yield (
            (f"{side}_relpos", "embedding"),
            w.get(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        )
        for ours, theirs in _layers(cfg.mlp, side == "decoder"):
            linear = not _is_norm(theirs)
            yield (
                (side, "blocks") + ours,
                np.stack([w.get(f"{side}.block.{i}.{theirs}", transpose=linear) for i in range(n)]),
            )
        yield (f"{side}_norm", "scale"), w.get(f"{side}.final_layer_norm.weight")
    if not cfg.tie_embeddings:
        head = w.get("lm_head.weight") if "lm_head.weight" in w else w.get("shared.weight")
        scale = cfg.d_model**-0.5 if _scales_output(hf) else 1.0
        yield ("head",), head.T * np.float32(scale)  # [vocab, embed] -> [embed, vocab]


def matches(cfg: ModelConfig) -> bool:
    return (
        cfg.family == "encoder_decoder"
        and (cfg.position, cfg.norm, cfg.use_bias, cfg.scale_attention, cfg.post_norm)
        == ("relative", "rmsnorm", False, False, False)
        and cfg.mlp in MLPS.values()
        and cfg.kv_heads == cfg.n_heads
    )


def config_to_hf(cfg: ModelConfig):
    import transformers

    return transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.dim_per_head,
        d_ff=cfg.d_ff,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj={v: k for k, v in MLPS.items()}[cfg.mlp],
        tie_word_embeddings=cfg.tie_embeddings,  # transformers 5 reads it as scale_decoder_outputs
        architectures=["T5ForConditionalGeneration"],
    )


def params_to_hf(p: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    yield "shared.weight", p["embed", "embedding"]
    for side in ("encoder", "decoder"):
        yield f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", p[f"{side}_relpos", "embedding"]
        for ours, theirs in _layers(cfg.mlp, side == "decoder"):
            array = p[(side, "blocks") + ours]
            yield from unstack(f"{side}.block.{{i}}.{theirs}", array if _is_norm(theirs) else np.swapaxes(array, 1, 2))
        yield f"{side}.final_layer_norm.weight", p[f"{side}_norm", "scale"]
    if not cfg.tie_embeddings:
        yield "lm_head.weight", p["head",].T
