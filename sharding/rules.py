"""The one table that maps logical axis names onto mesh axes, and its helpers.

Parameters: ``vocab embed heads kv_heads mlp norm layers relpos_buckets``. Activations: ``batch length
act_embed act_heads act_kv_heads act_mlp act_vocab``. Mesh axes: ``data fsdp tensor``.
Changing the parallelism strategy means editing this table, not the model.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("relpos_buckets", None),  # T5 relative-position bias table rows
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def logical_to_mesh(logical_specs, mesh: Mesh):
    """A tree of logical PartitionSpecs -> the same tree of NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (batch) axis of every input over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activation_context(mesh: Mesh):
    """Makes the model's logical activation constraints (``models.layers.constrain``) bind to ``mesh``."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield
