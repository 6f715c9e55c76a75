"""``checkpoint.init_from``: start a new run from another model's parameters, whatever its head.

The source is a run directory (its newest intact checkpoint; also its ``checkpoints/`` or the
output of ``python -m train.export HF_DIR OUT --format checkpoint``), a Hugging Face model directory (config.json +
safetensors), an export (``python -m train.export``, ``train.prune`` or ``train.quantize``: model.json + params/; an
int8 one is dequantised into a float model, and kept int8 by a QLoRA run, ``model.quant: int8``), or
``python-package:NAME`` naming one (train/packages.py). Every parameter the
source holds at the same path with the same shape is restored; the rest keep their fresh
initialisation, and one line says which. So a masked-LM encoder, or a bare ``BertModel``,
starts a classifier: the encoder is restored, the pooler (unless the source has one) and the
classifier start fresh.

The source must be the same architecture: every model field except the head's (``head``, ``pooling``,
``num_labels``), the LoRA adapters' (a LoRA run starts from its base, the adapters fresh) and those
that do not change parameters (train/checkpoint.py) must match.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from flax import nnx, traverse_util

from models import abstract_model, hf
from models.config import ModelConfig
from train import packages
from train.checkpoint import config_mismatch, newest_params
from train.config import ConfigError

HEAD_FIELDS = frozenset({"head", "num_labels", "pooling"})
ADAPTER_FIELDS = frozenset({"lora_rank", "lora_alpha", "lora_targets", "lora_dropout"})
KEY = "checkpoint.init_from"

Flat = dict[tuple[str, ...], jax.Array]  # parameter path ('stack', 'blocks', 'attn', 'q', 'kernel') -> array


def architecture(model: dict) -> dict:
    """The model fields that must match for parameters to carry over (all but the head's and the adapters')."""
    return {k: v for k, v in model.items() if k not in HEAD_FIELDS | ADAPTER_FIELDS}


def _flat(params) -> Flat:
    return traverse_util.flatten_dict(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)


def _saved_shapes(saved_config: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Parameter path -> shape of the model a checkpoint's saved run config describes."""
    model = ModelConfig.from_dict(saved_config.get("model", {}), f"the model config of {KEY}")
    return {p: x.shape for p, x in _flat(abstract_model(model)[1]).items()}


def _from_run(directory: pathlib.Path, target: Flat, model: ModelConfig) -> tuple[str, Flat, list]:
    """(description, restored arrays, unused source paths) from a run's newest intact checkpoint."""

    def shared_target(saved_config: dict) -> dict:
        shapes = _saved_shapes(saved_config)
        shared = {p + ("value",): t for p, t in target.items() if shapes.get(p) == t.shape}
        if not shared:
            raise ConfigError(f"{KEY}='{directory}' shares no parameter with this model; point it at a similar model")
        return traverse_util.unflatten_dict(shared)

    step, params, saved_config = newest_params(directory, shared_target, architecture(dataclasses.asdict(model)), KEY)
    restored = {p[:-1]: x for p, x in traverse_util.flatten_dict(params).items()}  # drop the trailing 'value'
    return f"{directory} step {step}", restored, [p for p in _saved_shapes(saved_config) if p not in restored]


def _from_hugging_face(directory: pathlib.Path, target: Flat, model: ModelConfig) -> tuple[str, Flat, list]:
    """(description, restored arrays, unused source paths) from a Hugging Face model directory."""
    try:
        source_cfg, arrays = hf.read_params(directory)
    except hf.ConversionError as e:
        raise ConfigError(f"{KEY}: {e}") from None
    mismatch = config_mismatch(architecture(dataclasses.asdict(source_cfg)), architecture(dataclasses.asdict(model)))
    if mismatch:
        raise ConfigError(f"{KEY}: {directory} holds a different model ({'; '.join(mismatch)}); use its model settings")
    restored, unused = {}, []
    for path, array in arrays:
        want = target.get(path)
        if want is None or tuple(array.shape) != want.shape:
            unused.append(path)
            continue
        host = np.asarray(array, dtype=want.dtype)
        restored[path] = jax.make_array_from_callback(host.shape, want.sharding, lambda index, a=host: a[index])
    return str(directory), restored, unused


def _from_export(directory: pathlib.Path, target: Flat, model: ModelConfig) -> tuple[str, Flat, list]:
    """(description, restored arrays, unused source paths) from a ``python -m train.export`` or
    ``python -m train.quantize`` directory; an int8 one into a float model is dequantised (q * scale)."""
    from models.quant import dequantize_params
    from train.export import load

    source_cfg, params = load(directory)
    arrays = _flat(params)
    if source_cfg.quant != "none" and model.quant == "none":
        arrays = dequantize_params(arrays)
        source_cfg = dataclasses.replace(source_cfg, quant="none", quant_skip="", quant_embeddings=False)
    mismatch = config_mismatch(architecture(dataclasses.asdict(source_cfg)), architecture(dataclasses.asdict(model)))
    if mismatch:
        raise ConfigError(f"{KEY}: {directory} holds a different model ({'; '.join(mismatch)}); use its model settings")
    restored = {p: jax.device_put(x, target[p].sharding) for p, x in arrays.items() if _fits(x, target.get(p))}
    return str(directory), restored, [p for p in arrays if p not in restored]


def _fits(array: jax.Array, want) -> bool:
    return want is not None and array.shape == want.shape and array.dtype == want.dtype


def warm_start(
    init_from: str, fresh: nnx.State, target: nnx.State, model: ModelConfig, verbose: bool = True
) -> nnx.State:
    """``fresh`` parameters with every one that ``init_from`` holds (same path and shape) replaced.

    ``target``: the parameters' ShapeDtypeStructs carrying their shardings (restores land there
    directly). Prints one line naming what was restored and what starts fresh (unless not ``verbose``). Raises
    ConfigError when the source is missing, unreadable or a different architecture.
    """
    location = pathlib.Path(packages.resolve(init_from, KEY)).absolute()
    targets = _flat(target)
    if hf.is_model_dir(location):
        source, restored, unused = _from_hugging_face(location, targets, model)
    elif (location / "model.json").is_file() and (location / "params").is_dir():
        source, restored, unused = _from_export(location, targets, model)
    else:
        source, restored, unused = _from_run(location, targets, model)
    values = {p: restored.get(p, x) for p, x in _flat(fresh).items()}
    nnx.replace_by_pure_dict(fresh, traverse_util.unflatten_dict(values))
    if verbose and jax.process_index() == 0:
        print(describe(source, len(restored), sorted(set(values) - set(restored)), sorted(unused)), flush=True)
    return fresh


def describe(source: str, restored: int, fresh: list, unused: list) -> str:
    """One line: 'init_from SRC: restored N parameters; initialised fresh: a.b, ...; not used: ...'."""

    def names(paths: list) -> str:
        return ", ".join(".".join(p) for p in paths) or "none"

    line = f"init_from {source}: restored {restored} parameters; initialised fresh: {names(fresh)}"
    return line + (f"; not used: {names(unused)}" if unused else "")
