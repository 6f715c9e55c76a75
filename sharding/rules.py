"""The one table that maps logical axis names onto mesh axes, and its helpers.

Parameters: ``vocab embed heads kv_heads mlp norm layers relpos_buckets``. Activations: ``batch length
act_embed act_heads act_kv_heads act_mlp act_vocab``. Mesh axes: ``data fsdp tensor``.
Changing the parallelism strategy means editing this table, not the model; a run can override
entries from its config (``mesh.rules``, see ``merge_rules``).
"""

from __future__ import annotations

import contextlib
import difflib

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

RULES: Rules = (
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
FIXED = frozenset({"batch"})  # input batches are laid out over BATCH_AXES by the data pipeline


def axes_of(entry: MeshAxes) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple: None -> (), 'tensor' -> ('tensor',)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def rule_problems(overrides: Rules, key: str = "mesh.rules") -> list[str]:
    """What is wrong with ``overrides`` ([logical, mesh axes] pairs), one sentence each."""
    known = [name for name, _ in RULES]
    out = []
    for i, (name, entry) in enumerate(overrides):
        if name not in known:
            match = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else f"; known: {', '.join(known)}"
            out.append(f"{key}[{i}] names the unknown logical axis '{name}'{hint}")
        elif name in FIXED:
            out.append(f"{key}[{i}] cannot change '{name}': input batches are sharded over {BATCH_AXES}")
        for axis in axes_of(entry):
            if axis not in MESH_AXES:
                out.append(f"{key}[{i}] maps '{name}' to '{axis}', which is not a mesh axis ({', '.join(MESH_AXES)})")
        if len(set(axes_of(entry))) != len(axes_of(entry)):
            out.append(f"{key}[{i}] names a mesh axis twice for '{name}'")
    return out


def merge_rules(overrides: Rules = ()) -> Rules:
    """``overrides`` first, then the default table without the logical names they redefine.

    As MaxText's ``logical_axis_rules``: ``(('embed', 'tensor'),)`` shards ``embed`` over
    ``tensor`` instead of ``fsdp`` and leaves every other rule as it is.
    """
    redefined = {name for name, _ in overrides}
    return tuple(overrides) + tuple(rule for rule in RULES if rule[0] not in redefined)


def logical_to_mesh(logical_specs, mesh: Mesh, rules: Rules = RULES):
    """A tree of logical PartitionSpecs -> the same tree of NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def mesh_spec(logical: PartitionSpec, rules: Rules = RULES) -> PartitionSpec:
    """The mesh PartitionSpec ``rules`` give one logical spec (Flax's matching: first free rule wins)."""
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (batch) axis of every input over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules: Rules = RULES):
    """Makes the model's logical activation constraints (``models.layers.constrain``) bind to ``mesh``."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
