"""Hugging Face interop: read a local HF model directory into our model, and write ours as one.

``load(path, mesh)`` maps ``config.json`` to a ``ModelConfig`` and the safetensors weights to
our parameter tree (per-layer weights stacked on the leading ``layers`` axis, torch [out, in]
weights transposed to our [in, out]); with a mesh every array is placed directly with the
``NamedSharding`` our logical axis rules give it. ``export(model, cfg, path)`` writes a
directory that transformers' ``from_pretrained`` loads (``AutoModelForCausalLM`` for GPT-2 and
the Llama-style decoders: Llama, Mistral, Qwen2/3, Gemma), ``AutoModelForMaskedLM``/``...SequenceClassification``/``...TokenClassification`` for BERT, ``AutoModelForSeq2SeqLM``
for T5). LoRA adapters in the PEFT layout: ``models.hf.peft``.

One module per family holds the name and layout mapping, with the same few names:
``MODEL_TYPES``, ``PREFIXES`` (base-model prefixes dropped from HF names), ``IGNORE`` (buffers
that are not parameters), ``config_from_hf(hf, weights)``, ``params_from_hf(weights, cfg, hf)``
(yields ``(our path, array)``), ``matches(cfg)``, ``config_to_hf(cfg)``, ``params_to_hf(params, cfg)``;
and ``present_params(weights, cfg, hf)`` where a checkpoint may lack a head that
``params_from_hf`` would make up (BERT).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import abstract_model
from models.config import ModelConfig
from models.hf import bert, gpt2, llama, t5
from models.hf.common import ConversionError, Params, Path, Weights, read_config

__all__ = ["ConversionError", "export", "label_names", "load", "load_config", "params_to_numpy", "read_params"]

FAMILIES: tuple[ModuleType, ...] = (gpt2, llama, bert, t5)
Rules = tuple[tuple[str, Any], ...]  # (logical axis, mesh axes) pairs, as sharding.rules.RULES


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
        "Llama rope/rmsnorm/swiglu, BERT an encoder with post_norm, T5 relative/rmsnorm without biases"
    )


def label_names(path: str | pathlib.Path) -> list[str]:
    """A classifier's class names in id order from its ``config.json`` ``id2label`` ([] when it has none)."""
    id2label = read_config(pathlib.Path(path)).get("id2label") or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def load_config(path: str | pathlib.Path, **overrides: Any) -> ModelConfig:
    """Our ``ModelConfig`` for the HF directory ``path``; ``overrides`` replace fields (e.g. compute_dtype)."""
    hf = read_config(pathlib.Path(path))
    return _config(_family_of_hf(hf), hf, None, overrides, path)


def _config(family: ModuleType, hf: dict, weights: Weights | None, overrides: dict, path) -> ModelConfig:
    """The family's config with ``overrides``; an HF attention-dropout rate brings ``attention='recompute'``
    (the implementation that has one) unless the overrides choose the attention or its dropout."""
    cfg = family.config_from_hf(hf, weights)
    if cfg.attention_dropout > 0 and not {"attention", "attention_dropout"} & set(overrides):
        cfg = dataclasses.replace(cfg, attention="recompute")
    cfg = dataclasses.replace(cfg, **overrides)
    problems = cfg.problems()
    if problems:
        raise ConversionError(f"{path}: {problems[0]}")
    return cfg


def load(
    path: str | pathlib.Path, mesh: Mesh | None = None, rules: Rules = (), **overrides: Any
) -> tuple[nnx.Module, ModelConfig]:
    """Reads the HF directory ``path`` (config.json + safetensors) into our model.

    Returns ``(model, cfg)``. Decoders: ``model(tokens [B, T] int) -> logits [B, T, vocab]
    float32``; BERT: ``model(tokens, attention_mask, token_types)`` (``bert.hidden_states`` for
    the encoder output); T5: ``model.decode(decoder_tokens, model.encode(tokens, mask), mask)``.
    Parameters are float32 whatever the checkpoint stores. ``overrides`` replace ModelConfig
    fields that do not change parameter shapes (``compute_dtype='float32'``, ``remat``, ...).
    With ``mesh``, each parameter is created directly with the sharding the logical axis
    ``rules`` give it (``sharding.rules.RULES`` or a run's table; a mesh axis that does not
    divide a dimension, such as an odd vocabulary over ``tensor``, is dropped for that
    dimension); without, on the default device.
    """
    path = pathlib.Path(path)
    hf = read_config(path)
    family = _family_of_hf(hf)
    weights = Weights(path, family.PREFIXES, family.IGNORE)
    cfg = _config(family, hf, weights, overrides, path)
    model = assemble(cfg, family.params_from_hf(weights, cfg, hf), mesh, rules)
    unused = weights.unused()
    if unused:
        raise ConversionError(
            f"{path} holds {len(unused)} weights this converter does not map (first: {unused[0]}); "
            "its config.json describes a different architecture"
        )
    return model, cfg


def read_params(path: str | pathlib.Path) -> tuple[ModelConfig, Iterable[tuple[Path, np.ndarray]]]:
    """Our config of the HF directory ``path`` and its parameters as ``(our path, float32 array)``,
    read one at a time as the iterable is consumed.

    Unlike ``load`` nothing is made up or checked for completeness: a head the checkpoint lacks
    is absent (a bare ``BertModel`` gives the encoder and its pooler), for callers that fill the
    rest themselves (``checkpoint.init_from``).
    """
    path = pathlib.Path(path)
    hf = read_config(path)
    family = _family_of_hf(hf)
    weights = Weights(path, family.PREFIXES, family.IGNORE)
    cfg = _config(family, hf, weights, {}, path)
    present = getattr(family, "present_params", family.params_from_hf)
    return cfg, present(weights, cfg, hf)


def is_model_dir(path: str | pathlib.Path) -> bool:
    """Whether ``path`` looks like a Hugging Face model directory (config.json + safetensors)."""
    path = pathlib.Path(path)
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and weights


def _abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, dict[Path, jax.ShapeDtypeStruct], nnx.State]:
    """The model's graph, its flat {path: ShapeDtypeStruct}, and its abstract state (with logical axes)."""
    graphdef, state = abstract_model(cfg)
    return graphdef, traverse_util.flatten_dict(nnx.to_pure_dict(state)), state


def assemble(
    cfg: ModelConfig, params: Iterable[tuple[Path, np.ndarray]], mesh: Mesh | None = None, rules: Rules = ()
) -> nnx.Module:
    """Our model of ``cfg`` holding ``params`` (path -> array, every parameter exactly once).

    Each host array is placed as soon as it arrives and then dropped, so peak host memory is
    one (stacked) parameter, and with ``mesh`` each device receives only its own shard of the
    layout ``rules`` (logical axis -> mesh axes pairs) give it.
    """
    graphdef, abstract, state = _abstract_params(cfg)
    shardings = None
    if mesh is not None:
        if not rules:
            raise ValueError("assemble(..., mesh) needs the logical axis rules too, e.g. sharding.rules.RULES")
        logical = nnx.get_partition_spec(state)
        shardings = traverse_util.flatten_dict(nnx.to_pure_dict(nn.logical_to_mesh_sharding(logical, mesh, rules)))
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
            sharding = fit_sharding(shardings[p], array.shape)
            values[p] = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
    missing = sorted(".".join(p) for p in abstract if p not in values)
    if missing:
        raise ConversionError(f"the checkpoint gives no value for {missing[0]} (and {len(missing) - 1} more)")
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, state)


def fit_sharding(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """``sharding`` without the mesh axes that do not divide their dimension (it stays replicated there).

    Hugging Face vocabularies are often odd (GPT-2: 50257), and jax needs even shards.
    """
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        names = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
        if shape[i] % math.prod(sharding.mesh.shape[n] for n in names):
            spec[i] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


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
    labels: Sequence[str] = (),
) -> pathlib.Path:
    """Writes ``path/config.json`` + ``path/model.safetensors`` (float32) for transformers.

    Raises ConversionError when no HF architecture computes what ``cfg`` does.

    ``model_or_params``: our model, its ``nnx.State`` or a nested dict of arrays. With
    ``tokenizer`` (a directory AutoTokenizer reads) its files are written too and the config
    takes its bos/eos/pad ids. A classifier's ``labels`` (names in id order) become the config's
    ``id2label`` / ``label2id``. Every process must call this; only process 0 writes.
    """
    from safetensors.numpy import save_file

    family = _family_of(cfg)
    hf_config = family.config_to_hf(cfg)
    if labels:
        if cfg.head == "lm" or len(labels) != cfg.num_labels:
            raise ConversionError(
                f"{len(labels)} label names given for a model with head={cfg.head}, "
                f"num_labels={cfg.num_labels}; pass one name per class of a classifier"
            )
        hf_config.id2label = dict(enumerate(labels))
        hf_config.label2id = {name: i for i, name in enumerate(labels)}
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
        if cfg.family == "encoder_decoder":
            hf_config.decoder_start_token_id = tok.pad_token_id
    params = params_to_numpy(model_or_params)
    expected = {p: tuple(a.shape) for p, a in _abstract_params(cfg)[1].items()}
    got = {p: tuple(a.shape) for p, a in params.items()}
    if got != expected:
        wrong = min(set(got.items()) ^ set(expected.items()))
        raise ConversionError(
            f"the parameters do not match the config (first difference: {'.'.join(wrong[0])} {wrong[1]})"
        )
    tensors = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in family.params_to_hf(params, cfg)}
    if jax.process_index() != 0:
        return pathlib.Path(path)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(path))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        tok.save_pretrained(str(path))
    return path
