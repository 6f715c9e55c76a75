"""``python -m train.export SRC OUT --format peft`` of a bottleneck-adapter, prefix or prompt run: the
base in the Hugging Face layout and the method's parameters written next to it.

    OUT/base/                 the base model (--format hf: config.json, model.safetensors, tokenizer,
                              a classifier's trained head and id2label)
    OUT/peft.json             {"method": "prefix", "base": "base", "model": {ModelConfig fields}}
    OUT/peft.safetensors      the method's parameters (float32) keyed by our paths
                              ('stack/blocks/attn/prefix/k' [layers, length, kv_heads * head_dim])
    OUT/<tokenizer>, labels.json   as the other exports

None of these methods folds into the base weights: a bottleneck adapter sits behind a non-linearity
(it stays an extra module), a prefix or prompt is extra keys/values the queries attend to. A prefix's
reparameterisation MLP is folded away before (``models.peft.fold``). ``train.checkpoints.sources``
reads such a directory back as a model source (kind ``peft``): the base's arrays with these laid over.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from models.config import ConfigError, ModelConfig

CONFIG, WEIGHTS = "peft.json", "peft.safetensors"


def is_peft_dir(path: pathlib.Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def write(flat: dict[str, np.ndarray], cfg: ModelConfig, out_dir: pathlib.Path, base: str) -> None:
    """``peft.json`` (the method, ``base`` relative to ``out_dir``, the whole model config) and
    ``peft.safetensors`` of the PEFT parameters in ``flat`` ('a/b/c' -> array)."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"method": cfg.peft_method, "base": base, "model": dataclasses.asdict(cfg)}
    (out_dir / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    save_file({p: np.ascontiguousarray(x, np.float32) for p, x in flat.items()}, str(out_dir / WEIGHTS))


def read(directory: pathlib.Path) -> tuple[ModelConfig, dict[str, np.ndarray], pathlib.Path]:
    """(the model config, its PEFT parameters 'a/b/c' -> array, the base directory) of ``directory``."""
    from safetensors.numpy import load_file

    meta = json.loads((directory / CONFIG).read_text())
    cfg = ModelConfig.from_dict(meta.get("model", {}), str(directory / CONFIG))
    base = directory / str(meta.get("base", "base"))
    if not base.is_dir():
        raise ConfigError(f"'{directory}' holds {cfg.peft_method} parameters but its base '{base}' is missing")
    return cfg, load_file(str(directory / WEIGHTS)), base
