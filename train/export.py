"""``python -m train.export SRC OUT_DIR``: a model's parameters in another layout.

    python -m train.export SRC OUT_DIR [--format params|hf|checkpoint|peft|stablehlo] [--tokenizer DIR] [--best]
        [--merge-lora]

SRC is any model source (train/checkpoints/sources.py): a run directory (its newest intact checkpoint, or with
``--best`` its best one, kept by ``checkpoint.keep_best``; also its ``checkpoints/`` directory or a
``--format checkpoint`` output), an export of any format (``train.export``, ``train.quantize``,
``train.prune``, a LoRA run's with its adapters) or a Hugging Face model directory (config.json +
safetensors). Every format carries SRC's tokenizer (a run's ``data.tokenizer``): a Hugging Face
tokenizer's files, or ``byte_tokenizer.json`` for the byte tokenizer (train/data/tokenizer.py).

--format params (default)
    ``OUT_DIR/params`` (an Orbax StandardCheckpointer tree of fp32 arrays, nested dicts keyed
    like the model's parameters), ``OUT_DIR/model.json`` (the ``ModelConfig``) and for a
    classifier ``OUT_DIR/labels.json`` (``id2label``, as in --format hf); no optimizer
    state, data position or run config. ``train.checkpoints.sources.load_export(OUT_DIR)`` reads both back.
--format hf
    ``OUT_DIR/{config.json, model.safetensors}`` for transformers' ``from_pretrained``, and the
    tokenizer's files (``--tokenizer DIR``'s instead of SRC's; its special token ids in the config).
    A decoder that stops at more than eos (SRC's own ``eos_token_id`` list, its chat template's
    end-of-turn token) also gets ``generation_config.json`` listing them, as transformers reads it.
    Not for int8 models.
--format peft
    An adapter, prefix or prompt run (``peft.method``): ``OUT_DIR/base`` (--format hf) and the method's
    parameters beside it (``peft.json`` + ``peft.safetensors``, train/checkpoints/peft_dir.py); a
    source for every reader. None of them folds into the base weights (bottleneck adapters sit behind a
    non-linearity; prefixes and prompts are extra keys/values), and a prefix's reparameterisation MLP
    is folded into plain keys and values in every format.
    A LoRA run's adapters in the PEFT layout (``OUT_DIR/{adapter_config.json, adapter_model.safetensors}``,
    Hugging Face module names; Llama-style families) for ``PeftModel.from_pretrained``. Its
    ``base_model_name_or_path`` is the run's ``checkpoint.init_from`` when that is a Hugging Face
    directory; otherwise the base is written beside them as ``OUT_DIR/base`` (``--format hf``).
--format checkpoint
    ``OUT_DIR/0/`` in the layout of a run's ``checkpoints/`` (state = {"params": ...}) and
    ``OUT_DIR/config.yaml``: ``python -m train OUT_DIR/config.yaml run.dir=...`` fine-tunes it
    (its ``checkpoint.init_from`` points at OUT_DIR, its ``data.tokenizer`` at the tokenizer saved there).
--format stablehlo
    A serving export through ``jax.export`` (train/checkpoints/serving.py): ``forward.jaxexport``
    (and a decoder's ``prefill.jaxexport`` + ``decode.jaxexport``) with a symbolic batch size,
    ``weights.npz`` and ``serving.json``; ``jax.export.deserialize`` runs them without meshlm.
    The tokenizer is saved beside them.

--merge-lora folds a LoRA run's adapters into its base weights (W + alpha / rank * A @ B; an int8
base, QLoRA, is dequantised first) and writes the plain float model (its config without LoRA) in any format; without it a LoRA run's
parameters are written with their adapters.

User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from train import cli
from train.checkpoints.exporting import FORMATS, export


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="a run, export or Hugging Face model directory")
    parser.add_argument("out_dir", help="a new directory")
    parser.add_argument("--format", choices=FORMATS, default="params")
    parser.add_argument("--tokenizer", default=None, help="--format hf: a tokenizer directory to write alongside")
    parser.add_argument("--best", action="store_true", help="a run's best checkpoint (checkpoint.keep_best)")
    parser.add_argument("--merge-lora", action="store_true", help="fold a LoRA run's adapters into its base weights")

    def command() -> None:
        args = parser.parse_args(argv)
        cli.start_jax()
        source = export(
            pathlib.Path(args.src), pathlib.Path(args.out_dir), args.format, args.tokenizer, args.best, args.merge_lora
        )
        print(f"exported {source} to {args.out_dir}", flush=True)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
