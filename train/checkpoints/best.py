"""The best eval of a run: which step scored best on one metric, and how long ago that was.

One ``Best`` record serves early stopping (``train.early_stopping``: stop after ``patience`` evals
in a row without an improvement) and the best checkpoint (``checkpoint.keep_best``: the step of
the best eval is saved at once and kept apart from the newest ones). The record is saved as JSON
with every checkpoint (train/checkpoints/store.py), so a resumed run carries on exactly where the
checkpoint's step left it, and ``--best`` readers find the best step in the newest checkpoint.

An improvement beats the best value by more than ``min_delta`` (lower for ``mode: min``, higher for
``max``); the first finite value is the first best; NaN never improves.
"""

from __future__ import annotations

import dataclasses
import math

from train.config.sections import Config
from train.config.validate import natural_mode


@dataclasses.dataclass
class Best:
    metric: str  # a key of the eval records
    mode: str  # "min" | "max"
    min_delta: float = 0.0
    value: float | None = None  # the best value so far (None before the first finite one)
    step: int | None = None  # the step it was measured at
    evals_since: int = 0  # evals since the best one (0: the last eval was the best)

    def update(self, record: dict) -> bool:
        """Takes one eval record into account; True when it is the new best."""
        value = float(record[self.metric])
        sign = -1.0 if self.mode == "min" else 1.0
        improved = math.isfinite(value) and (self.value is None or sign * (value - self.value) > self.min_delta)
        if improved:
            self.value, self.step, self.evals_since = value, record["step"], 0
        else:
            self.evals_since += 1
        return improved

    def stop_reason(self, patience: int) -> str | None:
        """Why the run stops (patience exhausted), or None."""
        if self.evals_since < patience:
            return None
        by = f" by {self.min_delta:g}" if self.min_delta else ""
        best = f"best {self.value:.4g} at step {self.step}" if self.step is not None else f"no finite {self.metric}"
        return f"early stopping: {self.metric} did not improve{by} for {self.evals_since} evals ({best})"

    def same_rule(self, other: Best) -> bool:
        return (self.metric, self.mode, self.min_delta) == (other.metric, other.mode, other.min_delta)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> Best:
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


def tracked(config: Config) -> Best | None:
    """A fresh record for the run's metric: early stopping's, else ``checkpoint.best_metric``; None when
    the run tracks none (the config is validated: the metric is one its objective reports)."""
    es, c = config.train.early_stopping, config.checkpoint
    if es.metric:
        return Best(es.metric, es.mode or natural_mode(es.metric), es.min_delta)
    if c.keep_best and c.best_metric:
        return Best(c.best_metric, c.best_mode or natural_mode(c.best_metric))
    return None
