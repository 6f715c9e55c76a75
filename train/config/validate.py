"""Checks of a whole run configuration that need no devices or data, and the tables they use.

``validate(config)`` returns every problem as one sentence with its fix; ``load_config`` raises the
first as a ConfigError.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from sharding.fit import batch_problems

if TYPE_CHECKING:
    from train.config.sections import Config, OptimizerConfig, TrainConfig


def close_match(word: str, options) -> str:
    """A ' (did you mean ...?)' suffix naming the closest of ``options``, or an empty string."""
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


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
    if t.profile.steps < 0 or t.profile.start_step < 0:
        out.append("train.profile.start_step and steps must be >= 0 (steps 0: off)")
    elif t.profile.steps and t.profile.start_step + t.profile.steps > t.steps:
        out.append(
            f"train.profile traces steps {t.profile.start_step + 1}-{t.profile.start_step + t.profile.steps}, past "
            f"train.steps={t.steps}; lower train.profile.start_step or steps"
        )
    out += adversarial_problems(t)
    if config.model.attention == "splash" and t.seq_len % 128:
        out.append(f"model.attention='splash' needs train.seq_len to be a multiple of 128, got {t.seq_len}")
    if config.model.quant == "int8" and config.model.peft_method == "none":
        out.append(
            "model.quant=int8 holds int8 weights that cannot be trained; train LoRA adapters over them (lora.rank > 0, "
            "checkpoint.init_from a python -m train.quantize export) or another peft.method, fine-tune for int8 with "
            "model.quant=qat, or train with model.quant=none and quantise the result with python -m train.quantize"
        )
    if config.model.quant == "qat" and config.model.peft_method != "none":
        out.append(
            f"model.quant=qat trains the weights int8 will round, but {config.model.peft_method} freezes them and adds "
            "float parameters; use one of model.quant=qat and a PEFT method"
        )
    out += peft_problems(config)
    if config.lora.init_from and not config.model.lora_rank:
        out.append("lora.init_from starts LoRA adapters from PEFT ones; set lora.rank (and alpha, targets) to theirs")
    out += config.mesh.problems()
    if not out:  # before the devices are known: one data-parallel shard (the mesh check follows in the run)
        one = {axis: 1 for axis in ("data", "fsdp", "tensor")}
        out += batch_problems(
            t.batch_size, t.grad_accum, one, config.mesh.logical_rules, max(config.run.num_processes, 1)
        )
    if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
        out.append("optimizer.lr must be > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1]")
    out += optimizer_problems(o) + freeze_problems(t) + prune_problems(config)
    if not 0 <= config.data.val_fraction < 1:
        out.append(f"data.val_fraction must be in [0, 1), got {config.data.val_fraction}")
    if not 0 <= config.data.test_fraction < 1:
        out.append(f"data.test_fraction must be in [0, 1), got {config.data.test_fraction}")
    if config.data.format == "tfds" and (config.data.test_files or config.data.test_fraction):
        out.append("data.test_files and data.test_fraction are for text and JSONL files, not data.format=tfds")
    d = config.data
    if d.format != "conll" and (d.tag_scheme != "auto" or d.tag_column != -1):
        out.append(f"data.tag_scheme and data.tag_column are for data.format=conll, not {d.format}; drop them")
    if d.document_context and (d.format != "conll" or t.objective != "token_classification"):
        out.append("data.document_context is for token_classification on data.format=conll (documents); drop it")
    if t.epochs < 0 or (t.epochs and config.data.format == "tfds"):
        out.append(f"train.epochs must be >= 0 (0: train.steps) and needs files, not data.format=tfds; got {t.epochs}")
    if config.data.format == "tfds" and not config.data.tfds_name:
        out.append("data.format=tfds needs data.tfds_name, e.g. data.tfds_name=c4/en:3.1.0")
    out += objective_problems(config)
    out += best_problems(config) + distill_problems(config) + augment_problems(config)
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
    if not 0 <= o.warmup_ratio < 1:
        out.append(f"optimizer.warmup_ratio must be in [0, 1) (0: use warmup_steps), got {o.warmup_ratio}")
    if not 0 < o.layer_decay <= 1:
        out.append(f"optimizer.layer_decay must be in (0, 1] (1: off), got {o.layer_decay}")
    if o.decay_rate <= 0 or o.clipping_threshold < 0 or o.min_dim_size_to_factor < 1:
        out.append("optimizer.decay_rate must be > 0, clipping_threshold >= 0 (0: off) and min_dim_size_to_factor >= 1")
    return out


def adversarial_problems(t: TrainConfig) -> list[str]:
    a = t.adversarial
    if not a.method:
        return []
    out = [] if a.epsilon > 0 else [f"train.adversarial.epsilon must be > 0, got {a.epsilon}"]
    if a.method == "pgd" and a.steps < 1:
        out.append(f"train.adversarial.steps must be >= 1 (pgd ascent steps), got {a.steps}")
    if a.method == "pgd" and a.alpha <= 0:
        out.append(f"train.adversarial.alpha must be > 0 (the length of a pgd step), got {a.alpha}")
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


def prune_problems(config: Config) -> list[str]:
    """The ``prune:`` section (train/compress/magnitude.py)."""
    p, steps = config.prune, config.train.steps
    if not 0 <= p.sparsity < 1:
        return [f"prune.sparsity={p.sparsity} must be in [0, 1) (0: off)"]
    if p.sparsity == 0:
        return []
    out = []
    if not 0 <= p.start_step <= p.end_step < steps or p.every < 1:
        out.append(
            f"prune needs 0 <= start_step <= end_step < train.steps={steps} and every >= 1, got start_step="
            f"{p.start_step}, end_step={p.end_step}, every={p.every}"
        )
    try:
        re.compile(p.targets)
    except re.error as e:
        out.append(f"prune.targets={p.targets!r} is not a regular expression ({e}); fix or quote it")
    if config.model.peft_method != "none":
        method = config.model.peft_method
        out.append(f"prune does not apply to {method} runs (the base weights are frozen); set prune.sparsity=0")
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


# read JSONL examples, not a packed token stream
EXAMPLE_OBJECTIVES = ("seq2seq", "classification", "token_classification", "sft")
ENTITY_METRICS = ("eval_entity_precision", "eval_entity_recall", "eval_entity_f1")  # micro, exact spans
# The keys of the eval records each objective writes (train/evaluation/evaluators.py).
EVAL_METRICS = {
    "causal_lm": ("eval_loss", "eval_bpb"),
    "masked_lm": ("eval_loss",),
    "span_corruption": ("eval_loss",),
    "seq2seq": ("eval_loss", "eval_token_accuracy"),
    "sft": ("eval_loss", "eval_token_accuracy"),  # over the loss_on tokens
    "classification": ("eval_loss", "eval_accuracy", "eval_macro_f1"),
    "token_classification": ("eval_loss", "eval_token_accuracy", "eval_token_macro_f1", *ENTITY_METRICS),
}
MAXIMIZED = (
    "eval_accuracy",
    "eval_macro_f1",
    "eval_token_accuracy",
    "eval_token_macro_f1",
    *ENTITY_METRICS,
)  # the rest are losses
OBJECTIVE_FAMILY = {
    "causal_lm": "decoder",
    "masked_lm": "encoder",
    "span_corruption": "encoder_decoder",
    "seq2seq": "encoder_decoder",
    "sft": "decoder",
    "classification": "encoder",
    "token_classification": "encoder",
}


PRETRAINING_OBJECTIVE = {"decoder": "causal_lm", "encoder": "masked_lm", "encoder_decoder": "span_corruption"}


def objective_problems(config: Config) -> list[str]:
    """train.objective against the model family and head and the data format."""
    t, model, data = config.train, config.model, config.data
    family = OBJECTIVE_FAMILY[t.objective]
    if model.family != family:
        return [f"train.objective={t.objective} trains model.family={family}, not {model.family}; change one"]
    out = []
    head = t.objective if t.objective in ("classification", "token_classification") else "lm"
    if family == "encoder" and model.head != head:
        out.append(f"train.objective={t.objective} needs model.head={head}, not {model.head}; set model.head={head}")
    if data.format == "conll" and t.objective != "token_classification":
        out.append(f"data.format=conll holds tagged words, for train.objective=token_classification, not {t.objective}")
    elif t.objective in EXAMPLE_OBJECTIVES and data.format not in ("jsonl", "conll"):
        out.append(f"train.objective={t.objective} reads one example per JSONL row; set data.format=jsonl")
    labels = split_labels(data.labels)
    if head != "lm" and labels and len(labels) != model.num_labels:
        out.append(
            f"data.labels names {len(labels)} labels but model.num_labels={model.num_labels}; "
            f"set model.num_labels={len(labels)}"
        )
    if t.target_len <= 0:
        out.append(f"train.target_len must be positive, got {t.target_len}")
    if t.objective != "sft" and (t.loss_on != "assistant" or data.skip_bad):
        out.append(f"train.loss_on and data.skip_bad are for train.objective=sft, not {t.objective}; drop them")
    if t.prior_bias and t.objective != "token_classification":
        out.append(f"train.prior_bias is for train.objective=token_classification, not {t.objective}; drop it")
    return out


DISTILLED_OBJECTIVES = ("causal_lm", "masked_lm", "classification")


def distill_problems(config: Config) -> list[str]:
    """The ``distill:`` section (train/compress/teacher.py checks the teacher itself when the run starts)."""
    d = config.distill
    out = []
    if d.temperature <= 0 or d.alpha < 0 or d.top_k < 0:
        out.append("distill.temperature must be > 0, distill.alpha >= 0 and distill.top_k >= 0 (0: all)")
    if d.teacher and config.train.objective not in DISTILLED_OBJECTIVES:
        out.append(
            f"distill.teacher is set but train.objective={config.train.objective} cannot be distilled; "
            f"use one of {', '.join(DISTILLED_OBJECTIVES)} or drop distill.teacher"
        )
    return out


def augment_problems(config: Config) -> list[str]:
    """data.augment: probabilities in [0, 1], only for (token_)classification (train/data/augment.py)."""
    a, out = config.data.augment, []
    probabilities = {"synonym": a.synonym, "insert": a.insert, "swap": a.swap, "delete": a.delete}
    for name, p in probabilities.items():
        if not 0 <= p <= 1:
            out.append(f"data.augment.{name}={p} is not a probability; set it in [0, 1]")
    if any(probabilities.values()) and config.train.objective not in ("classification", "token_classification"):
        out.append(
            f"data.augment works on classification and token_classification rows, not train.objective="
            f"{config.train.objective}; set the data.augment probabilities to 0"
        )
    if a.synonym > 0 and not a.synonyms:
        out.append("data.augment.synonym > 0 needs data.augment.synonyms=FILE ('word syn1 syn2 ...' lines)")
    if any(probabilities.values()) and config.data.document_context:
        out.append("data.augment remakes each sentence alone, without data.document_context; drop one of them")
    return out


def natural_mode(metric: str) -> str:
    """'max' for accuracies and F1, 'min' for losses."""
    return "max" if metric in MAXIMIZED else "min"


def _metric_problems(metric: str, mode: str, objective: str, key: str, mode_key: str) -> list[str]:
    """``metric`` must be a key of the objective's eval records, ``mode`` (if set) its natural direction."""
    reported = EVAL_METRICS[objective]
    if metric not in reported:
        options = f"use one of {', '.join(reported)}{close_match(metric, reported)}"
        return [f"{key}={metric!r} is never reported by train.objective={objective}; {options}"]
    natural = natural_mode(metric)
    if mode and mode != natural:
        return [f"{mode_key}={mode} would look for the worst {metric}; use {natural} (or leave it empty)"]
    return []


def best_problems(config: Config) -> list[str]:
    """train.early_stopping and checkpoint.keep_best / best_metric / best_mode (train/checkpoints/best.py)."""
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


def peft_problems(config: Config) -> list[str]:
    """``peft.method`` against the ``lora:`` section and the chosen method's sizes (two methods at once:
    ``ModelConfig.problems``)."""
    method, p = config.peft.method, config.peft
    if method == "lora" and config.lora.rank <= 0:
        return ["peft.method=lora needs lora.rank > 0 (and lora.alpha, lora.targets); set lora.rank"]
    sizes = {"adapter": ("peft.adapter.size", p.adapter.size), "prefix": ("peft.prefix.length", p.prefix.length)}
    key, size = (sizes | {"prompt": ("peft.prompt.length", p.prompt.length)}).get(method, ("", 1))
    if size <= 0:
        return [f"{key}={size} must be > 0 for peft.method={method}"]
    if method == "prefix" and p.prefix.hidden < 0:
        return [f"peft.prefix.hidden={p.prefix.hidden} must be >= 0 (0: no reparameterisation MLP)"]
    return []
