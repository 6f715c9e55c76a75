"""``python -m train.prune SOURCE OUT --method magnitude|heads|neurons --sparsity S [--scope global|layer]``.

SOURCE is a run directory (its newest intact checkpoint), an export or a Hugging Face model directory
(train/checkpoints/sources.py). OUT gets the layout of ``python -m train.export`` (``model.json`` + ``params/``),
which ``train.evaluate``, ``train.generate``, ``train.checkpoints.sources.load_source`` and ``checkpoint.init_from``
read, plus ``prune.json`` (what was done), and SOURCE's Hugging Face tokenizer if it has one.

--method magnitude
    Unstructured: the round(S * n) weights of smallest magnitude of the Transformer's matrices
    (``--targets``, default ``prune.targets``) become zero, ranked over all of them (``--scope
    global``) or per matrix per layer (``--scope layer``); same shapes, and ``masks/`` (bool, False:
    pruned). Dense kernels do the same work with zeros, so this saves no time or memory by itself.
--method neurons
    Removes round(S * d_ff) MLP neurons of every layer, the least important by weight norm
    (train/compress/structured.py): a smaller ``d_ff``.
--method heads
    Removes round(S * n_heads) attention heads of every layer (whole key/value groups under
    grouped-query attention: round(S * n_kv_heads) groups): smaller ``n_heads`` / ``n_kv_heads``,
    ``head_dim`` written out. Not for encoder-decoder (T5) models.
--importance weight|taylor
    Structured methods: rank heads / neurons by weight norm (default), or by the first-order Taylor
    estimate of the loss change when each is removed, averaged over ``--batches`` training batches
    of SOURCE, which must then be a run directory (its data and objective make the batches).

A smaller model fine-tunes with ``checkpoint.init_from=OUT`` and the sizes the command prints.
User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from models.config import ConfigError, ModelConfig
from train import cli

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

    check_request(method, sparsity, scope, importance, targets)
    out_dir = new_out_dir(out_dir)
    source = load_source(src)
    cfg = source.config
    check_model(cfg)
    params = nnx.state(source.model, nnx.Param)
    before = _count(params)
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
    record |= {"params_before": before, "params_after": _count(params)}
    (out_dir / "prune.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _count(params) -> int:
    import jax

    return sum(x.size for x in jax.tree.leaves(params))


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


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m train.prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a run, export or Hugging Face model directory")
    parser.add_argument("out", help="a new directory")
    parser.add_argument("--method", required=True, help="magnitude, heads or neurons")
    parser.add_argument("--sparsity", type=float, required=True, help="share removed / zeroed, in [0, 1)")
    parser.add_argument("--scope", default="global", help="magnitude: global (default) or layer")
    parser.add_argument("--targets", default="", help="magnitude: regex over parameter paths (default prune.targets)")
    parser.add_argument("--importance", default="weight", help="heads / neurons: weight (default) or taylor")
    parser.add_argument("--batches", type=int, default=8, help="--importance taylor: training batches to average")

    def command() -> None:
        args = parser.parse_args(argv)
        cli.start_jax()
        record = prune_source(
            pathlib.Path(args.source),
            pathlib.Path(args.out),
            args.method,
            args.sparsity,
            args.scope,
            args.targets,
            args.importance,
            args.batches,
        )
        done = f"{record['params_before'] / 1e6:.3f}M -> {record['params_after'] / 1e6:.3f}M parameters"
        if record["method"] == "magnitude":
            done = f"{record['zeros']} of {record['targeted']} targeted weights zeroed"
        print(f"pruned {record['source']} ({args.method}, sparsity {args.sparsity}): {done}, in {args.out}", flush=True)
        overrides = recovery_overrides(record)
        if overrides:
            print(f"fine-tune it with: python -m train CONFIG checkpoint.init_from={args.out} {overrides}", flush=True)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
