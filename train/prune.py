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
import pathlib
import sys

from train import cli
from train.compress.pruning import prune_source, recovery_overrides


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
