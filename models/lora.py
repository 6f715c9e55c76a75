"""LoRA adapters beside the targeted ``Dense`` kernels, and their merge into the base weights.

A targeted kernel W [..., in, out] (``...``: the ``layers`` axis of a stacked block) gets
``lora_a`` A [..., in, r] (logical axes (..., in_axis, None), normal(1/sqrt(in)) init) and
``lora_b`` B [..., r, out] ((..., None, out_axis), zeros), so the model starts equal to its base;
``Dense`` then computes ``x @ W + (alpha / r) * (dropout(x) @ A) @ B`` (``lora_dropout``, training only). ``merge`` folds them back:
``W + (alpha / r) * A @ B``. We attach plain ``nnx.Param`` variables rather than wrap kernels in
``nnx.LoRA``: that one adds its own ``LoRAParam`` type (our state, checkpoints and HF mapping are
``nnx.Param`` trees), nests the base under ``base_module`` (changing every parameter path), has no
``alpha / r`` scale, and would bypass ``Dense``'s compute-dtype ``matmul``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from models.config import ConfigError, ModelConfig
from models.layers import Dense
from models.quant import QDense, dequantize_params

ADAPTERS = ("lora_a", "lora_b")
FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")  # the ModelConfig fields of the adapters


def _targets(cfg: ModelConfig) -> re.Pattern:
    try:
        return re.compile(f"(?:{cfg.lora_targets})(?:/.*)?")
    except re.error as e:
        raise ConfigError(f"lora.targets='{cfg.lora_targets}' is not a regular expression ({e}); fix it") from None


def add_adapters(model: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    """Gives every ``Dense`` (or int8 ``QDense``: QLoRA) whose kernel path ('stack/blocks/attn/q/kernel') ``cfg.lora_targets``
    matches (whole, or a leading part ending at '/') its ``lora_a`` / ``lora_b``."""
    matcher, r = _targets(cfg), cfg.lora_rank
    hits = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, (Dense, QDense))]
    hits = [(path, m) for path, m in hits if matcher.fullmatch("/".join(map(str, path)) + "/kernel")]
    if not hits:
        raise ConfigError(
            f"lora.targets='{cfg.lora_targets}' matches no Dense kernel; paths look like 'stack/blocks/attn/q/kernel'"
        )
    for _, m in hits:
        kernel = m.kernel
        *lead, d_in, d_out = kernel.shape
        axes = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        a = jax.random.normal(rngs.params(), (*lead, d_in, r), jnp.float32) / jnp.sqrt(d_in)
        m.lora_a = nnx.Param(a, out_sharding=(*axes[:-1], None))
        m.lora_b = nnx.Param(jnp.zeros((*lead, r, d_out), jnp.float32), out_sharding=(*axes[:-2], None, axes[-1]))
        m.lora_scale = cfg.lora_alpha / r
        m.lora_dropout = cfg.lora_dropout


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The same model without adapters (its LoRA fields at their defaults)."""
    defaults = ModelConfig()
    return dataclasses.replace(cfg, **{k: getattr(defaults, k) for k in FIELDS})


def merged_config(cfg: ModelConfig) -> ModelConfig:
    """The float model ``merge`` gives: ``base_config(cfg)``, and a QLoRA model's base dequantised."""
    return dataclasses.replace(base_config(cfg), quant="none", quant_skip="", quant_embeddings=False)


def merge(params: nnx.State, cfg: ModelConfig, target: nnx.State) -> nnx.State:
    """Parameters of ``merged_config(cfg)``: every kernel with adapters becomes W + (alpha / r) A @ B (fp32),
    an int8 base (QLoRA) dequantised first (W = q * scale). ``target``: the abstract parameters of
    ``merged_config(cfg)`` (``models.abstract_model``), filled in place and returned."""
    scale = cfg.lora_alpha / cfg.lora_rank

    def fold(tree: dict) -> dict:
        out = {k: fold(v) if isinstance(v, dict) else v for k, v in tree.items() if k not in ADAPTERS}
        if "lora_a" in tree:
            delta = jnp.einsum("...ir,...ro->...io", tree["lora_a"], tree["lora_b"], precision="highest")
            out["kernel"] = tree["kernel"] + scale * delta
        return out

    pure = traverse_util.unflatten_dict(dequantize_params(traverse_util.flatten_dict(nnx.to_pure_dict(params))))
    nnx.replace_by_pure_dict(target, fold(pure))
    return target
