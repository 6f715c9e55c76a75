"""The train state, its abstract shape and its shardings: one description for init, restore and AOT.

``StateSpec`` holds everything static about a run's state (model graph, optimizer, shapes,
shardings); ``init_state`` materialises it directly with the target shardings.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from models import abstract_model, build_model
from models.config import ModelConfig
from sharding.rules import RULES, Rules, logical_to_mesh, replicated
from train.config import OptimizerConfig
from train.optimizer import make_optimizer


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


def make_state_spec(
    model_cfg: ModelConfig, opt_cfg: OptimizerConfig, total_steps: int, mesh: Mesh, rules: Rules = RULES
) -> StateSpec:
    """The run's state described once: shapes, and shardings from the logical axes through ``rules``."""
    graphdef, abstract_params = abstract_model(model_cfg)
    logical_specs = nnx.get_partition_spec(abstract_params)
    tx = make_optimizer(opt_cfg, total_steps, logical_specs)
    param_shardings = logical_to_mesh(logical_specs, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings, transform_non_params=lambda _: replicated(mesh)
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
    )
    shardings = TrainState(step=replicated(mesh), params=param_shardings, opt_state=opt_shardings)
    return StateSpec(graphdef, tx, abstract, shardings, logical_specs, rules)


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
    return sum(x.size for x in jax.tree.leaves(params))
