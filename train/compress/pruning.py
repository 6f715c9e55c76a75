"""Pruning a model source into a new export: the work of ``python -m train.prune`` (its --help describes the
methods). Unstructured magnitude pruning zeroes weights (train/compress/magnitude.py ranks them); structured
pruning removes heads or MLP neurons (train/compress/structured.py), ranked by weight norm or Taylor scores."""

from __future__ import annotations

import json
import pathlib

from models.config import ConfigError, ModelConfig

METHODS = ("magnitude", "heads", "neurons")


def check_request(method: str, sparsity: float, scope: str, importance: str = "weight", targets: str = "") -> None:
    """ConfigError when the arguments contradict each other (checked before the model loads)."""
    from models.config import regex_problem

    if method not in METHODS:
        raise ConfigError(f"--method {method} is not one of {', '.join(METHODS)}")
    if not 0 <= sparsity < 1:
        raise ConfigError(f"--sparsity {sparsity} must be in [0, 1)")
    if scope not in ("global", "layer"):
        raise ConfigError(f"--scope {scope} is not global or layer")
    if method != "magnitude" and scope != "global":
        raise ConfigError(f"--scope applies to --method magnitude only; leave it out for --method {method}")
    if importance not in ("weight", "taylor"):
        raise ConfigError(f"--importance {importance} is not weight or taylor")
    if method == "magnitude" and importance != "weight":
        raise ConfigError("--importance applies to --method heads and neurons; magnitude ranks weights by size")
    if targets and regex_problem(targets):
        raise ConfigError(f"--targets '{targets}' is not a regex ({regex_problem(targets)}); fix it")


def check_model(cfg: ModelConfig) -> None:
    """ConfigError when a model of ``cfg`` cannot be pruned as it is."""
    if cfg.quant != "none":
        raise ConfigError(f"SOURCE is quantised ({cfg.quant}); prune the float model, then quantise the result")
    if cfg.lora_rank:
        raise ConfigError("SOURCE has LoRA adapters; fold them in first: python -m train.export SRC OUT --merge-lora")


def magnitude(params, cfg: ModelConfig, sparsity: float, scope: str, pattern: str):
    """(params with the pruned weights zeroed, masks as a nested dict of bool arrays, {path: zeros})."""
    import jax
    import jax.numpy as jnp
    from flax import nnx, traverse_util

    from train.compress.magnitude import group_sizes, magnitude_masks, targets, zeros_for
    from train.core.freeze import param_path

    layer_axes = targets(nnx.get_partition_spec(params), pattern)
    if not layer_axes:
        raise ConfigError(f"--targets '{pattern}' matches no matrix; paths look like 'stack/blocks/mlp/wi/kernel'")
    flat = {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    shapes = {p: flat[p].shape for p in layer_axes}
    zeros = jnp.asarray([zeros_for(sparsity, n) for n in group_sizes(shapes, layer_axes, scope)], jnp.int32)
    masks = magnitude_masks({p: flat[p] for p in layer_axes}, layer_axes, zeros, scope)
    pure = traverse_util.flatten_dict(nnx.to_pure_dict(params), sep="/")
    pruned = {p: jnp.where(masks[p], x, 0) if p in masks else x for p, x in pure.items()}
    nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(pruned, sep="/"))
    counts = {p: int(m.size - jnp.sum(m)) for p, m in masks.items()}
    return params, traverse_util.unflatten_dict(masks, sep="/"), counts


def taylor_contributions(source, batches: int) -> dict:
    """path -> [L, rows] mean over ``batches`` training batches of |<dL/dW_r, W_r>| for every output row r
    of each stack's ``mlp/wo`` and ``attn/o`` kernels (train/compress/structured.py ``taylor_scores``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx, traverse_util

    from train.core.step import summed_loss
    from train.data.tasks import make_task

    if source.run_config is None:
        raise ConfigError(
            f"--importance taylor needs a run directory as SOURCE (its training data makes the batches), not "
            f"a {source.kind} directory; use --importance weight"
        )
    if batches < 1:
        raise ConfigError(f"--batches {batches} must be at least 1")
    task = make_task(source.run_config, source.config, source.tokenizer)
    graphdef, params = nnx.split(source.model)
    outputs = {("mlp", "wo", "kernel"), ("attn", "o", "kernel")}

    @jax.jit
    def rows(params, batch):
        def mean_loss(p):
            total, weight = summed_loss(graphdef, p, batch)
            return total / weight

        grads = traverse_util.flatten_dict(nnx.to_pure_dict(jax.grad(mean_loss)(params)))
        weights = traverse_util.flatten_dict(nnx.to_pure_dict(params))
        return {p: jnp.abs(jnp.sum(g * weights[p], axis=-1)) for p, g in grads.items() if p[-3:] in outputs}

    total = None
    for step in range(batches):
        found = rows(params, {k: jnp.asarray(v) for k, v in task.batch(next(task.batches), step).items()})
        total = found if total is None else jax.tree.map(jnp.add, total, found)
    return {p: np.asarray(x) / batches for p, x in total.items()}


def prune_source(
    src: pathlib.Path,
    out_dir: pathlib.Path,
    method: str,
    sparsity: float,
    scope: str = "global",
    targets: str = "",
    importance: str = "weight",
    batches: int = 8,
) -> dict:
    """Writes the pruned export of ``src`` to ``out_dir``; returns its ``prune.json`` record."""
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx, traverse_util

    from train.checkpoints.exporting import new_out_dir, write_params
    from train.checkpoints.sources import load_source
    from train.compress.structured import METHODS as SHRINK
    from train.config.sections import PruneConfig
    from train.core.state import count_params

    check_request(method, sparsity, scope, importance, targets)
    out_dir = new_out_dir(out_dir)
    source = load_source(src)
    cfg = source.config
    check_model(cfg)
    params = nnx.state(source.model, nnx.Param)
    before = count_params(params)
    record = {"source": str(source.path), "step": source.step, "method": method, "sparsity": sparsity}
    if method == "magnitude":
        params, masks, counts = magnitude(params, cfg, sparsity, scope, targets or PruneConfig.targets)
        write_params(params, cfg, out_dir, source.tokenizer)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(out_dir / "masks", masks)
            checkpointer.wait_until_finished()
        total = sum(int(np.prod(m.shape)) for m in traverse_util.flatten_dict(masks).values())
        record |= {"scope": scope, "zeros": sum(counts.values()), "targeted": total}
    else:
        flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(params)).items()}
        contributions = taylor_contributions(source, batches) if importance == "taylor" else None
        small, cfg, _ = SHRINK[method](flat, cfg, sparsity, contributions)
        params = _as_state(small, cfg)
        write_params(params, cfg, out_dir, source.tokenizer)
        record |= {"importance": importance, **({"batches": batches} if contributions else {})}
        record |= {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "d_ff": cfg.d_ff}
    record |= {"params_before": before, "params_after": count_params(params)}
    (out_dir / "prune.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _as_state(flat: dict, cfg: ModelConfig):
    """An nnx.State of ``cfg``'s model holding the arrays of ``flat`` (path tuple -> array)."""
    import jax.numpy as jnp
    from flax import nnx, traverse_util

    from models import abstract_model

    _, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}))
    return state


def recovery_overrides(record: dict) -> str:
    """The ``model.*`` overrides a fine-tune of a structured-pruned export needs."""
    if record["method"] == "neurons":
        return f"model.d_ff={record['d_ff']}"
    if record["method"] == "heads":
        kv = f" model.n_kv_heads={record['n_kv_heads']}" if record["n_kv_heads"] else ""
        return f"model.n_heads={record['n_heads']}{kv} model.head_dim={record['head_dim']}"
    return ""
