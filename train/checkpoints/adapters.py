"""Adapter-only checkpoints of LoRA runs: the trainable parameters, and a reference to the base.

A LoRA run (``lora.rank > 0``) trains its adapters (and a classifier's fresh head); every other
parameter is its base, kept whole: what ``checkpoint.init_from`` restored, or, without it, the
seeded random init of the model config. Its checkpoints hold ``TrainState(step, params=<the
trainable parameters, nested dicts keyed by path part>, opt_state)`` (the optimizer holds state
for the trainable parameters only, train/core/freeze.py) and the JSON item ``base``::

    {"init_from": "/abs/runs/base" (or ""), "seed": 0, "fingerprint": "<SHA-256>", "params": 12345}

``fingerprint`` is the SHA-256 of the fingerprints of every base array (train/checkpoints/manifest.py). A
reader (the resume, ``train.evaluate``, ``train.generate``, ``train.export``, ``load_source``, an
``init_from`` of the run) rebuilds the base from the reference, checks the fingerprint and lays
the saved parameters over it; a base that is missing or has changed is a ConfigError naming it.

The base is any model source, read by ``train.checkpoints.sources.warm_start``, and reading a source may come
back here (a LoRA run on another LoRA run): so the functions that rebuild a base take that
function as ``load`` instead of importing it, which keeps train/'s import graph free of cycles.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from models import abstract_model, build_model
from models.config import ModelConfig
from train.checkpoints.manifest import fingerprints, json_digest, verify
from train.checkpoints.store import Checkpoints, partial_restore, restore_target
from train.config import packages
from train.config.sections import ConfigError
from train.core.freeze import param_path
from train.core.state import StateSpec, TrainState

ITEM = "base"  # the checkpoint item holding the reference

# train.checkpoints.sources.warm_start: (init_from, fresh params, restore target, model config, init_layers, verbose) -> params
Load = Callable[[str, nnx.State, nnx.State, ModelConfig, str, bool], nnx.State]


def _name(key_path) -> str:
    """A path into parameters, a nested dict of them or a ``{..., 'value': leaf}`` restore target -> 'a/b/kernel'."""
    return param_path(key_path).removesuffix("/value")


def _flat(tree) -> dict[str, Any]:
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _nest(flat: dict[str, Any]) -> dict:
    """{'a/b/kernel': x} -> {'a': {'b': {'kernel': x}}}."""
    out: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return out


def saved_state(state: TrainState, spec: StateSpec) -> TrainState:
    """What a checkpoint of the run holds: ``state`` itself, or for a LoRA run (``spec.adapter_only``)
    the state with only its trainable parameters (works on ShapeDtypeStruct restore targets alike)."""
    if not spec.adapter_only:
        return state
    return state.replace(params=_nest({p: x for p, x in _flat(state.params).items() if p not in spec.frozen}))


def overlay(params: nnx.State, saved: dict) -> nnx.State:
    """``params`` with every parameter that ``saved`` (nested dicts) holds at the same path replaced."""
    flat = _flat(saved)
    return jax.tree_util.tree_map_with_path(lambda path, x: flat.get(_name(path), x), params)


def fingerprint(params: nnx.State, base: set[str] | frozenset[str]) -> str:
    """SHA-256 over the fingerprints of the parameters at the paths ``base``."""
    return json_digest(fingerprints({p: x for p, x in _flat(params).items() if p in base}))


def reference(init_from: str, seed: int, params: nnx.State, base: frozenset[str], init_layers: str = "") -> dict:
    """The ``base`` item of a LoRA run starting from ``params`` (its base at the paths ``base``)."""
    if init_from and not init_from.startswith(packages.PREFIX):
        init_from = str(pathlib.Path(init_from).absolute())
    count = sum(x.size for p, x in _flat(params).items() if p in base)
    ref = {"init_from": init_from, "seed": seed, "fingerprint": fingerprint(params, base), "params": count}
    return ref | ({"init_layers": init_layers} if init_layers else {})


def base_params(ref: dict, cfg: ModelConfig, shardings, base: set[str], where: str, load: Load) -> nnx.State:
    """The parameters of ``cfg`` a LoRA run started from, rebuilt from its reference ``ref``: the
    seeded init with ``ref['init_from']``'s parameters restored by ``load``, placed with ``shardings``
    (a tree like the parameters). ConfigError when the base is missing or its fingerprint over ``base``
    differs. ``where``: the checkpoint, for the messages."""
    source = ref["init_from"]
    params = jax.jit(lambda: nnx.state(build_model(cfg, ref["seed"])), out_shardings=shardings)()
    what = f"{where} holds only LoRA adapters; its base model '{source}' (the run's checkpoint.init_from)"
    if source:
        if not source.startswith(packages.PREFIX) and not pathlib.Path(source).exists():
            raise ConfigError(f"{what} is missing; put the base back at that path (nothing was deleted)")
        target = restore_target(abstract_model(cfg)[1], shardings)
        try:
            params = load(source, params, target, cfg, ref.get("init_layers", ""), False)
        except ConfigError as e:
            raise ConfigError(f"{what} cannot be read ({e}); put the original base back at that path") from None
    if fingerprint(params, base) != ref["fingerprint"]:
        if not source:
            what = f"{where} holds only LoRA adapters; its base, the random init of seed {ref['seed']},"
            raise ConfigError(f"{what} no longer comes out the same (another JAX version?); retrain the run")
        raise ConfigError(
            f"{what} has changed since the run saved it; put the original base back at that path "
            "(nothing was deleted), or start a new run from the current base"
        )
    return params


def resumed(state: TrainState, ref: dict, cfg: ModelConfig, spec: StateSpec, where: str, load: Load) -> TrainState:
    """A restored adapter-only ``state`` with its base rebuilt underneath (on ``spec``'s shardings) by ``load``."""
    base = base_params(ref, cfg, spec.shardings.params, set(spec.frozen), where, load)
    return state.replace(params=overlay(base, state.params))


def _replicated_like(shardings: list) -> jax.sharding.Sharding:
    """A replicated sharding on the devices of the first of ``shardings`` (the default device when none is)."""
    first = next((s for s in shardings if s is not None), None)
    if isinstance(first, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
    return first or jax.sharding.SingleDeviceSharding(jax.devices()[0])


def is_adapter_only(checkpoints: Checkpoints, step: int) -> bool:
    """Whether ``step`` holds a LoRA run's adapters and the reference to its base (not the whole model)."""
    return (checkpoints.path(step) / ITEM).is_dir()


def restore_params(checkpoints: Checkpoints, step: int, target_params: Any, load: Load) -> Any:
    """The parameters of an adapter-only ``step`` shaped and placed as ``target_params`` (ShapeDtypeStructs
    with shardings: an nnx.State, or nested dicts with 'value' leaves): the saved ones over the base
    ``load`` rebuilds."""
    manifest = checkpoints.read_manifest(step) or {"arrays": {}}
    saved = {name.removeprefix("params/") for name in manifest["arrays"] if name.startswith("params/")}
    cfg = ModelConfig.from_dict(checkpoints.read_config(step)["model"], str(checkpoints.path(step)))
    abstract = abstract_model(cfg)[1]
    wanted = _flat(target_params)
    default = _replicated_like([getattr(t, "sharding", None) for t in wanted.values()])

    def sharding(path) -> jax.sharding.Sharding:
        return getattr(wanted.get(_name(path)), "sharding", None) or default

    shardings = jax.tree_util.tree_map_with_path(lambda path, _: sharding(path), abstract)
    placed = _flat(restore_target(abstract, shardings))
    target = {"params": _nest({p: placed[p] for p in saved})}
    restored = checkpoints.manager.restore(step, args=ocp.args.Composite(state=partial_restore(target))).state
    verify(manifest, restored)
    ref = checkpoints.read_json(step, ITEM)
    base = base_params(ref, cfg, shardings, set(placed) - saved, f"the checkpoint {checkpoints.path(step)}", load)
    full = _flat(overlay(base, restored["params"]))
    return jax.tree_util.tree_map_with_path(
        lambda path, t: jax.device_put(full[_name(path)], t.sharding), target_params
    )
