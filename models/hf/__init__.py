"""Hugging Face interop: read a local HF model directory into our model, and write ours as one.

``load(path, mesh)`` maps ``config.json`` to a ``ModelConfig`` and the safetensors weights to
our parameter tree (per-layer weights stacked on the leading ``layers`` axis, torch [out, in]
weights transposed to our [in, out]); with a mesh every array is placed directly with the
``NamedSharding`` our logical axis rules give it. ``export(model, cfg, path)`` writes a
directory that ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads.
One module per family (``gpt2``, ``llama``) holds the name and layout mapping.
"""

from __future__ import annotations

import dataclasses
import pathlib
from types import ModuleType
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh

from models import build_model
from models.config import ModelConfig
from models.hf import gpt2, llama
from models.hf.common import ConversionError, Params, Path, Weights, read_config

__all__ = ["ConversionError", "export", "load", "load_config", "params_to_numpy"]

FAMILIES: tuple[ModuleType, ...] = (gpt2, llama)


def _family_of_hf(hf: dict) -> ModuleType:
    model_type = hf.get("model_type")
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.MODEL_TYPES)
    raise ConversionError(f"model_type '{model_type}' is not supported; supported types: {known}")


def _family_of(cfg: ModelConfig) -> ModuleType:
    for family in FAMILIES:
        if family.matches(cfg):
            return family
    raise ConversionError(
        f"no Hugging Face architecture matches this model (position={cfg.position}, norm={cfg.norm}, "
        f"mlp={cfg.mlp}, use_bias={cfg.use_bias}); GPT-2 needs learned/layernorm/gelu with biases, "
        "Llama needs rope/rmsnorm/swiglu"
    )


def load_config(path: str | pathlib.Path, **overrides: Any) -> ModelConfig:
    """Our ``ModelConfig`` for the HF directory ``path``; ``overrides`` replace fields (e.g. compute_dtype)."""
    hf = read_config(pathlib.Path(path))
    cfg = dataclasses.replace(_family_of_hf(hf).config_from_hf(hf), **overrides)
    problems = cfg.problems()
    if problems:
        raise ConversionError(f"{path}: {problems[0]}")
    return cfg


def load(path: str | pathlib.Path, mesh: Mesh | None = None, **overrides: Any) -> tuple[nnx.Module, ModelConfig]:
    """Reads the HF directory ``path`` (config.json + safetensors) into our model.

    Returns ``(model, cfg)``; ``model(tokens [B, T] int) -> logits [B, T, vocab] float32``.
    Parameters are float32 whatever the checkpoint stores. ``overrides`` replace ModelConfig
    fields that do not change parameter shapes (``compute_dtype='float32'``, ``remat``, ...).
    With ``mesh``, each parameter is created directly with its sharding; without, on the
    default device.
    """
    path = pathlib.Path(path)
    hf = read_config(path)
    family = _family_of_hf(hf)
    cfg = load_config(path, **overrides)
    weights = Weights(path, family.PREFIXES, family.IGNORE)
    model = assemble(cfg, family.params_from_hf(weights, cfg), mesh)
    unused = weights.unused()
    if unused:
        raise ConversionError(
            f"{path} holds {len(unused)} weights this converter does not map (first: {unused[0]}); "
            "its config.json describes a different architecture"
        )
    return model, cfg


def assemble(cfg: ModelConfig, params: Iterable[tuple[Path, np.ndarray]], mesh: Mesh | None = None) -> nnx.Module:
    """Our model of ``cfg`` holding ``params`` (path -> array, every parameter exactly once).

    Each host array is placed as soon as it arrives and then dropped, so peak host memory is
    one (stacked) parameter, and with ``mesh`` each device receives only its own shard.
    """
    from sharding.rules import logical_to_mesh

    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=0)))
    abstract = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    shardings = None
    if mesh is not None:
        shardings = traverse_util.flatten_dict(nnx.to_pure_dict(logical_to_mesh(nnx.get_partition_spec(state), mesh)))
    values = {}
    for p, array in params:
        if p not in abstract:
            raise ConversionError(f"parameter {'.'.join(p)} does not exist in our model of this config")
        want = abstract[p]
        if tuple(array.shape) != tuple(want.shape):
            raise ConversionError(
                f"parameter {'.'.join(p)} has shape {tuple(array.shape)} in the checkpoint but {tuple(want.shape)} "
                "in our model; the config does not match the weights"
            )
        array = np.asarray(array, dtype=want.dtype)
        if shardings is None:
            values[p] = jnp.asarray(array)
        else:
            values[p] = jax.make_array_from_callback(array.shape, shardings[p], lambda index, a=array: a[index])
    missing = sorted(".".join(p) for p in abstract if p not in values)
    if missing:
        raise ConversionError(f"the checkpoint gives no value for {missing[0]} (and {len(missing) - 1} more)")
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, state)


def params_to_numpy(model_or_params: Any) -> Params:
    """Flat {path: float32 numpy} from a model, an ``nnx.State`` or a nested dict of arrays.

    Sharded arrays are gathered (across processes too), so call this on every process.
    """
    tree = model_or_params
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    flat = traverse_util.flatten_dict(tree)

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x, dtype=np.float32)

    return {tuple(str(k) for k in p): host(x) for p, x in flat.items()}


def export(
    model_or_params: Any,
    cfg: ModelConfig,
    path: str | pathlib.Path,
    tokenizer: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Writes ``path/config.json`` + ``path/model.safetensors`` (float32) for transformers.

    ``model_or_params``: our model, its ``nnx.State`` or a nested dict of arrays. With
    ``tokenizer`` (a directory AutoTokenizer reads) its files are written too and the config
    takes its bos/eos/pad ids. Every process must call this; only process 0 writes.
    """
    from safetensors.numpy import save_file

    family = _family_of(cfg)
    params = params_to_numpy(model_or_params)
    tensors = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in family.params_to_hf(params, cfg)}
    hf_config = family.config_to_hf(cfg)
    tok = None
    if tokenizer is not None:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
        if len(tok) > cfg.vocab_size:
            raise ConversionError(
                f"tokenizer {tokenizer} has {len(tok)} tokens but the model only {cfg.vocab_size}; "
                "pass the tokenizer the model was trained with"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(hf_config, name, getattr(tok, name))
    if jax.process_index() != 0:
        return pathlib.Path(path)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(path))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        tok.save_pretrained(str(path))
    return path
