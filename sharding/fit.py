"""Does a model and batch divide evenly over a mesh? One check, derived from the rules table.

Every dimension that the rules shard must divide by the product of its mesh axes' sizes:
each parameter leaf (its logical axes from the model, its shape from ``abstract_model``), the
activations the model constrains by logical name (sizes from the ``ModelConfig``), and the batch
(``train.batch_size`` over the batch axes, times ``train.grad_accum``, and over the processes).
Change the rules and the check follows. Problems name the config key when one gives the size:

    model.n_heads=6 does not divide over mesh.tensor=4 (logical axis 'act_heads' -> 'tensor')
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from flax import nnx

from models import abstract_model
from models.config import ConfigError, ModelConfig
from sharding.rules import RULES, Rules, axes_of, mesh_spec

# logical axis -> the ModelConfig fields (model.<name>) whose value a dimension of that axis may have
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "vocab": ("vocab_size",),
    "embed": ("d_model",),
    "heads": ("n_heads",),
    "kv_heads": ("n_kv_heads",),
    "mlp": ("d_ff",),
    "layers": ("n_layers", "n_decoder_layers"),
    "relpos_buckets": ("relative_buckets",),
}


def _value(cfg: ModelConfig, field: str) -> int:
    """The size a field gives (``n_kv_heads=0`` means n_heads; ``n_decoder_layers=0`` n_layers)."""
    return {"n_kv_heads": cfg.kv_heads, "n_decoder_layers": cfg.decoder_layers}.get(field, getattr(cfg, field, 0))


def activation_sizes(cfg: ModelConfig, seq_len: int) -> dict[str, tuple[int, str]]:
    """Logical activation axis -> (size, config key) for the activations the models constrain."""
    return {
        "act_heads": (cfg.n_heads, "model.n_heads"),
        "act_kv_heads": (cfg.kv_heads, "model.n_kv_heads"),
        "act_mlp": (cfg.d_ff, "model.d_ff"),
        "act_vocab": (cfg.vocab_size, "model.vocab_size"),
        "act_embed": (cfg.d_model, "model.d_model"),
        "length": (seq_len, "train.seq_len"),
    }


def _over(axes: tuple[str, ...], mesh_shape: Mapping[str, int]) -> str:
    """'mesh.tensor=4' or 'mesh.fsdp*mesh.tensor=8'."""
    return "*".join(f"mesh.{a}" for a in axes) + f"={math.prod(mesh_shape[a] for a in axes)}"


def _problem(what: str, size: int, logical: str, axes: tuple[str, ...], mesh_shape: Mapping[str, int]) -> str | None:
    if size % math.prod(mesh_shape[a] for a in axes) == 0:
        return None
    target = axes[0] if len(axes) == 1 else f"({', '.join(axes)})"
    return f"{what}={size} does not divide over {_over(axes, mesh_shape)} (logical axis '{logical}' -> '{target}')"


def parameter_problems(cfg: ModelConfig, mesh_shape: Mapping[str, int], rules: Rules = RULES) -> list[str]:
    """Every parameter dimension against the mesh axes the rules give its logical axis."""
    out: dict[str, None] = {}  # ordered set: leaves share sizes
    _, abstract = abstract_model(cfg)
    logical_specs = nnx.get_partition_spec(abstract)
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for (path, leaf), logical in zip(leaves, specs):
        for dim, (name, entry) in enumerate(zip(logical, mesh_spec(logical, rules))):
            axes, size = axes_of(entry), leaf.shape[dim]
            keys = [f"model.{f}" for f in CONFIG_KEYS.get(name, ()) if _value(cfg, f) == size]
            what = keys[0] if keys else f"parameter {jax.tree_util.keystr(path)} dimension {dim}"
            problem = _problem(what, size, name, axes, mesh_shape) if axes else None
            if problem:
                out[problem] = None
    return list(out)


def activation_problems(
    cfg: ModelConfig, seq_len: int, mesh_shape: Mapping[str, int], rules: Rules = RULES
) -> list[str]:
    """The constrained activation dimensions against the mesh axes the rules give them."""
    out = []
    for name, (size, key) in activation_sizes(cfg, seq_len).items():
        axes = axes_of(mesh_spec((name,), rules)[0])
        problem = _problem(key, size, name, axes, mesh_shape) if axes else None
        if problem:
            out.append(problem)
    return out


def batch_problems(
    batch_size: int, grad_accum: int, mesh_shape: Mapping[str, int], rules: Rules = RULES, process_count: int = 1
) -> list[str]:
    """The global batch over the batch axes (each micro-batch of ``grad_accum``) and over the processes."""
    axes = axes_of(mesh_spec(("batch",), rules)[0])
    shards = math.prod(mesh_shape[a] for a in axes)
    out = []
    if batch_size % (shards * grad_accum):
        dp = f"the data-parallel size {shards} ({' * '.join(f'mesh.{a}' for a in axes)}) x " if shards > 1 else ""
        out.append(
            f"train.batch_size={batch_size} is not divisible by {dp}train.grad_accum={grad_accum}; "
            f"use a multiple of {shards * grad_accum}"
        )
    return out + process_problems(batch_size, process_count)


def process_problems(batch_size: int, process_count: int) -> list[str]:
    """Each process reads ``batch_size // process_count`` rows of every global batch."""
    if batch_size % process_count == 0:
        return []
    split = f"train.batch_size={batch_size} does not split evenly over {process_count} processes"
    return [f"{split}; make it a multiple of {process_count}"]


def fit_problems(
    cfg: ModelConfig,
    mesh_shape: Mapping[str, int],
    rules: Rules = RULES,
    *,
    batch_size: int,
    seq_len: int,
    grad_accum: int = 1,
    process_count: int = 1,
) -> list[str]:
    """Everything that does not divide over the mesh, one sentence each (empty: it fits)."""
    shapes = parameter_problems(cfg, mesh_shape, rules) + activation_problems(cfg, seq_len, mesh_shape, rules)
    if shapes:
        shapes[-1] += "; change those sizes, the mesh sizes or mesh.rules"
    return batch_problems(batch_size, grad_accum, mesh_shape, rules, process_count) + shapes


def check_fits(cfg: ModelConfig, mesh_shape: Mapping[str, int], rules: Rules = RULES, **sizes: int) -> None:
    """Raises ConfigError with every problem ``fit_problems`` finds (sizes: its keyword arguments)."""
    problems = fit_problems(cfg, mesh_shape, rules, **sizes)
    if problems:
        raise ConfigError("; ".join(problems))
