"""Run configuration: typed dataclasses per section, loaded from YAML plus dotted overrides.

``load_config(path, ["train.steps=100", "mesh.fsdp=-1"])`` returns a validated ``Config``;
anything wrong raises ``ConfigError`` with one sentence naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import types
import typing
from typing import Any, Literal

import yaml

from models.config import ConfigError, ModelConfig
from sharding.mesh import MeshConfig
from train.config.validate import close_match, validate

__all__ = ["Config", "ConfigError", "MeshConfig", "ModelConfig", "load_config", "save_config", "validate"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"  # everything the run writes goes here; reused => resume
    coordinator: str = ""  # host:port of process 0 for multi-process runs; empty: one process
    num_processes: int = 1  # processes taking part (one per host, usually)
    process_id: int = -1  # this process's index; -1: from the cluster environment
    auto_distributed: bool = False  # Cloud TPU / SLURM: let JAX discover the cluster itself
    coordinator_timeout_s: int = 120  # give up reaching the coordinator after this long
    # where metrics go (train/run/writers.py): any of tensorboard, jsonl, wandb, mlflow (pip install -e '.[wandb]')
    trackers: tuple[Literal["tensorboard", "jsonl", "wandb", "mlflow"], ...] = ("tensorboard", "jsonl")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """(token_)classification training rows, per word (train/data/augment.py); all 0: off."""

    synonym: float = 0.0  # probability a word becomes one of its synonyms
    insert: float = 0.0  # probability a synonym (else a copy) of a word is inserted after it
    swap: float = 0.0  # probability a word trades places with another
    delete: float = 0.0  # probability a word is dropped
    synonyms: str = ""  # file of 'word syn1 syn2 ...' lines


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_files: str = "data/shakespeare/*.txt"  # glob(s), comma-separated; relative to the cwd
    val_files: str = ""  # glob(s) of held-out documents; empty: split off val_fraction of documents
    # text: a document per file; jsonl: an example per line; conll: a tagged sentence per block (train/data/conll.py);
    # tfds: by name
    format: Literal["text", "jsonl", "conll", "tfds"] = "text"
    text_field: str = "text"  # the JSONL field (or TFDS feature) that holds the text
    val_fraction: float = 0.05  # fraction of whole documents held out when val_files is empty
    tokenizer: str = "byte"  # 'byte' or a directory holding a Hugging Face tokenizer
    shuffle: bool = True
    num_workers: int = 0  # grain worker processes (0: in the main process)
    # true: rows packed with whole examples (first-fit) or documents, segment ids keep them apart;
    # false: one padded example a row, and text windows whose documents attend to each other;
    # unset: true for every objective but span_corruption (which corrupts whole windows)
    packing: bool | None = None
    tfds_name: str = ""  # format=tfds: dataset[/config][:version], e.g. c4/en:3.1.0 (see train/data/tfds_source.py)
    tfds_data_dir: str = ""  # directory (or gs:// path) holding prepared TFDS datasets; empty: TFDS's default
    tfds_train_split: str = "train"
    tfds_val_split: str = "validation"
    tfds_reader: Literal["data_source", "tf_data"] = "data_source"  # tf_data needs TensorFlow: pip install -e '.[tf]'
    # classification / token_classification / seq2seq examples (train/data/examples.py): one JSONL row per example
    label_field: str = "label"  # classification: the field holding the label (a string or an integer)
    labels: str = ""  # (token_)classification: label names in id order, comma-separated; empty: sorted, from the data
    tokens_field: str = "tokens"  # token_classification: the field holding the words (a list of strings)
    tags_field: str = "tags"  # token_classification: the field holding one tag per word (B-PER, I-PER, O, ...)
    tag_column: int = -1  # conll: the column holding the tag (0 is the word, -1 the last)
    tag_scheme: Literal["auto", "iob1", "iob2", "bioes"] = "auto"  # conll: how the files write entities; iob1 -> iob2
    document_context: bool = False  # conll: a sentence's window filled with its document's neighbouring words
    input_field: str = "input"  # seq2seq: the field holding the input text
    target_field: str = "target"  # seq2seq: the field holding the target text
    group_field: str = ""  # hold out whole groups of rows sharing this field's value (val_fraction of groups)
    test_files: str = ""  # glob(s) of a test split training never reads (python -m train.evaluate --split test)
    test_fraction: float = 0.0  # else: fraction of whole documents (example groups, rows) held out for test
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    skip_bad: bool = False  # sft: leave bad rows out (counted, reported) instead of stopping at the first


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "adafactor", "sgd"] = "adamw"
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear, wsd)
    schedule: Literal["cosine", "linear", "constant", "wsd", "rsqrt"] = "cosine"  # rsqrt: lr*sqrt(warmup/step)
    warmup_steps: int = 100
    warmup_ratio: float = 0.0  # > 0: warm up for this share of train.steps instead of warmup_steps
    layer_decay: float = 1.0  # < 1: layer i of L learns at lr * layer_decay ** (L - i), embeddings ** (L + 1)
    decay_fraction: float = 0.2  # wsd: fraction of steps spent in the final decay
    b1: float = 0.9  # adamw
    b2: float = 0.95  # adamw
    eps: float = 1e-8  # adamw
    weight_decay: float = 0.1  # decoupled (lr * weight_decay * w a step), on matrices only: no norms, biases, embeddings
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
class ProfileConfig:
    """A jax.profiler trace of some steps, written to ``run.dir/profile`` (train/run/profiling.py)."""

    start_step: int = 0  # trace the steps after this many have finished
    steps: int = 0  # steps traced; 0: off


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
    """Adversarial training on the input token embeddings, inside the train step (train/core/adversarial.py)."""

    method: Literal["", "fgm", "pgd"] = ""  # fgm: one step of size epsilon; pgd: projected steps; empty: off
    epsilon: float = 1.0  # L2 radius of each row's perturbation [T, embed]
    steps: int = 3  # pgd: ascent steps
    alpha: float = 0.3  # pgd: L2 length of each ascent step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    epochs: float = 0.0  # > 0: train.steps = ceil(epochs * training examples (windows) / batch_size) instead
    batch_size: int = 32  # global, in sequences
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step, accumulated inside the jitted step
    objective: Literal[
        "causal_lm", "masked_lm", "span_corruption", "seq2seq", "classification", "token_classification", "sft"
    ] = "causal_lm"
    loss_on: Literal["completion", "assistant", "all"] = "assistant"  # sft: the tokens the loss reads (chat.py)
    target_len: int = 64  # seq2seq: target tokens (the encoder reads seq_len tokens)
    mask_rate: float = 0.15  # masked_lm: share of tokens chosen (80% [MASK], 10% random, 10% kept)
    noise_density: float = 0.15  # span_corruption: share of tokens in noise spans
    mean_span: float = 3.0  # span_corruption: mean noise-span length
    # token_classification: start the classifier bias at the log tag frequencies of the training words, so the
    # first steps need not shift every token's state to learn the prior (train/data/tagging.py log_prior)
    prior_bias: bool = False
    log_every: int = 10
    eval_every: int = 200  # 0 disables periodic eval (a final eval still runs)
    eval_batches: int = 8
    sample_every: int = 0  # decoders: print a sample every this many steps too; 0: only at the end
    sample_prompt: str = "ROMEO.\n"
    sample_tokens: int = 200
    progress_bar: bool = True
    early_stopping: EarlyStoppingConfig = dataclasses.field(default_factory=EarlyStoppingConfig)
    freeze: str = ""  # regex over parameter paths kept fixed ('embed|stack/blocks/attn'; train/core/freeze.py)
    freeze_layers: int = 0  # keep the lower N layers of every layer stack fixed
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    # fgm / pgd: the loss also reads the inputs perturbed along its normalised gradient (docs/fine-tuning.md)
    adversarial: AdversarialConfig = dataclasses.field(default_factory=AdversarialConfig)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between saves; 0: only at the end
    keep: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep every Nth step forever; 0: off
    async_save: bool = True
    init_from: str = ""  # start a new run from another run's parameters
    init_layers: Literal["", "lower"] = ""  # lower: a source with more layers gives its rows [0, n_layers)
    keep_best: bool = False  # also keep the step of the best eval (train/checkpoints/best.py)
    best_metric: str = ""  # keep_best without early stopping: the eval key that ranks steps
    best_mode: Literal["", "min", "max"] = ""  # empty: max for accuracies and F1, min for losses


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (models/lora.py); only they train, every other parameter is frozen."""

    rank: int = 0  # 0: off
    alpha: float = 16.0  # the adapters' update is scaled by alpha / rank
    targets: str = ModelConfig.lora_targets  # regex over kernel paths; e.g. add '|(.*/)?mlp/(wi|wg|wo)'
    dropout: float = 0.0  # on the adapters' input (x -> dropout(x) A B); training only
    init_from: str = ""  # PEFT adapters (adapter_config.json + adapter_model.safetensors) to start from


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    size: int = 64  # bottleneck width of every adapter (embed -> size -> embed)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    length: int = 16  # learned key/value vectors per self-attention layer
    hidden: int = 0  # width of the reparameterisation MLP they come from (0: none); exports fold it


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    length: int = 16  # learned input embeddings


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """The parameter-efficient method (models/lora.py, models/peft.py); only its parameters (and a
    classifier's fresh head) train. ``none`` with ``lora.rank > 0`` is LoRA (the ``lora:`` section alone)."""

    method: Literal["none", "lora", "adapter", "prefix", "prompt"] = "none"
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    prefix: PrefixConfig = dataclasses.field(default_factory=PrefixConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)

    def model_fields(self) -> dict[str, int]:
        """The ModelConfig fields of ``method`` (adapter, prefix, prompt; LoRA's come from ``lora:``)."""
        if self.method == "adapter":
            return {"adapter_size": self.adapter.size}
        if self.method == "prefix":
            return {"prefix_length": self.prefix.length, "prefix_hidden": self.prefix.hidden}
        return {"prompt_length": self.prompt.length} if self.method == "prompt" else {}


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Magnitude pruning during training (train/compress/magnitude.py); off while ``sparsity`` is 0."""

    sparsity: float = 0.0  # final share of zeros in the targeted matrices, in [0, 1)
    scope: Literal["global", "layer"] = "global"  # one ranking of all targeted values, or per matrix per layer
    start_step: int = 0  # first pruning step (0-based, the state's step before the update)
    end_step: int = 0  # last pruning step, where the sparsity is reached; = start_step: one-shot
    every: int = 100  # steps between mask updates from start_step to end_step
    targets: str = r"(attn|cross)/(q|k|v|o)/kernel|mlp/(wi|wg|wo)/kernel"  # re.search over parameter paths


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher (train/compress/teacher.py); empty teacher: off."""

    teacher: str = ""  # a run, export or Hugging Face directory sharing the student's tokenizer
    temperature: float = 2.0  # T: both distributions are softmax(logits / T); the KL term is scaled by T^2
    alpha: float = 0.5  # weight of the usual (hard-label) loss next to the KL term
    top_k: int = 0  # distil only the teacher's k most likely classes, renormalised; 0: all


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
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        """Plain dicts, lists and scalars (YAML and JSON write it as is)."""
        return _lists(dataclasses.asdict(self))


# --- loading --------------------------------------------------------------------------------


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks ``value`` against the field type ``hint``; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        options = typing.get_args(hint)
        if value not in options:
            choices = ", ".join(repr(o) for o in options)
            raise ConfigError(f"{key}={value!r} is not one of {choices}{close_match(str(value), map(str, options))}")
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
            raise ConfigError(f"unknown config key '{path}'{close_match(key, fields)}")
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


def load_yaml(path: str | pathlib.Path, what: str = "config file") -> dict:
    """The mapping of sections in the YAML file ``path``; ConfigError naming ``what`` it is when it holds none."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist; pass a YAML file from configs/")
    try:
        tree = _yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text; pass a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of sections")
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
    config = _build(Config, tree, "")
    fields = config.peft.model_fields()
    if config.lora.rank:  # without: a saved, resolved model config may carry its adapters itself
        fields |= {f"lora_{name}": getattr(config.lora, name) for name in ("rank", "alpha", "targets", "dropout")}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **fields)) if fields else config


def checked_config(tree: dict) -> Config:
    """``build_config(tree)`` that also passes ``validate``; ConfigError names the first problem."""
    config = build_config(tree)
    problems = validate(config)
    if problems:
        raise ConfigError(problems[0])
    return config


def load_config(path: str | pathlib.Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Reads ``path`` (default: the shipped default run), applies overrides, validates."""
    return checked_config(config_tree(path, overrides))


def save_config(config: Config, path: pathlib.Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
