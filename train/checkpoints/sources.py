"""Model sources: a run directory, an export directory or a Hugging Face model directory, read alike.

    source = load_source("runs/default", mesh=source_mesh("runs/default"))  # ConfigError on bad input
    tokenizer = source_tokenizer(source, args.tokenizer)  # --tokenizer, else the source's own
    logits = source.model.forward(batch)

- run directory (``config.yaml`` + ``checkpoints/``, or step directories as ``python -m
  train.export --format checkpoint`` writes them): the newest intact step's parameters (``best``:
  the best checkpoint's, ``checkpoint.keep_best``), the run's config and its tokenizer
  (``data.tokenizer``, read relative to the working directory);
- export directory (``python -m train.export``: ``model.json`` + ``params/``): the parameters,
  a Hugging Face tokenizer when one was saved next to them, a classifier's ``labels.json``;
- Hugging Face model directory (``config.json`` + safetensors, ``models.hf.load``) with its own
  tokenizer files, if any. ``python-package:NAME`` names a directory inside an installed package.

T5's decoder starts from ``decoder_start_id``: a run's is what its objective fed the decoder first
(seq2seq: the tokenizer's pad, ``train/data/examples.py``; span corruption: 0), a Hugging Face
directory's its ``decoder_start_token_id`` (else ``pad_token_id``), an export's 0 (T5's).

With ``mesh`` every parameter is placed with the sharding the logical-axis rules give it (a run's
own ``mesh.rules`` over the defaults; a mesh axis that does not divide a dimension is dropped
there), as in training; without, on the default device. A forward without an rng key has no dropout,
so a loaded model is always in eval mode.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
from flax import nnx
from jax.sharding import Mesh

from models import abstract_model, hf
from models.config import ModelConfig
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import RULES, Rules, logical_to_mesh
from train.checkpoints.store import best_params, newest_params, restore_target
from train.config import packages
from train.config.sections import Config, ConfigError, load_config
from train.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, markers
from train.export import load as load_export

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
WHAT = "a run directory, an export directory (python -m train.export) or a Hugging Face model directory"


@dataclasses.dataclass
class Source:
    model: nnx.Module  # the model with its parameters (eval mode)
    config: ModelConfig
    tokenizer: Tokenizer | None  # None when the directory holds none
    kind: str  # "run" | "export" | "hf"
    run_config: Config | None  # the run's config.yaml when the source is a run directory
    path: pathlib.Path | None = None
    step: int | None = None  # the checkpoint step of a run
    decoder_start_id: int = 0  # T5: the token its decoder starts from (what training fed it)
    labels: list[str] = dataclasses.field(default_factory=list)  # a classifier's label names in id order

    @property
    def description(self) -> str:
        """E.g. ``run /abs/runs/default (step 1400)``, for messages."""
        return f"{self.kind} {self.path}" + (f" (step {self.step})" if self.step is not None else "")


def load_source(path: str | pathlib.Path, *, mesh: Mesh | None = None, best: bool = False) -> Source:
    """The model, config and tokenizer ``path`` holds; ConfigError with one sentence when it holds none."""
    location = pathlib.Path(packages.resolve(str(path), "SOURCE")).absolute()
    if not location.is_dir():
        raise ConfigError(f"model source '{path}' is not a directory; give {WHAT}")
    steps = location / "checkpoints" if (location / "checkpoints").is_dir() else location
    is_run = (location / "config.yaml").is_file() and any(p.name.isdigit() for p in steps.iterdir())
    if (location / "config.yaml").is_file() and (location / "checkpoints").is_dir() and not is_run:
        raise ConfigError(f"run '{path}' holds no checkpoint yet; let it save one (checkpoint.every, or the end)")
    if best and not is_run:
        raise ConfigError(f"'{path}' is not a run, so it has no best checkpoint; leave out --best")
    if is_run:
        source = _from_run(location, mesh, best)
    elif (location / "model.json").is_file() and (location / "params").is_dir():
        source = _from_export(location, mesh)
    elif hf.is_model_dir(location):
        source = _from_hugging_face(location, mesh)
    else:
        raise ConfigError(
            f"'{path}' holds no model (no config.yaml + checkpoints/, model.json or config.json); give {WHAT}"
        )
    if source.config.head != "lm" and not source.labels:
        source.labels = _labels(source)
    if source.tokenizer is not None:
        check_tokenizer(source.tokenizer, source.config, f"the tokenizer of '{path}'")
    return source


def _labels(source: Source) -> list[str]:
    """A classifier's label names: its run's ``data.labels``, an export's ``labels.json`` (train/export.py
    ``write_labels``) or a Hugging Face ``id2label``; [] when the source names none (or not one per class)."""
    from train.export import read_labels
    from train.config.validate import split_labels

    if source.run_config is not None:
        labels = split_labels(source.run_config.data.labels)
    elif source.kind == "export":
        labels = read_labels(source.path)
    else:
        labels = hf.label_names(source.path)
    return labels if len(labels) == source.config.num_labels else []


def source_mesh(path: str | pathlib.Path) -> Mesh:
    """The mesh to load ``path`` onto: its run's mesh when that fits these devices, else every
    device along ``fsdp`` (exports, Hugging Face directories, runs from a larger machine)."""
    config_file = pathlib.Path(packages.resolve(str(path), "SOURCE")) / "config.yaml"
    try:
        return make_mesh(load_config(config_file).mesh if config_file.is_file() else MeshConfig())
    except ConfigError:  # an unreadable config is reported by load_source
        return make_mesh(MeshConfig())


def source_tokenizer(source: Source, spec: str = "") -> Tokenizer:
    """The tokenizer ``spec`` names ('byte' or a directory; checked against the model), else the source's own."""
    if not spec:
        if source.tokenizer is None:
            raise ConfigError(f"'{source.path}' holds no tokenizer; pass --tokenizer byte or a tokenizer directory")
        return source.tokenizer
    tokenizer = load_tokenizer(spec)
    check_tokenizer(tokenizer, source.config, f"--tokenizer '{spec}'")
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, cfg: ModelConfig, what: str) -> None:
    """ConfigError when ``tokenizer`` has ids the model's vocabulary cannot embed."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"{what} has {tokenizer.vocab_size} tokens but the model's vocabulary holds {cfg.vocab_size}; "
            "use the tokenizer the model was trained with"
        )


def shardings_for(abstract: nnx.State, mesh: Mesh | None, rules: Rules = RULES):
    """The sharding of every parameter: the logical-axis ``rules`` on ``mesh`` (fitted to the
    shapes), or the default device (one sharding for all)."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    named = logical_to_mesh(nnx.get_partition_spec(abstract), mesh, rules)
    return jax.tree.map(lambda s, a: hf.fit_sharding(s, a.shape), named, abstract)


def _target(cfg: ModelConfig, mesh: Mesh | None, rules: Rules) -> nnx.State:
    _, abstract = abstract_model(cfg)
    return restore_target(abstract, shardings_for(abstract, mesh, rules))


def _from_run(location: pathlib.Path, mesh: Mesh | None, best: bool) -> Source:
    try:
        run_config = load_config(location / "config.yaml")
    except ConfigError as e:
        raise ConfigError(f"run '{location}' has a config.yaml this version cannot read ({e})") from None
    where = f"the model config saved in {location}"

    def target(saved: dict) -> nnx.State:
        return _target(ModelConfig.from_dict(saved.get("model", {}), where), mesh, run_config.mesh.logical_rules)

    step, params, saved = (best_params if best else newest_params)(location, target, what="SOURCE")
    cfg = ModelConfig.from_dict(saved["model"], where)
    model = nnx.merge(abstract_model(cfg)[0], params)
    tokenizer = load_tokenizer(run_config.data.tokenizer)
    start = markers(tokenizer).pad if run_config.train.objective == "seq2seq" else 0  # span corruption: 0
    return Source(model, cfg, tokenizer, "run", run_config, location, step, start)


def _from_export(location: pathlib.Path, mesh: Mesh | None) -> Source:
    cfg, params = load_export(location)
    if mesh is not None:
        params = jax.device_put(params, shardings_for(params, mesh))
    model = nnx.merge(abstract_model(cfg)[0], params)
    return Source(model, cfg, _own_tokenizer(location), "export", None, location)


def _from_hugging_face(location: pathlib.Path, mesh: Mesh | None) -> Source:
    try:
        model, cfg = hf.load(location, mesh, RULES)
    except hf.ConversionError as e:
        raise ConfigError(f"model source '{location}' cannot be read: {e}") from None
    hf_config = json.loads((location / "config.json").read_text())
    start = next((hf_config[k] for k in ("decoder_start_token_id", "pad_token_id") if hf_config.get(k) is not None), 0)
    return Source(model, cfg, _own_tokenizer(location), "hf", None, location, decoder_start_id=int(start))


def _own_tokenizer(location: pathlib.Path) -> Tokenizer | None:
    """The Hugging Face tokenizer saved in ``location``, None when there is none."""
    if not any((location / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return HFTokenizer(str(location))
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"the tokenizer files in '{location}' cannot be loaded ({e}); save the tokenizer again"
        ) from None
