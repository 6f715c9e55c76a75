"""LoRA adapters in the PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names an adapter by its Hugging Face module (``base_model.model.model.layers.{i}.self_attn.q_proj``)
and stores ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] per layer; ours are stacked
``lora_a`` [layers, in, r] and ``lora_b`` [layers, r, out] beside the kernel (models/lora.py). Both
scale the update by ``lora_alpha / r``. Written and read for the Llama-style families (Llama,
Mistral, Qwen2/3, Gemma: models/hf/llama.py), whose projections are separate torch Linears; a PEFT
option that changes what the adapters compute (DoRA, rsLoRA, biases, per-module ranks, ...) is a
ConversionError naming it.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator

import numpy as np

from models.config import ModelConfig
from models.hf import llama
from models.hf.common import ConversionError, Params, Path, require

PREFIX = "base_model.model."  # PeftModel wraps the task model (LlamaForCausalLM: model.layers...)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# PEFT options that must keep these values for the adapters to compute x A B * alpha / r as ours do
PLAIN = {
    "peft_type": "LORA",
    "use_dora": False,
    "use_rslora": False,
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_parameters": None,
    "trainable_token_indices": None,
}


def is_adapter_dir(path: str | pathlib.Path) -> bool:
    """Whether ``path`` holds PEFT adapters (adapter_config.json + adapter_model.safetensors)."""
    path = pathlib.Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def _modules(cfg: ModelConfig) -> dict[Path, str]:
    """Our Dense path ('stack', 'blocks', 'attn', 'q') -> its HF module name ('self_attn.q_proj') in every layer."""
    require(
        llama.matches(cfg),
        "the PEFT layout is written for Llama-style decoders (Llama, Mistral, Qwen, Gemma) only; "
        "export this model with --merge-lora --format hf",
    )
    return {llama.BLOCKS + ours[:-1]: theirs.removesuffix(".weight") for ours, theirs, linear in llama.LAYER_WEIGHTS}


def adapter_config(cfg: ModelConfig, targets: list[str], base_model: str) -> dict:
    """The ``adapter_config.json`` of ``cfg``'s adapters on the HF modules ``targets`` ('q_proj', ...)."""
    return PLAIN | {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(targets),
        "inference_mode": True,
        "init_lora_weights": True,
    }


def adapters_to_peft(params: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT tensor name, array) of every adapter in the flat fp32 ``params`` of a LoRA model ``cfg``."""
    found = False
    for ours, theirs in _modules(cfg).items():
        if ours + ("lora_a",) not in params:
            continue
        found = True
        a, b = params[ours + ("lora_a",)], params[ours + ("lora_b",)]  # [layers, in, r], [layers, r, out]
        for i in range(cfg.n_layers):
            name = f"{PREFIX}model.layers.{i}.{theirs}"
            yield f"{name}.lora_A.weight", a[i].T  # [r, in]
            yield f"{name}.lora_B.weight", b[i].T  # [out, r]
    require(found, "this model has no LoRA adapters on a projection PEFT can name; export it with --format hf")


def write(params: Params, cfg: ModelConfig, path: pathlib.Path, base_model: str) -> pathlib.Path:
    """Writes ``path/adapter_config.json`` and ``path/adapter_model.safetensors`` (float32) of ``cfg``'s
    adapters in ``params`` (flat {our path: array}); ``base_model``: what PEFT loads them onto."""
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in adapters_to_peft(params, cfg)}
    targets = {name.split(".")[-3] for name in tensors}
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps(adapter_config(cfg, sorted(targets), base_model), indent=2) + "\n")
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    return path


def read_config(path: pathlib.Path) -> dict:
    """``adapter_config.json`` of ``path``; ConversionError naming the first option we do not compute."""
    config = json.loads((path / CONFIG).read_text())
    for key, plain in PLAIN.items():
        value = config.get(key, plain)
        require(
            value == plain or (plain is None and not value) or (plain == {} and not value),
            f"{path / CONFIG}: {key}={value!r} is not supported; meshlm computes plain LoRA ({key}={plain!r})",
        )
    return config


def read(path: str | pathlib.Path, cfg: ModelConfig) -> tuple[dict, dict[str, float | int | str], Params]:
    """(adapter config, our LoRA fields {lora_rank, lora_alpha, lora_targets}, adapters {our path: stacked
    array}) of the PEFT directory ``path`` for the base model ``cfg``."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    config = read_config(path)
    tensors = load_file(str(path / WEIGHTS))
    by_name = {theirs: ours for ours, theirs in _modules(cfg).items()}
    pattern = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.\w+)?\.weight")
    layers: dict[tuple[Path, str], dict[int, np.ndarray]] = {}
    for name, array in tensors.items():
        match = pattern.fullmatch(name)
        if not match or match[2] not in by_name:
            raise ConversionError(
                f"{path / WEIGHTS}: tensor '{name}' is not a LoRA adapter of a Llama-style projection"
            )
        side = "lora_a" if match[3] == "A" else "lora_b"
        layers.setdefault((by_name[match[2]], side), {})[int(match[1])] = np.asarray(array, np.float32).T
    adapters = {}
    for (ours, side), rows in layers.items():
        require(
            sorted(rows) == list(range(cfg.n_layers)),
            f"{path / WEIGHTS}: {'.'.join(ours)} has adapters in layers {sorted(rows)}, not in all {cfg.n_layers}",
        )
        adapters[ours + (side,)] = np.stack([rows[i] for i in range(cfg.n_layers)])
    targets = sorted({"/".join(p[:-1]) for p in adapters})
    fields = {
        "lora_rank": int(config["r"]),
        "lora_alpha": float(config["lora_alpha"]),
        "lora_targets": "|".join(targets),
    }
    return config, fields, adapters
