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
import dataclasses
import pathlib
import sys

from models.config import ConfigError
from train import cli

BITS = (8,)


def quantize_source(
    src: pathlib.Path, out_dir: pathlib.Path, bits: int = 8, skip: str | None = None, embeddings: bool | None = None
) -> tuple[str, list[str]]:
    """Writes the int8 export of ``src`` to ``out_dir``; returns (what was read, the quantised paths).

    ``skip`` / ``embeddings`` None: '' / False, or a QAT source's own selection."""
    from flax import nnx

    from models.config import regex_problem
    from models.quant import float_weights, quantize_model
    from train.checkpoints.exporting import new_out_dir, write_params
    from train.checkpoints.sources import load_source

    if bits not in BITS:
        raise ConfigError(f"--bits {bits} is not supported; only --bits 8 (weight-only int8) is")
    if skip and regex_problem(skip):
        raise ConfigError(f"--skip '{skip}' is not a regex ({regex_problem(skip)}); fix it")
    out_dir = new_out_dir(out_dir)
    source = load_source(src)
    if source.config.quant == "int8":
        raise ConfigError(f"SOURCE '{src}' is already quantised ({source.config.quant}); give a float model")
    if source.config.quant == "qat":
        skip, embeddings = _qat_selection(source.config, skip, embeddings, src)
        float_weights(source.model)
    skip, embeddings = skip or "", bool(embeddings)
    done = quantize_model(source.model, skip, embeddings)
    if not done:
        raise ConfigError(f"--skip '{skip}' matches every layer, so nothing would be quantised; narrow it")
    cfg = dataclasses.replace(source.config, quant="int8", quant_skip=skip, quant_embeddings=embeddings)
    write_params(nnx.state(source.model, nnx.Param), cfg, out_dir, source.tokenizer, source.labels)
    return source.description, done


def _qat_selection(cfg, skip: str | None, embeddings: bool | None, src: pathlib.Path) -> tuple[str, bool]:
    """A QAT run's (quant_skip, quant_embeddings); ConfigError when --skip / --embeddings ask for others."""
    if skip not in (None, cfg.quant_skip) or embeddings not in (None, cfg.quant_embeddings):
        raise ConfigError(
            f"SOURCE '{src}' trained with model.quant=qat for quant_skip='{cfg.quant_skip}', quant_embeddings="
            f"{cfg.quant_embeddings}; drop --skip / --embeddings so the export rounds what the run rounded"
        )
    return cfg.quant_skip, cfg.quant_embeddings


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
