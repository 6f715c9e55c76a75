"""Writing a model source (train/checkpoints/sources.py) in another layout: the work of ``python -m train.export``
(its --help describes the formats). ``write_params`` is the export layout every command writes
(``model.json`` + ``params/`` + tokenizer + ``labels.json``); ``new_out_dir`` refuses to overwrite."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from models.config import ConfigError, ModelConfig

FORMATS = ("params", "hf", "checkpoint", "peft", "stablehlo")


def new_out_dir(out_dir: str | pathlib.Path, name: str = "OUT") -> pathlib.Path:
    """``out_dir`` made absolute; ConfigError when it already holds anything (exports never overwrite)."""
    out_dir = pathlib.Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{name} '{out_dir}' exists and is not empty; choose a new directory")
    return out_dir


def write_params(params, cfg: ModelConfig, out_dir: pathlib.Path, tokenizer=None, labels=()) -> None:
    """``model.json`` + ``params/`` (Orbax) in ``out_dir``, ``tokenizer`` (train/data/tokenizer.py) beside
    them, and a classifier's ``labels`` (names in id order) in ``labels.json`` as
    ``{"id2label": {"0": name, ...}}``."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from train.data.tokenizer import save_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "params", nnx.to_pure_dict(params))
        checkpointer.wait_until_finished()
    (out_dir / "model.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    if labels:
        id2label = {str(i): name for i, name in enumerate(labels)}
        (out_dir / "labels.json").write_text(json.dumps({"id2label": id2label}, indent=2) + "\n")


def write_checkpoint(params, cfg: ModelConfig, out_dir: pathlib.Path, tokenizer=None, labels=()) -> None:
    """``out_dir/0/`` (a run's checkpoint of ``params``), ``config.yaml`` (a classifier's ``data.labels``)
    and ``tokenizer`` (its ``data.tokenizer``; the default, byte, without one)."""
    import yaml

    from train.checkpoints.store import Checkpoints
    from train.config.sections import CheckpointConfig, Config, DataConfig, TrainConfig
    from train.config.validate import PRETRAINING_OBJECTIVE
    from train.data.tokenizer import ByteTokenizer, save_tokenizer

    # a config the trainer accepts for this model: its pre-training objective (or its head's) at a length it holds
    classifier = cfg.head != "lm"
    objective = cfg.head if classifier else PRETRAINING_OBJECTIVE[cfg.family]
    train = TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len), objective=objective)
    data = DataConfig(format="jsonl", labels=",".join(labels)) if classifier else DataConfig()
    if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
        data = dataclasses.replace(data, tokenizer=str(out_dir))
    config = Config(model=cfg, train=train, data=data, checkpoint=CheckpointConfig(init_from=str(out_dir)))
    checkpoints = Checkpoints(out_dir, CheckpointConfig(async_save=False))
    checkpoints.save(0, {"params": params}, {}, config.to_dict())
    checkpoints.close()
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)


def export(
    src: pathlib.Path,
    out_dir: pathlib.Path,
    format: str = "params",
    tokenizer: str | None = None,
    best: bool = False,
    merge_lora: bool = False,
) -> str:
    """Writes the parameters of the model source ``src`` (``best``: its best checkpoint; ``merge_lora``:
    its LoRA adapters folded in) and its tokenizer to ``out_dir`` in ``format``; returns what was exported."""
    import jax
    from flax import nnx

    from models import abstract_model, hf
    from sharding.mesh import MeshConfig, make_mesh
    from train.checkpoints.sources import load_source
    from train.data.tokenizer import ByteTokenizer, save_tokenizer

    out_dir = new_out_dir(out_dir, "OUT_DIR")
    if tokenizer is not None and format != "hf":
        raise ConfigError("--tokenizer only applies to --format hf; leave it out")
    source = load_source(src, mesh=make_mesh(MeshConfig(), jax.devices("cpu")[:1]), best=best, what="SRC")
    cfg, params = source.config, nnx.state(source.model, nnx.Param)
    if cfg.prefix_hidden:  # the reparameterisation MLP only serves training: its keys and values
        from models import peft

        folded = peft.folded_config(cfg)
        params, cfg = peft.fold(params, abstract_model(folded)[1]), folded
    if cfg.peft_method in ("adapter", "prefix", "prompt") and format in ("hf", "peft"):
        if format == "hf":
            raise ConfigError(
                f"SRC='{src}' has {cfg.peft_method} parameters, which no base weight can absorb and the Hugging Face "
                "layout lacks; use --format peft (the base in that layout, them beside it) or params"
            )
        write_methods(params, cfg, out_dir, source)
        return str(source.path)
    if format == "peft":
        if merge_lora or not cfg.lora_rank:
            raise ConfigError(
                f"--format peft writes LoRA adapters; SRC='{src}' needs lora.rank > 0 and no --merge-lora"
            )
        write_peft(params, cfg, out_dir, source.path)
        return str(source.path)
    if merge_lora:
        from models import lora

        if not cfg.lora_rank:
            raise ConfigError(f"SRC='{src}' has no LoRA adapters (lora.rank=0); leave out --merge-lora")
        merged = lora.merged_config(cfg)
        params, cfg = lora.merge(params, cfg, abstract_model(merged)[1]), merged
    elif cfg.lora_rank and format == "hf":
        raise ConfigError(f"SRC='{src}' has LoRA adapters, which the Hugging Face layout lacks; add --merge-lora")
    if cfg.quant == "int8" and format == "hf":
        raise ConfigError(f"SRC='{src}' is quantised (int8), which the Hugging Face layout lacks; export a float model")
    if format == "params":
        write_params(params, cfg, out_dir, source.tokenizer, _run_labels(pathlib.Path(src), cfg))
    elif format == "checkpoint":
        write_checkpoint(params, cfg, out_dir, source.tokenizer, _run_labels(pathlib.Path(src), cfg))
    elif format == "stablehlo":
        from train.checkpoints.serving import export_serving

        model = nnx.merge(abstract_model(cfg)[0], params)
        export_serving(model, cfg, out_dir, source.tokenizer.eos_id if source.tokenizer else None)
        if source.tokenizer is not None:
            save_tokenizer(source.tokenizer, out_dir)
    else:
        own = getattr(source.tokenizer, "path", None)  # a Hugging Face tokenizer's directory
        hf.export(params, cfg, out_dir, tokenizer=tokenizer or own, labels=_run_labels(source.path, cfg))
        if tokenizer is None and isinstance(source.tokenizer, ByteTokenizer):
            save_tokenizer(source.tokenizer, out_dir)
        if cfg.family == "decoder":
            write_stops(out_dir, [] if tokenizer else source.eos_ids)
    if source.step is None:
        return str(source.path)
    return f"{'best checkpoint, step' if best else 'step'} {source.step} of {source.path}"


def write_stops(out_dir: pathlib.Path, eos_ids: list[int]) -> None:
    """``generation_config.json`` with ``eos_token_id`` [eos, ...] when generation should also stop at
    the source's other eos ids or the chat template's end-of-turn token (``<|im_end|>``), so that
    transformers' ``generate()`` and pipelines stop where ``python -m train.generate`` does."""
    from train.data.chat import end_of_turn
    from train.data.tokenizer import saved_tokenizer

    written = saved_tokenizer(out_dir)
    if written is None:
        return
    stops = list(dict.fromkeys([written.eos_id, *eos_ids, end_of_turn(written)]))
    if len(stops) > 1:
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}, indent=2) + "\n")


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


def write_methods(params, cfg: ModelConfig, out_dir: pathlib.Path, source) -> None:
    """An adapter, prefix or prompt model: its base as ``OUT/base`` (--format hf) and the method's parameters
    beside it (train/checkpoints/peft_dir.py), with the tokenizer and a classifier's labels."""
    from flax import traverse_util

    from models import hf, peft
    from train.checkpoints import peft_dir
    from train.data.tokenizer import save_tokenizer

    flat = {"/".join(p): x for p, x in hf.params_to_numpy(params).items()}
    base = traverse_util.unflatten_dict({tuple(p.split("/")): x for p, x in flat.items() if not peft.is_peft_path(p)})
    labels, own = _run_labels(source.path, cfg), getattr(source.tokenizer, "path", None)
    hf.export(base, peft.base_config(cfg), out_dir / "base", tokenizer=own, labels=labels)
    peft_dir.write({p: x for p, x in flat.items() if peft.is_peft_path(p)}, cfg, out_dir, "base")
    if source.tokenizer is not None:
        save_tokenizer(source.tokenizer, out_dir)
    if labels:
        (out_dir / "labels.json").write_text(json.dumps({"id2label": dict(enumerate(labels))}, indent=2) + "\n")


def _run_labels(src: pathlib.Path, cfg: ModelConfig) -> list[str]:
    """A classifier's label names (a run's config.yaml ``data.labels``, an HF directory's ``id2label``); else []."""
    import yaml

    from models import hf
    from train.config.validate import split_labels

    config = src / "config.yaml"
    if cfg.head != "lm" and hf.is_model_dir(src):
        labels = hf.label_names(src)
        return labels if len(labels) == cfg.num_labels else []
    if cfg.head == "lm" or not config.is_file():
        return []
    labels = split_labels(str(((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("labels", "")))
    return labels if len(labels) == cfg.num_labels else []
