"""``python -m train.export SRC OUT_DIR``: a model's parameters in another layout.

    python -m train.export SRC OUT_DIR [--format params|hf|checkpoint|peft] [--tokenizer DIR] [--best] [--merge-lora]

SRC is a run directory (its newest intact checkpoint, or with ``--best`` its best one, kept by
``checkpoint.keep_best``; also its ``checkpoints/`` directory or a ``--format checkpoint``
output) or a Hugging Face model directory (config.json + safetensors).

--format params (default)
    ``OUT_DIR/params`` (an Orbax StandardCheckpointer tree of fp32 arrays, nested dicts keyed
    like the model's parameters) and ``OUT_DIR/model.json`` (the ``ModelConfig``); no optimizer
    state, data position or run config. ``load(OUT_DIR)`` reads both back.
--format hf
    ``OUT_DIR/{config.json, model.safetensors}`` for transformers' ``from_pretrained``; with
    ``--tokenizer DIR`` the tokenizer's files too (and its special token ids in the config).
--format peft
    A LoRA run's adapters in the PEFT layout (``OUT_DIR/{adapter_config.json, adapter_model.safetensors}``,
    Hugging Face module names; Llama-style families) for ``PeftModel.from_pretrained``. Its
    ``base_model_name_or_path`` is the run's ``checkpoint.init_from`` when that is a Hugging Face
    directory; otherwise the base is written beside them as ``OUT_DIR/base`` (``--format hf``).
--format checkpoint
    ``OUT_DIR/0/`` in the layout of a run's ``checkpoints/`` (state = {"params": ...}) and
    ``OUT_DIR/config.yaml``: ``python -m train OUT_DIR/config.yaml run.dir=...`` fine-tunes it
    (its ``checkpoint.init_from`` points at OUT_DIR).

--merge-lora folds a LoRA run's adapters into its base weights (W + alpha / rank * A @ B; an int8
base, QLoRA, is dequantised first) and writes the plain float model (its config without LoRA) in any format; without it a LoRA run's
parameters are written with their adapters.

User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from models.config import ConfigError, ModelConfig
from train import cli

FORMATS = ("params", "hf", "checkpoint", "peft")


def _cpu():
    import jax

    return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])


def read_model(src: pathlib.Path, best: bool = False) -> tuple[str, ModelConfig, object]:
    """(description, config, parameters as an nnx.State on the CPU) of a run (``best``: its best
    checkpoint) or a Hugging Face directory."""
    from flax import nnx

    from models import abstract_model, hf
    from train.checkpoint import best_params, newest_params, restore_target

    if hf.is_model_dir(src):
        if best:
            raise ConfigError(
                f"SRC='{src}' is a Hugging Face model, not a run, so it has no best checkpoint; leave out --best"
            )
        model, cfg = hf.load(src)
        return str(src), cfg, nnx.state(model, nnx.Param)

    def target(saved: dict):
        cfg = ModelConfig.from_dict(saved.get("model", {}), f"the model config saved in {src}")
        return restore_target(abstract_model(cfg)[1], _cpu())

    step, params, config = (best_params if best else newest_params)(src, target, what="SRC")
    what = "best checkpoint, step" if best else "step"
    return f"{what} {step} of {src}", ModelConfig.from_dict(config["model"], f"{src}"), params


def new_out_dir(out_dir: str | pathlib.Path, name: str = "OUT") -> pathlib.Path:
    """``out_dir`` made absolute; ConfigError when it already holds anything (exports never overwrite)."""
    out_dir = pathlib.Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{name} '{out_dir}' exists and is not empty; choose a new directory")
    return out_dir


def write_params(params, cfg: ModelConfig, out_dir: pathlib.Path, tokenizer=None) -> None:
    """``model.json`` + ``params/`` (Orbax) in ``out_dir``, and a Hugging Face ``tokenizer``
    (train.tokenizer.HFTokenizer) saved beside them; other tokenizers are not written."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from train.tokenizer import HFTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "params", nnx.to_pure_dict(params))
        checkpointer.wait_until_finished()
    (out_dir / "model.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.tokenizer.save_pretrained(str(out_dir))


def write_checkpoint(params, cfg: ModelConfig, out_dir: pathlib.Path) -> None:
    import yaml

    from train.checkpoint import Checkpoints
    from train.config import CheckpointConfig, Config, DataConfig, TrainConfig
    from train.validate import PRETRAINING_OBJECTIVE

    # a config the trainer accepts for this model: its pre-training objective (or its head's) at a length it holds
    classifier = cfg.head != "lm"
    objective = cfg.head if classifier else PRETRAINING_OBJECTIVE[cfg.family]
    train = TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len), objective=objective)
    data = DataConfig(format="jsonl") if classifier else DataConfig()
    config = Config(model=cfg, train=train, data=data, checkpoint=CheckpointConfig(init_from=str(out_dir)))
    checkpoints = Checkpoints(out_dir, CheckpointConfig(async_save=False))
    checkpoints.save(0, {"params": params}, {}, config.to_dict())
    checkpoints.close()
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def export(
    src: pathlib.Path,
    out_dir: pathlib.Path,
    format: str = "params",
    tokenizer: str | None = None,
    best: bool = False,
    merge_lora: bool = False,
) -> str:
    """Writes the parameters of ``src`` (``best``: its best checkpoint; ``merge_lora``: its LoRA
    adapters folded in) to ``out_dir`` in ``format``; returns what was exported."""
    from models import hf

    out_dir = new_out_dir(out_dir, "OUT_DIR")
    if tokenizer is not None and format != "hf":
        raise ConfigError("--tokenizer only applies to --format hf; leave it out")
    source, cfg, params = read_model(pathlib.Path(src).absolute(), best)
    if format == "peft":
        if merge_lora or not cfg.lora_rank:
            raise ConfigError(
                f"--format peft writes LoRA adapters; SRC='{src}' needs lora.rank > 0 and no --merge-lora"
            )
        write_peft(params, cfg, out_dir, pathlib.Path(src))
        return source
    if merge_lora:
        from models import lora

        if not cfg.lora_rank:
            raise ConfigError(f"SRC='{src}' has no LoRA adapters (lora.rank=0); leave out --merge-lora")
        params, cfg = lora.merge(params, cfg), lora.merged_config(cfg)
    elif cfg.lora_rank and format == "hf":
        raise ConfigError(f"SRC='{src}' has LoRA adapters, which the Hugging Face layout lacks; add --merge-lora")
    if format == "params":
        write_params(params, cfg, out_dir)
    elif format == "checkpoint":
        write_checkpoint(params, cfg, out_dir)
    else:
        hf.export(params, cfg, out_dir, tokenizer=tokenizer, labels=_run_labels(pathlib.Path(src), cfg))
    return source


def write_peft(params, cfg: ModelConfig, out_dir: pathlib.Path, src: pathlib.Path) -> None:
    """The adapters of a LoRA run ``src`` in the PEFT layout, on its Hugging Face base (referenced, or written)."""
    import yaml
    from flax import traverse_util

    from models import hf, lora
    from models.hf import peft

    flat = hf.params_to_numpy(params)
    config = src / "config.yaml"
    run = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
    init_from = str((run.get("checkpoint") or {}).get("init_from") or "")
    if init_from and hf.is_model_dir(init_from):
        base = str(pathlib.Path(init_from).absolute())
    else:
        base_params = traverse_util.unflatten_dict({p: x for p, x in flat.items() if p[-1] not in lora.ADAPTERS})
        base = str(hf.export(base_params, lora.base_config(cfg), out_dir / "base"))
    peft.write(flat, cfg, out_dir, base)


def _run_labels(src: pathlib.Path, cfg: ModelConfig) -> list[str]:
    """A classifier run's label names (its config.yaml's ``data.labels``), for the HF ``id2label``; else []."""
    import yaml

    from train.validate import split_labels

    config = src / "config.yaml"
    if cfg.head == "lm" or not config.is_file():
        return []
    labels = split_labels(str(((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("labels", "")))
    return labels if len(labels) == cfg.num_labels else []


def load(out_dir: pathlib.Path) -> tuple[ModelConfig, object]:
    """(ModelConfig, params nnx.State of fp32 arrays on the default device) from a ``--format params`` export."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from models import abstract_model
    from train.checkpoint import restore_target

    out_dir = pathlib.Path(out_dir).absolute()
    if not (out_dir / "model.json").is_file() or not (out_dir / "params").is_dir():
        raise ConfigError(f"'{out_dir}' is not an export (no model.json and params/); run python -m train.export")
    model_cfg = ModelConfig.from_dict(json.loads((out_dir / "model.json").read_text()), str(out_dir / "model.json"))
    _, abstract = abstract_model(model_cfg)
    target = restore_target(nnx.to_pure_dict(abstract), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    with ocp.StandardCheckpointer() as checkpointer:
        pure = checkpointer.restore(out_dir / "params", target)
    nnx.replace_by_pure_dict(abstract, pure)
    return model_cfg, abstract


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(
        prog="python -m train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="a run directory or a Hugging Face model directory")
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
