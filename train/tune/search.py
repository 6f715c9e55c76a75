"""The search file of ``python -m train.tune``: a ``study:`` section and a ``space:`` of config keys.

``load_search(path, base_tree)`` returns a checked ``Search``; anything wrong raises ``ConfigError``
naming the key, before any trial runs. Space keys are checked by the config loader itself
(``train.config.sections.build_config``), so a key or a value type the trainer would refuse is refused here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
from typing import Any

from train.config.sections import ConfigError, apply_overrides, build_config, load_yaml
from train.config.validate import EVAL_METRICS, MAXIMIZED, close_match

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "hyperband", "none")
PARAM_TYPES = ("float", "int", "categorical")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    dir: str = ""  # trials, database, results
    metric: str = ""  # a key of the eval records, e.g. eval_bpb
    direction: str = ""  # minimize | maximize; empty: maximize accuracies, minimize losses
    trials: int = 20  # finished (complete or pruned) trials to reach, over all workers
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str = ""  # empty: sqlite:///<dir>/study.db; any Optuna storage URL; journal:<file>
    name: str = ""  # study name inside the storage; empty: the name of dir
    seed: int | None = None  # sampler seed: one worker repeats exactly; leave unset for several workers
    sampler_options: dict = dataclasses.field(default_factory=dict)  # keyword arguments of the Optuna sampler
    pruner_options: dict = dataclasses.field(default_factory=dict)  # keyword arguments of the Optuna pruner
    heartbeat_s: float = 30.0  # a running trial's heartbeat; silent for 4 of them: its worker died


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config key: ``float``/``int`` in [low, high] (``log``, ``step``) or ``categorical``."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list:
        """Every value, for the grid sampler (floats need a ``step``)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "float" and self.step is None:
            raise ConfigError(f"sampler grid needs a finite set: give space.{self.key} a step or make it categorical")
        count = math.floor((self.high - self.low) / (self.step or 1) + 1e-9) + 1
        values = [self.low + i * (self.step or 1) for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else [float(v) for v in values]

    def corners(self) -> list:
        """The values whose config keys and types the config loader must accept."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


@dataclasses.dataclass(frozen=True)
class Search:
    study: StudyConfig
    space: tuple[Param, ...]

    @property
    def maximize(self) -> bool:
        return self.study.direction == "maximize"


def override(key: str, value: Any) -> str:
    """``key=value`` in the override syntax, any scalar kept exactly (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param(key: str, spec: Any) -> Param:
    where = f"space.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping like {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}.type={kind!r} is not one of {', '.join(PARAM_TYPES)}")
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
    for name in spec:
        if name not in allowed:
            raise ConfigError(f"unknown key '{where}.{name}' for type {kind}{close_match(name, allowed)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices must be a non-empty list of values")
        return Param(key, kind, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    want = int if kind == "int" else (int, float)
    for name, value in (("low", low), ("high", high)):
        if not _number(value) or not isinstance(value, want):
            raise ConfigError(f"{where}.{name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    if not low < high:
        raise ConfigError(f"{where}: low={low} must be below high={high}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: log=true needs low > 0, got low={low}")
    if step is not None and (not _number(step) or not isinstance(step, want) or not 0 < step <= high - low):
        raise ConfigError(f"{where}.step={step!r} must be a positive {kind} no larger than high - low")
    if step is not None and log:
        raise ConfigError(f"{where}: log=true and step cannot be combined; drop one")
    return Param(key, kind, low, high, log, step)


def _study(values: Any, path: str) -> StudyConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"search file '{path}' needs a 'study:' section (dir, metric, trials, ...)")
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown key 'study.{key}'{close_match(key, fields)}")
    study = StudyConfig(**values)
    for name in ("dir", "metric", "direction", "sampler", "pruner", "storage", "name"):
        if not isinstance(getattr(study, name), str):
            raise ConfigError(f"study.{name} must be a string, got {getattr(study, name)!r}")
    if not study.dir:
        raise ConfigError("study.dir is missing; name the directory for the trials and results, e.g. runs/tune-lr")
    if not study.metric:
        raise ConfigError("study.metric is missing; name an eval key, e.g. eval_bpb or eval_accuracy")
    if isinstance(study.trials, bool) or not isinstance(study.trials, int) or study.trials < 1:
        raise ConfigError(f"study.trials must be a positive integer, got {study.trials!r}")
    for name, options in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        value = getattr(study, name)
        if value not in options:
            raise ConfigError(f"study.{name}={value!r} is not one of {', '.join(options)}{close_match(value, options)}")
    for name in ("sampler_options", "pruner_options"):
        if not isinstance(getattr(study, name), dict):
            raise ConfigError(f"study.{name} must be a mapping of keyword arguments")
    if study.seed is not None and (isinstance(study.seed, bool) or not isinstance(study.seed, int)):
        raise ConfigError(f"study.seed must be an integer, got {study.seed!r}")
    if not _number(study.heartbeat_s) or study.heartbeat_s <= 0:
        raise ConfigError(f"study.heartbeat_s must be a positive number of seconds, got {study.heartbeat_s!r}")
    return study


def _check_metric(study: StudyConfig, objectives: set[str]) -> StudyConfig:
    """The metric must be in the eval records of every objective the trials can train."""
    for objective in sorted(objectives):
        reported = EVAL_METRICS[objective]
        if study.metric not in reported:
            raise ConfigError(
                f"study.metric={study.metric!r} is never reported by train.objective={objective}; "
                f"use one of {', '.join(reported)}{close_match(study.metric, reported)}"
            )
    natural = "maximize" if study.metric in MAXIMIZED else "minimize"
    if not study.direction:
        return dataclasses.replace(study, direction=natural)
    if study.direction not in ("minimize", "maximize"):
        raise ConfigError(f"study.direction={study.direction!r} is not one of minimize, maximize")
    if study.direction != natural:
        raise ConfigError(
            f"study.direction={study.direction} would look for the worst {study.metric}; use direction: {natural}"
        )
    return study


def load_search(path: str, base_tree: dict) -> Search:
    """Reads and checks the search file against ``base_tree`` (the base config with overrides)."""
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"search file '{path}' does not exist; pass one like configs/search/default-lr.yaml")
    tree = load_yaml(path, "search file")
    for key in tree:
        if key not in ("study", "space"):
            raise ConfigError(f"unknown section '{key}' in search file '{path}'{close_match(key, ['study', 'space'])}")
    study = _study(tree.get("study"), path)
    space = tree.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"search file '{path}' needs a 'space:' section mapping config keys to ranges")
    params = tuple(_param(str(key), spec) for key, spec in space.items())
    objectives = set()
    for param in params:
        if param.key.startswith("run."):
            raise ConfigError(f"space.{param.key}: run.* keys belong to each trial (run.dir is trial-NNNN); drop it")
        for value in param.corners():
            trial_tree = copy.deepcopy(base_tree)
            try:
                config = build_config(apply_overrides(trial_tree, [override(param.key, value)]))
            except ConfigError as e:
                raise ConfigError(f"space.{param.key}: {e}") from None
            objectives.add(config.train.objective)
    if study.sampler == "grid":
        size = math.prod(len(p.grid()) for p in params)
        if study.trials > size:
            raise ConfigError(f"study.trials={study.trials} is more than the {size} points of the grid; lower it")
    return Search(_check_metric(study, objectives), params)
