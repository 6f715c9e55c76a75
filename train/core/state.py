"""The train state, its abstract shape and its shardings: one description for init, restore and AOT.

``StateSpec`` holds everything static about a run's state (model graph, optimizer, shapes,
shardings); ``init_state`` materialises it directly with the target shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding

from models import abstract_model, build_model
from models.config import ModelConfig
from sharding.rules import RULES, Rules, logical_to_mesh, replicated
from train.config.sections import OptimizerConfig, PruneConfig
from train.core.freeze import NOTHING, Freeze, frozen_set, kept_rows, zero_frozen_rows
from train.core.optimizer import make_optimizer


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 []
    params: nnx.State  # fp32 master weights
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StateSpec:
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract: TrainState  # ShapeDtypeStruct leaves
    shardings: TrainState  # NamedSharding leaves
    logical_specs: nnx.State  # logical PartitionSpec per parameter
    rules: Rules = RULES  # logical axis -> mesh axes: parameters here, activations in the steps
    trainable_params: int = 0  # parameter values the optimizer changes (all but the frozen ones)
    frozen: frozenset[str] = frozenset()  # paths of the parameters kept whole (train/core/freeze.py)
    adapter_only: bool = False  # a LoRA run: checkpoints hold the trainable parameters only (train/checkpoints/adapters.py)
    metrics: Callable[[nnx.State], dict] | None = None  # extra train metrics of the new params (prune: sparsity)
    # (path -> gradient of a trainable parameter, new optimizer state) -> the gradients clipping saw
    clip_input: Callable[[dict, optax.OptState], dict] = lambda grads, opt_state: grads


def make_state_spec(
    model_cfg: ModelConfig,
    opt_cfg: OptimizerConfig,
    total_steps: int,
    mesh: Mesh,
    rules: Rules = RULES,
    freeze: Freeze = NOTHING,
    prune: PruneConfig | None = None,
) -> StateSpec:
    """The run's state described once: shapes, and shardings from the logical axes through ``rules``.

    Raises ConfigError when ``freeze`` names no parameter, too many layers, or every parameter, and
    when ``prune`` (on when its sparsity is > 0: masks in the optimizer state) targets no matrix.
    """
    graphdef, abstract_params = abstract_model(model_cfg)
    logical_specs = nnx.get_partition_spec(abstract_params)
    tx, trainable = make_optimizer(opt_cfg, total_steps, abstract_params, logical_specs, freeze)
    rows = kept_rows(abstract_params, logical_specs, freeze.layers)
    metrics, unpruned = None, lambda grads, opt_state: grads
    if prune is not None and prune.sparsity > 0:
        from train.compress.magnitude import with_pruning

        tx, metrics, unpruned = with_pruning(tx, abstract_params, logical_specs, prune, freeze)

    def clip_input(grads: dict, opt_state: optax.OptState) -> dict:
        return unpruned(zero_frozen_rows(grads, rows), opt_state)

    param_shardings = logical_to_mesh(logical_specs, mesh, rules)
    abstract_opt, opt_shardings = optimizer_state_shardings(tx, abstract_params, param_shardings, mesh)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
    )
    shardings = TrainState(step=replicated(mesh), params=param_shardings, opt_state=opt_shardings)
    frozen = frozenset(frozen_set(logical_specs, freeze))
    return StateSpec(
        graphdef, tx, abstract, shardings, logical_specs, rules, trainable, frozen, freeze.adapters_only, metrics,
        clip_input,
    )  # fmt: skip


def optimizer_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh: Mesh):
    """(abstract optimizer state, its NamedShardings on ``mesh``), as JAX propagates the parameters'
    shardings through ``tx.init``.

    Traced on an explicit-sharding copy of the mesh, every state array carries the sharding its
    computation from the parameters gives: moments shaped like a parameter are sharded like it,
    Adafactor's factored row / column moments (a parameter reduced over one axis) keep the mesh
    axes of the other axes, and scalars and placeholders are replicated.
    """
    explicit = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names))
    typed = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(explicit, s.spec)),
        abstract_params,
        param_shardings,
    )
    with jax.set_mesh(explicit):
        traced = jax.eval_shape(tx.init, typed)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), traced)
    shardings = jax.tree.map(
        lambda a: replicated(mesh) if a.sharding is None else NamedSharding(mesh, a.sharding.spec), traced
    )  # scalars: None
    return abstract, shardings


def init_state(spec: StateSpec, model_cfg: ModelConfig, seed: int) -> TrainState:
    """Fresh parameters and optimizer state, each array created directly with its sharding.

    Values do not depend on the mesh (partitionable threefry), so every mesh starts identically.
    """

    def init() -> TrainState:
        params = nnx.state(build_model(model_cfg, seed))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=spec.tx.init(params),
        )

    return jax.jit(init, out_shardings=spec.shardings)()


def count_params(params) -> int:
    """The number of scalars in a tree of arrays (a model's parameters)."""
    return sum(x.size for x in jax.tree.leaves(params))
