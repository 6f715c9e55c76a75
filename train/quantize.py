"""``python -m train.quantize SOURCE OUT [--bits 8] [--skip REGEX] [--embeddings]``: a post-training int8 export.

SOURCE is a run directory (its newest intact checkpoint), an export or a Hugging Face model
directory. OUT gets the layout of ``python -m train.export`` (``model.json`` + ``params/``), with
``model.quant='int8'``: every Dense kernel whose path (e.g. ``stack/blocks/mlp/wi``) does not match
``--skip`` (``re.search``) is stored as int8 with a float32 scale per output channel
(``models/quant.py``); with ``--embeddings`` the token tables too (one scale per row; a tied LM
head reads the same int8 table). Untied LM heads, position tables, norms and biases stay float32. ``train.evaluate``,
``train.generate``, ``train.export.load`` and ``train.sources.load_source`` read it as any export.
A Hugging Face tokenizer of SOURCE is saved alongside.

User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from models.config import ConfigError
from train import cli

BITS = (8,)


def quantize_source(
    src: pathlib.Path, out_dir: pathlib.Path, bits: int = 8, skip: str = "", embeddings: bool = False
) -> tuple[str, list[str]]:
    """Writes the int8 export of ``src`` to ``out_dir``; returns (what was read, the quantised paths)."""
    from flax import nnx

    from models.config import regex_problem
    from models.quant import quantize_model
    from train.export import new_out_dir, write_params
    from train.sources import load_source

    if bits not in BITS:
        raise ConfigError(f"--bits {bits} is not supported; only --bits 8 (weight-only int8) is")
    if skip and regex_problem(skip):
        raise ConfigError(f"--skip '{skip}' is not a regex ({regex_problem(skip)}); fix it")
    out_dir = new_out_dir(out_dir)
    source = load_source(src)
    if source.config.quant != "none":
        raise ConfigError(f"SOURCE '{src}' is already quantised ({source.config.quant}); give a float model")
    done = quantize_model(source.model, skip, embeddings)
    if not done:
        raise ConfigError(f"--skip '{skip}' matches every layer, so nothing would be quantised; narrow it")
    cfg = dataclasses.replace(source.config, quant="int8", quant_skip=skip, quant_embeddings=embeddings)
    write_params(nnx.state(source.model, nnx.Param), cfg, out_dir, source.tokenizer)
    return source.description, done


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m train.quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="a run, export or Hugging Face model directory")
    parser.add_argument("out", help="a new directory")
    parser.add_argument("--bits", type=int, default=8, help="weight bits (only 8)")
    parser.add_argument("--skip", default="", help="regex over Dense paths to keep in float (e.g. 'mlp/wo|classifier')")
    parser.add_argument("--embeddings", action="store_true", help="token tables (and tied LM heads) in int8 too")

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
