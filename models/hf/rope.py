"""Hugging Face ``rope_parameters`` (transformers 5; ``rope_theta`` + ``rope_scaling`` in 4) <-> our rope fields.

Each scaling type transformers implements for Llama-style models and we compute exactly
(``models.layers.rope_frequencies``) is read; any other type or key is a ConversionError naming it.
"""

from __future__ import annotations

import math
from typing import Any

from models.config import ModelConfig
from models.hf.common import require

# HF rope_type -> (our rope_scaling, the keys it may carry besides rope_type / type / rope_theta)
KINDS = {
    "default": ("none", set()),
    "linear": ("linear", {"factor"}),
    "dynamic": ("dynamic", {"factor", "original_max_position_embeddings"}),
    "llama3": ("llama3", {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "yarn": (
        "yarn",
        {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow"}
        | {"mscale", "mscale_all_dim", "truncate"},
    ),
}
COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
}


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_fields(hf: dict) -> dict[str, Any]:
    """Our ModelConfig rope fields (rope_theta, rope_scaling, ...) and max_seq_len from an HF config dict."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    require(
        kind in KINDS,
        f"rope_parameters.rope_type '{kind}' is not supported; supported: {', '.join(KINDS)}",
    )
    ours, allowed = KINDS[kind]
    unknown = sorted(set(rope) - allowed - COMMON)
    require(not unknown, f"rope_parameters.{unknown[0] if unknown else ''} ({kind} RoPE) is not supported")
    missing = [k for k in REQUIRED.get(kind, ()) if rope.get(k) is None]
    require(not missing, f"rope_parameters.{missing[0] if missing else ''} is missing; {kind} RoPE needs it")
    require(rope.get("partial_rotary_factor", 1.0) == 1.0, "rope_parameters.partial_rotary_factor < 1 is not supported")
    max_len = hf.get("max_position_embeddings", 2048)
    out: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    out |= {"rope_scaling": ours, "max_seq_len": max_len}
    if kind == "default":
        return out
    original = rope.get("original_max_position_embeddings") or 0
    factor = rope.get("factor")
    if kind == "yarn" and factor is None:
        factor = max_len / original
    out["rope_factor"] = float(factor)
    if kind == "dynamic":  # NTK scaling changes nothing up to the context it was given: our max_seq_len
        out["max_seq_len"] = original or max_len
    if kind == "llama3":
        out |= {"rope_original_max_len": original, "rope_low_freq_factor": float(rope["low_freq_factor"])}
        out["rope_high_freq_factor"] = float(rope["high_freq_factor"])
    if kind == "yarn":
        require(rope.get("truncate", True), "rope_parameters.truncate=false (yarn) is not supported")
        attention = rope.get("attention_factor")
        if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            attention = _mscale(factor, rope["mscale"]) / _mscale(factor, rope["mscale_all_dim"])
        out |= {"rope_original_max_len": original, "rope_attention_factor": float(attention or 0.0)}
        out |= {
            "rope_beta_fast": float(rope.get("beta_fast") or 32),
            "rope_beta_slow": float(rope.get("beta_slow") or 1),
        }
    return out


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``rope_parameters`` dict of ``cfg``."""
    kind = "default" if cfg.rope_scaling == "none" else cfg.rope_scaling
    out: dict[str, Any] = {"rope_type": kind, "rope_theta": cfg.rope_theta}
    if kind == "default":
        return out
    out["factor"] = cfg.rope_factor
    if kind == "dynamic":
        out["original_max_position_embeddings"] = cfg.max_seq_len
    if kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = cfg.rope_original_max_len
    if kind == "llama3":
        out |= {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor}
    if kind == "yarn":
        out |= {"beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
        if cfg.rope_attention_factor:
            out["attention_factor"] = cfg.rope_attention_factor
    return out
