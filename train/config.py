"""Run configuration: typed dataclasses per section, loaded from YAML plus dotted overrides.

``load_config(path, ["train.steps=100", "mesh.fsdp=-1"])`` returns a validated ``Config``;
anything wrong raises ``ConfigError`` with one sentence naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
import types
import typing
from typing import Any, Literal

import yaml

from models.config import ConfigError, ModelConfig
from sharding.fit import batch_problems
from sharding.mesh import MeshConfig

__all__ = ["Config", "ConfigError", "MeshConfig", "ModelConfig", "load_config", "save_config", "validate"]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # everything the run writes goes here; reused => resume
    coordinator: str = ""  # host:port of process 0 for multi-process runs; empty: one process
    num_processes: int = 1  # processes taking part (one per host, usually)
    process_id: int = -1  # this process's index; -1: from the cluster environment
    auto_distributed: bool = False  # Cloud TPU / SLURM: let JAX discover the cluster itself
    coordinator_timeout_s: int = 120  # give up reaching the coordinator after this long


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_files: str = "data/shakespeare/*.txt"  # glob(s), comma-separated; relative to the cwd
    val_files: str = ""  # glob(s) of held-out documents; empty: split off val_fraction of documents
    format: Literal["text", "jsonl", "tfds"] = "text"  # text: a document per file; jsonl: per line; tfds: by name
    text_field: str = "text"  # the JSONL field (or TFDS feature) that holds the text
    val_fraction: float = 0.05  # fraction of whole documents held out when val_files is empty
    tokenizer: str = "byte"  # 'byte' or a directory holding a Hugging Face tokenizer
    shuffle: bool = True
    num_workers: int = 0  # grain worker processes (0: in the main process)
    tfds_name: str = ""  # format=tfds: dataset[/config][:version], e.g. c4/en:3.1.0 (see train/tfds_data.py)
    tfds_data_dir: str = ""  # directory (or gs:// path) holding prepared TFDS datasets; empty: TFDS's default
    tfds_train_split: str = "train"
    tfds_val_split: str = "validation"
    tfds_reader: Literal["data_source", "tf_data"] = "data_source"  # tf_data needs TensorFlow: pip install -e '.[tf]'
    # classification / seq2seq examples (train/examples.py): one JSONL row per example
    label_field: str = "label"  # classification: the field holding the label (a string or an integer)
    labels: str = ""  # classification: label names in id order, comma-separated; empty: sorted labels of the data
    input_field: str = "input"  # seq2seq: the field holding the input text
    target_field: str = "target"  # seq2seq: the field holding the target text
    group_field: str = ""  # hold out whole groups of rows sharing this field's value (val_fraction of groups)
    test_files: str = ""  # glob(s) of a test split training never reads (python -m train.evaluate --split test)
    test_fraction: float = 0.0  # else: fraction of whole documents (example groups, rows) held out for test


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "adafactor", "sgd"] = "adamw"
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear, wsd)
    schedule: Literal["cosine", "linear", "constant", "wsd", "rsqrt"] = "cosine"  # rsqrt: lr*sqrt(warmup/step)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of steps spent in the final decay
    b1: float = 0.9  # adamw
    b2: float = 0.95  # adamw
    eps: float = 1e-8  # adamw
    weight_decay: float = 0.1  # decoupled (lr * weight_decay * w a step), on matrices only, never norms or biases
    clip_norm: float = 1.0  # global-norm clipping of the trainable gradients; 0 disables
    momentum: float = 0.9  # sgd: heavy-ball momentum; 0: plain SGD
    nesterov: bool = False  # sgd: Nesterov momentum
    decay_rate: float = 0.8  # adafactor: second-moment decay 1 - step**-decay_rate (t5x)
    factored: bool = True  # adafactor: row and column second moments for matrices instead of full ones
    min_dim_size_to_factor: int = 128  # adafactor: factor only when the two largest axes are at least this long
    clipping_threshold: float = 1.0  # adafactor: cap each update's RMS at this; 0 disables
    multiply_by_parameter_scale: bool = True  # adafactor: steps relative to the parameter's RMS (at least 1e-3)


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
    metric: str = ""  # an eval record key (eval_loss, eval_bpb, eval_macro_f1, ...); empty: off
    mode: Literal["", "min", "max"] = ""  # empty: max for accuracies and F1, min for losses
    patience: int = 3  # evals in a row without an improvement that end the run
    min_delta: float = 0.0  # an improvement beats the best value by more than this


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    objective: Literal["causal_lm", "masked_lm", "span_corruption", "seq2seq", "classification"] = "causal_lm"
    target_len: int = 64  # seq2seq: target tokens (the encoder reads seq_len tokens)
    mask_rate: float = 0.15  # masked_lm: share of tokens chosen (80% [MASK], 10% random, 10% kept)
    noise_density: float = 0.15  # span_corruption: share of tokens in noise spans
    mean_span: float = 3.0  # span_corruption: mean noise-span length
    log_every: int = 10
    eval_every: int = 200  # 0 disables periodic eval (a final eval still runs)
    eval_batches: int = 8
    sample_every: int = 0  # decoders: print a sample every this many steps too; 0: only at the end
    sample_prompt: str = "ROMEO.\n"
    sample_tokens: int = 200
    progress_bar: bool = True
    early_stopping: EarlyStoppingConfig = dataclasses.field(default_factory=EarlyStoppingConfig)
    freeze: str = ""  # regex over parameter paths kept fixed ('embed|stack/blocks/attn'; train/freeze.py)
    freeze_layers: int = 0  # keep the lower N layers of every layer stack fixed


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between saves; 0: only at the end
    keep: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep every Nth step forever; 0: off
    async_save: bool = True
    init_from: str = ""  # start a new run from another run's parameters
    keep_best: bool = False  # also keep the step of the best eval (train/best.py)
    best_metric: str = ""  # keep_best without early stopping: the eval key that ranks steps
    best_mode: Literal["", "min", "max"] = ""  # empty: max for accuracies and F1, min for losses


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        """Plain dicts, lists and scalars (YAML and JSON write it as is)."""
        return _lists(dataclasses.asdict(self))


# --- loading --------------------------------------------------------------------------------


def _close_match(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks ``value`` against the field type ``hint``; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        options = typing.get_args(hint)
        if value not in options:
            choices = ", ".join(repr(o) for o in options)
            raise ConfigError(f"{key}={value!r} is not one of {choices}{_close_match(str(value), map(str, options))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        for arg in args[:-1]:  # the first type that accepts the value
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        return _coerce(value, args[-1], key)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(hint), key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}; quote it in YAML")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    """A YAML list as ``tuple[X, ...]`` (any length) or ``tuple[A, B]`` (exactly those items)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif len(value) != len(args):
        raise ConfigError(f"{key} must be a list of {len(args)} items, got {value!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _lists(value: Any) -> Any:
    """Tuples -> lists, recursively (what YAML and JSON write)."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _build(cls, values: dict, prefix: str):
    """Builds dataclass ``cls`` from a (possibly partial) dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_close_match(key, fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{path}.")
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}' goes inside '{part}', which is not a section")
    node[leaf] = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``3e-4`` is a float (YAML 1.2) rather than a string (YAML 1.1)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a YAML file from configs/")
    try:
        tree = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file '{path}' is not valid YAML ({str(e).splitlines()[0]}); fix the syntax"
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    return tree


def apply_overrides(tree: dict, overrides: tuple[str, ...] | list[str]) -> dict:
    """``tree`` (sections of keys, changed in place) with ``section.key=value`` overrides set."""
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(tree, key, value)
    return tree


def config_tree(path: str | pathlib.Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """The YAML at ``path`` (default: the shipped default run) with overrides applied, not yet checked."""
    return apply_overrides(load_yaml(path or DEFAULT_CONFIG), overrides)


def build_config(tree: dict) -> Config:
    """A tree of sections -> ``Config``, checking keys and types (not the cross-key rules of ``validate``)."""
    return _build(Config, tree, "")


def load_config(path: str | pathlib.Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Reads ``path`` (default: the shipped default run), applies overrides, validates."""
    config = build_config(config_tree(path, overrides))
    problems = validate(config)
    if problems:
        raise ConfigError(problems[0])
    return config


def validate(config: Config) -> list[str]:
    """Problems that need no devices or data to see; each one sentence with its fix."""
    out = list(config.model.problems())
    t, o = config.train, config.optimizer
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
        if getattr(t, name) <= 0:
            out.append(f"train.{name} must be positive, got {getattr(t, name)}")
    for name in ("eval_every", "sample_every", "sample_tokens"):
        if getattr(t, name) < 0:
            out.append(f"train.{name} must be >= 0 (0: off), got {getattr(t, name)}")
    if t.seq_len > config.model.max_seq_len:
        out.append(
            f"train.seq_len={t.seq_len} is longer than model.max_seq_len={config.model.max_seq_len}; "
            "lower train.seq_len or raise model.max_seq_len"
        )
    if config.model.attention == "splash" and t.seq_len % 128:
        out.append(f"model.attention='splash' needs train.seq_len to be a multiple of 128, got {t.seq_len}")
    out += config.mesh.problems()
    if not out:  # before the devices are known: one data-parallel shard (the mesh check follows in the run)
        one = {axis: 1 for axis in ("data", "fsdp", "tensor")}
        out += batch_problems(
            t.batch_size, t.grad_accum, one, config.mesh.logical_rules, max(config.run.num_processes, 1)
        )
    if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
        out.append("optimizer.lr must be > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1]")
    out += optimizer_problems(o) + freeze_problems(t)
    if not 0 <= config.data.val_fraction < 1:
        out.append(f"data.val_fraction must be in [0, 1), got {config.data.val_fraction}")
    if not 0 <= config.data.test_fraction < 1:
        out.append(f"data.test_fraction must be in [0, 1), got {config.data.test_fraction}")
    if config.data.format == "tfds" and (config.data.test_files or config.data.test_fraction):
        out.append("data.test_files and data.test_fraction are for text and JSONL files, not data.format=tfds")
    if config.data.format == "tfds" and not config.data.tfds_name:
        out.append("data.format=tfds needs data.tfds_name, e.g. data.tfds_name=c4/en:3.1.0")
    out += objective_problems(config)
    out += best_problems(config)
    r = config.run
    if r.num_processes < 1 or (r.num_processes > 1 and not r.coordinator and not r.auto_distributed):
        out.append("run.num_processes > 1 needs run.coordinator=host:port (or run.auto_distributed=true)")
    if config.checkpoint.every < 0 or config.checkpoint.keep < 1:
        out.append("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    return out


def optimizer_problems(o: OptimizerConfig) -> list[str]:
    out = []
    if o.weight_decay < 0 or o.clip_norm < 0:
        out.append("optimizer.weight_decay and optimizer.clip_norm must be >= 0 (0: off)")
    if not 0 <= o.momentum < 1:
        out.append(f"optimizer.momentum must be in [0, 1), got {o.momentum}")
    if o.decay_rate <= 0 or o.clipping_threshold < 0 or o.min_dim_size_to_factor < 1:
        out.append("optimizer.decay_rate must be > 0, clipping_threshold >= 0 (0: off) and min_dim_size_to_factor >= 1")
    return out


def freeze_problems(t: TrainConfig) -> list[str]:
    out = []
    try:
        re.compile(t.freeze)
    except re.error as e:
        out.append(f"train.freeze={t.freeze!r} is not a regular expression ({e}); fix or quote it")
    if t.freeze_layers < 0:
        out.append(f"train.freeze_layers must be >= 0 (0: off), got {t.freeze_layers}")
    return out


def fit_sizes(config: Config, process_count: int) -> dict[str, int]:
    """The run's sizes that ``sharding.fit.check_fits`` checks against the mesh."""
    t = config.train
    return {
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "grad_accum": t.grad_accum,
        "process_count": process_count,
    }


def split_labels(text: str) -> list[str]:
    """``data.labels`` ('comedy, history,tragedy') -> ['comedy', 'history', 'tragedy']."""
    return [name.strip() for name in text.split(",") if name.strip()]


EXAMPLE_OBJECTIVES = ("seq2seq", "classification")  # read JSONL examples, not a packed token stream
# The keys of the eval records each objective writes (train/data/tasks.py evaluators).
EVAL_METRICS = {
    "causal_lm": ("eval_loss", "eval_bpb"),
    "masked_lm": ("eval_loss",),
    "span_corruption": ("eval_loss",),
    "seq2seq": ("eval_loss", "eval_token_accuracy"),
    "classification": ("eval_loss", "eval_accuracy", "eval_macro_f1"),
}
MAXIMIZED = ("eval_accuracy", "eval_macro_f1", "eval_token_accuracy")  # the rest are losses
OBJECTIVE_FAMILY = {
    "causal_lm": "decoder",
    "masked_lm": "encoder",
    "span_corruption": "encoder_decoder",
    "seq2seq": "encoder_decoder",
    "classification": "encoder",
}


PRETRAINING_OBJECTIVE = {"decoder": "causal_lm", "encoder": "masked_lm", "encoder_decoder": "span_corruption"}


def objective_problems(config: Config) -> list[str]:
    """train.objective against the model family and head and the data format."""
    t, model, data = config.train, config.model, config.data
    family = OBJECTIVE_FAMILY[t.objective]
    if model.family != family:
        return [f"train.objective={t.objective} trains model.family={family}, not {model.family}; change one"]
    out = []
    head = "classification" if t.objective == "classification" else "lm"
    if family == "encoder" and model.head != head:
        out.append(f"train.objective={t.objective} needs model.head={head}, not {model.head}; set model.head={head}")
    if t.objective in EXAMPLE_OBJECTIVES and data.format != "jsonl":
        out.append(f"train.objective={t.objective} reads one example per JSONL row; set data.format=jsonl")
    labels = split_labels(data.labels)
    if t.objective == "classification" and labels and len(labels) != model.num_labels:
        out.append(
            f"data.labels names {len(labels)} labels but model.num_labels={model.num_labels}; "
            f"set model.num_labels={len(labels)}"
        )
    if t.target_len <= 0:
        out.append(f"train.target_len must be positive, got {t.target_len}")
    return out


def natural_mode(metric: str) -> str:
    """'max' for accuracies and F1, 'min' for losses."""
    return "max" if metric in MAXIMIZED else "min"


def _metric_problems(metric: str, mode: str, objective: str, key: str, mode_key: str) -> list[str]:
    """``metric`` must be a key of the objective's eval records, ``mode`` (if set) its natural direction."""
    reported = EVAL_METRICS[objective]
    if metric not in reported:
        options = f"use one of {', '.join(reported)}{_close_match(metric, reported)}"
        return [f"{key}={metric!r} is never reported by train.objective={objective}; {options}"]
    natural = natural_mode(metric)
    if mode and mode != natural:
        return [f"{mode_key}={mode} would look for the worst {metric}; use {natural} (or leave it empty)"]
    return []


def best_problems(config: Config) -> list[str]:
    """train.early_stopping and checkpoint.keep_best / best_metric / best_mode (train/best.py)."""
    es, c, objective = config.train.early_stopping, config.checkpoint, config.train.objective
    out = []
    if es.metric:
        out += _metric_problems(
            es.metric, es.mode, objective, "train.early_stopping.metric", "train.early_stopping.mode"
        )
        if es.patience < 1 or es.min_delta < 0:
            out.append("train.early_stopping.patience must be >= 1 and min_delta >= 0")
        if config.train.eval_every == 0:
            out.append("train.early_stopping needs periodic evals; set train.eval_every > 0")
        if c.best_metric and (c.best_metric, c.best_mode) != (es.metric, es.mode):
            out.append(
                "checkpoint.best_metric / best_mode differ from train.early_stopping's metric / mode; the best "
                "checkpoint is the early-stopping one: drop checkpoint.best_metric and best_mode"
            )
    elif es.mode:
        out.append("train.early_stopping.mode is set but early stopping is off; set train.early_stopping.metric")
    if c.best_metric and not es.metric:
        out += _metric_problems(c.best_metric, c.best_mode, objective, "checkpoint.best_metric", "checkpoint.best_mode")
    if (c.best_metric or c.best_mode) and not c.keep_best:
        out.append("checkpoint.best_metric / best_mode are set but checkpoint.keep_best is false; set it true")
    if c.keep_best and not (es.metric or c.best_metric):
        out.append("checkpoint.keep_best needs a metric: set checkpoint.best_metric (or train.early_stopping.metric)")
    return out


def save_config(config: Config, path: pathlib.Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
