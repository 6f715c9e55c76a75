"""``python -m train.quantize SOURCE OUT [--bits 8] [--skip REGEX] [--embeddings]``: a post-training int8 export.

SOURCE is a run directory (its newest intact checkpoint), an export or a Hugging Face model
directory. OUT gets the layout of ``python -m train.export`` (``model.json`` + ``params/``), with
``model.quant='int8'``: every Dense kernel whose path (e.g. ``stack/blocks/mlp/wi``) does not match
``--skip`` (``re.search``) is stored as int8 with a float32 scale per output channel
(``models/quant.py``); with ``--embeddings`` the token tables and LM heads too (one scale per row of a
table, which a tied head reads; one per vocabulary entry of an untied head). Position tables, norms and
biases stay float32. A quantisation-aware run (``model.quant=qat``) is exported with the selection it
trained with (its ``quant_skip`` / ``quant_embeddings``; ``--skip`` / ``--embeddings`` may only repeat
them), so the export computes what its fake-quantised forward did. ``train.evaluate``,
``train.generate``, ``train.export`` and ``train.checkpoints.sources.load_source`` read it as any export.
A Hugging Face tokenizer of SOURCE is saved alongside.

User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from train import cli
from train.compress.quantizing import quantize_source


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m train.quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a run, export or Hugging Face model directory")
    parser.add_argument("out", help="a new directory")
    parser.add_argument("--bits", type=int, default=8, help="weight bits (only 8)")
    parser.add_argument("--skip", help="regex over Dense paths to keep in float (e.g. 'mlp/wo|classifier')")
    parser.add_argument("--embeddings", action="store_true", default=None, help="token tables and LM heads in int8 too")

    def command() -> None:
        args = parser.parse_args(argv)
        cli.start_jax()
        source, done = quantize_source(
            pathlib.Path(args.source), pathlib.Path(args.out), args.bits, args.skip, args.embeddings
        )
        print(f"quantised {len(done)} layers of {source} to int8 in {args.out}", flush=True)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
