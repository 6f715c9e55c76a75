"""The one reader of model directories: a run, an export of any format or a Hugging Face model directory.

    source = load_source("runs/default", mesh=source_mesh("runs/default"))  # ConfigError on bad input
    tokenizer = source_tokenizer(source, args.tokenizer)  # --tokenizer, else the source's own
    logits = source.model.forward(batch)

What a directory holds (``locate``, the only place that tells them apart):

- run directory (``config.yaml`` + ``checkpoints/<step>/``; also its ``checkpoints/`` directory, and
  ``python -m train.export --format checkpoint`` output, ``config.yaml`` + ``<step>/``): the newest
  intact step's parameters (``best``: the best checkpoint's, ``checkpoint.keep_best``), the run's
  config and its tokenizer (``data.tokenizer``, read relative to the working directory). A LoRA run's
  adapter-only checkpoints are laid over their base, rebuilt from its reference (train/checkpoints/adapters.py);
  the base is itself any model source, so this is where the reader recurses: adapters.py is handed
  ``warm_start`` rather than importing it (the one seam that keeps train/ free of import cycles);
- export directory (``model.json`` + ``params/``): ``train.export --format params``, ``train.quantize``
  (int8), ``train.prune`` (also ``prune.json``, ``masks/``), a LoRA run exported with its adapters;
  with the tokenizer saved beside the parameters (train/data/tokenizer.py ``save_tokenizer``);
- PEFT export (``peft.json`` + ``peft.safetensors`` + ``base/``): an adapter, prefix or prompt run's
  ``--format peft`` (train/checkpoints/peft_dir.py), its base's arrays with the method's laid over;
- Hugging Face model directory (``config.json`` + safetensors, ``models.hf``) with its own tokenizer
  files, if any (``train.export --format hf`` writes them). ``python-package:NAME`` names a
  directory inside an installed package.

``load_source`` gives the whole model with its tokenizer; ``read_params`` the parameters alone
(of a Hugging Face directory only those it holds); ``warm_start`` lays them over another model's
(``checkpoint.init_from``). With ``mesh`` every parameter is placed with the sharding the
logical-axis rules give it (a run's own ``mesh.rules`` over the defaults; a mesh axis that does not
divide a dimension is dropped there), as in training; without, on the default device. A forward
without an rng key has no dropout, so a loaded model is always in eval mode.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from jax.sharding import Mesh

from models import abstract_model, hf
from models.config import ModelConfig
from models.hf import peft
from models.quant import dequantize_params
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import RULES, Rules, logical_to_mesh
from train.checkpoints import adapters, peft_dir
from train.checkpoints.store import (
    Checkpoints,
    best_params,
    config_mismatch,
    newest_params,
    restore_params,
    restore_target,
)
from train.checkpoints.warm_start import (
    KEY,
    architecture,
    check_layers,
    describe,
    flat,
    layer_axes,
    lower_layers,
    peft_adapters,
    peft_base,
    taller,
)
from train.config import packages
from train.config.sections import Config, ConfigError, load_config
from train.data.tokenizer import Tokenizer, load_tokenizer, markers, saved_tokenizer

WHAT = "a run directory, an export directory (python -m train.export) or a Hugging Face model directory"


@dataclasses.dataclass
class Params:
    """What ``read_params`` found: the parameters of the model ``config`` in the directory ``path``."""

    kind: str  # "run" | "export" | "peft" | "hf"
    path: pathlib.Path
    config: ModelConfig
    params: nnx.State | dict  # an nnx.State; of a Hugging Face directory read with whole=False, nested dicts
    run_config: Config | None  # the run's config.yaml when the source is a run directory
    step: int | None = None  # the checkpoint step of a run


@dataclasses.dataclass
class Source:
    model: nnx.Module  # the model with its parameters (eval mode)
    config: ModelConfig
    tokenizer: Tokenizer | None  # None when the directory holds none
    kind: str  # "run" | "export" | "peft" | "hf"
    run_config: Config | None  # the run's config.yaml when the source is a run directory
    path: pathlib.Path | None = None
    step: int | None = None  # the checkpoint step of a run
    decoder_start_id: int = 0  # T5: the token its decoder starts from (what training fed it)
    eos_ids: list[int] = dataclasses.field(default_factory=list)  # an HF directory's eos_token_id(s) (_eos_ids)
    labels: list[str] = dataclasses.field(default_factory=list)  # a classifier's label names in id order

    @property
    def description(self) -> str:
        """E.g. ``run /abs/runs/default (step 1400)``, for messages."""
        return f"{self.kind} {self.path}" + (f" (step {self.step})" if self.step is not None else "")


def locate(path: str | pathlib.Path, what: str = "model source", best: bool = False) -> tuple[str, pathlib.Path]:
    """(kind, absolute directory) of the model directory ``path``: "run", "export" or "hf" (module
    docstring). ConfigError with one sentence when it holds none (``what``: the argument, for messages)."""
    location = pathlib.Path(packages.resolve(str(path), what)).absolute()
    if not location.is_dir():
        raise ConfigError(f"{what} '{path}' is not a directory; give {WHAT}")
    if location.name == "checkpoints" and (location.parent / "config.yaml").is_file():
        location = location.parent  # a run's checkpoints/ directory: the run
    steps = location / "checkpoints" if (location / "checkpoints").is_dir() else location
    has_steps = any(p.name.isdigit() and p.is_dir() for p in steps.iterdir())
    if (location / "config.yaml").is_file() or has_steps:
        if not has_steps:
            raise ConfigError(f"run '{path}' holds no checkpoint yet; let it save one (checkpoint.every, or the end)")
        kind = "run"
    elif (location / "model.json").is_file() and (location / "params").is_dir():
        kind = "export"
    elif peft_dir.is_peft_dir(location):
        kind = "peft"
    elif hf.is_model_dir(location):
        kind = "hf"
    else:
        raise ConfigError(
            f"'{path}' holds no model (no config.yaml + checkpoints/, model.json or config.json); give {WHAT}"
        )
    if best and kind != "run":
        raise ConfigError(f"'{path}' is not a run, so it has no best checkpoint; leave out --best")
    return kind, location


def read_params(
    path: str | pathlib.Path, *, mesh: Mesh | None = None, best: bool = False, whole: bool = True, what: str = ""
) -> Params:
    """The parameters and config that the model directory ``path`` holds (placed as the module docstring
    says). ``whole=False``: of a Hugging Face directory only the parameters it holds, as host arrays
    (a bare ``BertModel`` has no MLM head; ``whole`` makes one up)."""
    what = what or "model source"
    kind, location = locate(path, what, best)
    if kind == "run":
        return _run_params(location, mesh, best, what)
    if kind in ("export", "peft"):
        cfg, params = load_export(location) if kind == "export" else _peft_params(location, what)
        if mesh is not None:
            params = jax.device_put(params, shardings_for(params, mesh))
        return Params(kind, location, cfg, params, None)
    try:
        if whole:
            model, cfg = hf.load(location, mesh, RULES)
            return Params("hf", location, cfg, nnx.state(model), None)
        cfg, arrays = hf.read_params(location)
        return Params("hf", location, cfg, traverse_util.unflatten_dict(dict(arrays)), None)
    except hf.ConversionError as e:
        raise ConfigError(f"{what} '{location}' cannot be read: {e}") from None


def _peft_params(location: pathlib.Path, what: str) -> tuple[ModelConfig, nnx.State]:
    """A ``--format peft`` export of an adapter, prefix or prompt run: its base's arrays with the method's over them."""
    cfg, arrays, base = peft_dir.read(location)
    found = flat(read_params(base, whole=False, what=what).params)
    values = {"/".join(p): x for p, x in found.items()} | arrays
    _, abstract = abstract_model(cfg)
    wanted = set(flat(abstract))
    values = {path: x for path, x in ((tuple(p.split("/")), x) for p, x in values.items()) if path in wanted}
    if len(values) < len(wanted):
        missing = "/".join(min(wanted - set(values)))
        raise ConfigError(f"{what} '{location}' lacks {missing} (its base or peft.safetensors changed)")
    pure = traverse_util.unflatten_dict({p: jnp.asarray(x) for p, x in values.items()})
    nnx.replace_by_pure_dict(abstract, pure)
    return cfg, abstract


def load_source(
    path: str | pathlib.Path, *, mesh: Mesh | None = None, best: bool = False, what: str = "model source"
) -> Source:
    """The model, config and tokenizer ``path`` holds; ConfigError with one sentence when it holds none."""
    found = read_params(path, mesh=mesh, best=best, what=what)
    model = nnx.merge(abstract_model(found.config)[0], found.params)
    if found.run_config is not None:
        tokenizer = load_tokenizer(found.run_config.data.tokenizer)
        if tokenizer.vocab_size > found.config.vocab_size:  # --format checkpoint of a source with none: the default
            tokenizer = None
    else:
        tokenizer = saved_tokenizer(found.path)
    if tokenizer is not None:
        check_tokenizer(tokenizer, found.config, f"the tokenizer of '{path}'")
    source = Source(model, found.config, tokenizer, found.kind, found.run_config, found.path, found.step)
    source.decoder_start_id = _decoder_start(found, tokenizer)
    source.eos_ids = _eos_ids(found)
    if source.config.head != "lm":
        source.labels = _labels(source)
    return source


def _decoder_start(found: Params, tokenizer: Tokenizer | None) -> int:
    """The token T5's decoder starts from: what a run's objective fed it first (seq2seq: the tokenizer's
    pad, train/data/examples.py; span corruption: 0), a Hugging Face directory's
    ``decoder_start_token_id`` (else ``pad_token_id``), an export's 0 (T5's)."""
    run = found.run_config
    if run is not None and run.train.objective == "seq2seq" and tokenizer is not None:
        return markers(tokenizer).pad
    if found.kind == "hf":
        hf_config = json.loads((found.path / "config.json").read_text())
        keys = ("decoder_start_token_id", "pad_token_id")
        return int(next((hf_config[k] for k in keys if hf_config.get(k) is not None), 0))
    return 0


def _eos_ids(found: Params) -> list[int]:
    """The ids a Hugging Face directory ends generation at, as transformers' ``generate()`` does: the
    ``eos_token_id`` (one id or a list) of its ``generation_config.json`` and ``config.json`` (Llama 3
    instruct: ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``); [] for runs and exports."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = found.path / name
        value = json.loads(path.read_text()).get("eos_token_id") if found.kind == "hf" and path.is_file() else None
        ids += [value] if isinstance(value, int) else [i for i in value or [] if isinstance(i, int)]
    return list(dict.fromkeys(ids))


def read_labels(out_dir: pathlib.Path) -> list[str]:
    """The label names in id order of an export's ``labels.json``; [] when it has none."""
    path = pathlib.Path(out_dir) / "labels.json"
    if not path.is_file():
        return []
    id2label = json.loads(path.read_text()).get("id2label") or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _labels(source: Source) -> list[str]:
    """A classifier's label names: its run's ``data.labels``, an export's ``labels.json``
    (train/checkpoints/exporting.py ``write_params``) or a Hugging Face ``id2label``; [] when the source names
    none (or not one per class)."""
    from train.config.validate import split_labels

    if source.run_config is not None:
        labels = split_labels(source.run_config.data.labels)
    elif source.kind in ("export", "peft"):
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


def load_export(directory: str | pathlib.Path) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params nnx.State of arrays on the default device) of an export directory
    (``model.json`` + ``params/``, an Orbax StandardCheckpointer tree keyed like the model's parameters)."""
    directory = pathlib.Path(directory).absolute()
    if not (directory / "model.json").is_file() or not (directory / "params").is_dir():
        raise ConfigError(f"'{directory}' is not an export (no model.json and params/); run python -m train.export")
    cfg = ModelConfig.from_dict(json.loads((directory / "model.json").read_text()), str(directory / "model.json"))
    _, abstract = abstract_model(cfg)
    target = restore_target(nnx.to_pure_dict(abstract), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    with ocp.StandardCheckpointer() as checkpointer:
        pure = checkpointer.restore(directory / "params", target)
    nnx.replace_by_pure_dict(abstract, pure)
    return cfg, abstract


def _run_params(location: pathlib.Path, mesh: Mesh | None, best: bool, what: str) -> Params:
    run_config = None
    if (location / "config.yaml").is_file():
        try:
            run_config = load_config(location / "config.yaml")
        except ConfigError as e:
            raise ConfigError(f"run '{location}' has a config.yaml this version cannot read ({e})") from None
    rules = run_config.mesh.logical_rules if run_config else RULES
    where = f"the model config saved in {location}"

    def target(saved: dict) -> nnx.State:
        _, abstract = abstract_model(ModelConfig.from_dict(saved.get("model", {}), where))
        return restore_target(abstract, shardings_for(abstract, mesh, rules))

    read = best_params if best else newest_params
    step, params, saved = read(location, target, what=what, restore=_restore_run_params)
    return Params("run", location, ModelConfig.from_dict(saved["model"], where), params, run_config, step)


def _restore_run_params(checkpoints: Checkpoints, step: int, target: nnx.State) -> nnx.State:
    """The parameters of a run's ``step``: as saved, or a LoRA run's adapters over their rebuilt base."""
    if adapters.is_adapter_only(checkpoints, step):
        return adapters.restore_params(checkpoints, step, target, warm_start)
    return restore_params(checkpoints, step, target)


# --- checkpoint.init_from --------------------------------------------------------------------


def warm_start(
    init_from: str,
    fresh: nnx.State,
    target: nnx.State,
    model: ModelConfig,
    init_layers: str = "",
    verbose: bool = True,
) -> nnx.State:
    """``fresh`` parameters with every one that the model source ``init_from`` holds (same path and
    shape) replaced (train/checkpoints/warm_start.py says which carry over).

    ``target``: the parameters' ShapeDtypeStructs carrying their shardings (restores land there).
    ``init_layers='lower'``: a source with more layers gives its lower ones. An int8 source into a
    float model is dequantised (q * scale). Prints one line naming what was restored and what starts
    fresh (unless not ``verbose``). Raises ConfigError when the source is missing, unreadable or a
    different architecture.
    """
    targets, lower = flat(target), init_layers == "lower"
    location = pathlib.Path(packages.resolve(init_from, KEY)).absolute()
    adapters_only = peft.is_adapter_dir(location)  # PEFT LoRA adapters: their base, then them
    base = peft_base(location) if adapters_only else init_from
    found = read_params(base, mesh=_mesh_of(targets.values()), whole=False, what=KEY)
    cfg, arrays = found.config, flat(found.params)
    if cfg.quant == "int8" and model.quant == "none":
        arrays = dequantize_params(arrays)
        cfg = dataclasses.replace(cfg, quant="none", quant_skip="", quant_embeddings=False)
    ours = architecture(dataclasses.asdict(model), lower=True)  # layer counts: check_layers
    mismatch = config_mismatch(architecture(dataclasses.asdict(cfg), lower=True), ours)
    if mismatch:
        different = "; ".join(mismatch)
        raise ConfigError(f"{KEY}: {found.path} holds a different model ({different}); use its model settings")
    check_layers(dataclasses.asdict(cfg), model, lower, found.path)
    axes = layer_axes(model) if lower else {}
    restored, unused = {}, []
    for path, array in arrays.items():
        want = targets.get(path)
        if want is not None and path in axes and taller(tuple(array.shape), want.shape, axes[path]):
            array = lower_layers(jnp.asarray(array), want, axes[path])
        if want is None or tuple(array.shape) != want.shape or not _castable(array.dtype, want.dtype):
            unused.append(path)
            continue
        restored[path] = jax.device_put(array.astype(want.dtype), want.sharding)
    if adapters_only:
        restored |= peft_adapters(location, targets, model, KEY)
    if not restored:
        raise ConfigError(f"{KEY}='{init_from}' shares no parameter with this model; point it at a similar model")
    values = {p: restored.get(p, x) for p, x in flat(fresh).items()}
    nnx.replace_by_pure_dict(fresh, traverse_util.unflatten_dict(values))
    if verbose and jax.process_index() == 0:
        source = f"{found.path} step {found.step}" if found.step is not None else str(found.path)
        source = f"{location} on {source}" if adapters_only else source
        print(describe(source, len(restored), sorted(set(values) - set(restored)), sorted(unused)), flush=True)
    return fresh


def _castable(have, want) -> bool:
    """Whether an array of dtype ``have`` may stand for one of ``want`` (equal, or both floating)."""
    return have == want or (jnp.issubdtype(have, jnp.floating) and jnp.issubdtype(want, jnp.floating))


def _mesh_of(targets) -> Mesh | None:
    """The mesh the ``targets`` (ShapeDtypeStructs with shardings) are placed on; None: one device."""
    for t in targets:
        if isinstance(t.sharding, jax.sharding.NamedSharding):
            return t.sharding.mesh
    return None
