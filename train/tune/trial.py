"""One trial: the sampled params over the base config, a normal run in ``<study.dir>/trial-NNNN``.

Every eval the loop makes is reported to the Optuna trial by a loop callback; when the pruner
says so, the callback asks the loop to stop (it saves a checkpoint and returns) and the trial
ends PRUNED with its metrics kept. A sampled config the trainer refuses ends the trial FAIL with
the reason in the trial's ``fail_reason``; the study goes on.
"""

from __future__ import annotations

import copy
import math
import pathlib
import time
import traceback

import optuna

from train.config.sections import Config, ConfigError, apply_overrides, checked_config
from train.run.callbacks import Callback
from train.tune.liveness import Heartbeat
from train.tune.search import Search, override


class TrialFailed(Exception):
    """The trial cannot give a metric; ``fail_reason`` on the trial says why."""


class Preempted(TrialFailed):
    """The worker was asked to stop (SIGTERM/SIGINT) during the trial; it saved a checkpoint."""


class Reporter(Callback):
    """Reports ``metric`` of each eval record to ``trial``; asks the loop to stop when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned: str | None = None
        self.steps = 0

    def on_eval(self, loop, record: dict) -> None:
        value, step = record.get(self.metric), record["step"]
        if value is None or self.pruned:
            return
        self.trial.report(float(value), step)
        if step < loop.config.train.steps and self.trial.should_prune():
            self.pruned = f"pruned at step {step} ({self.metric} {value:.4f})"
            loop.request_stop(self.pruned)

    def on_step_end(self, loop, step: int) -> None:
        self.steps = step

    def on_end(self, loop, result: dict) -> None:
        self.steps = loop.step


def trial_config(search: Search, base_tree: dict, params: dict, run_dir: pathlib.Path) -> Config:
    """The base config with ``params`` and ``run.dir`` set, validated like a normal run."""
    overrides = [override(key, value) for key, value in params.items()] + [override("run.dir", str(run_dir))]
    return checked_config(apply_overrides(copy.deepcopy(base_tree), overrides))


def _fail(trial: optuna.Trial, reason: str, kind: type[TrialFailed] = TrialFailed) -> TrialFailed:
    trial.set_user_attr("fail_reason", reason)
    return kind(reason)


def run_trial(trial: optuna.Trial, search: Search, base_tree: dict, study_dir: pathlib.Path) -> float:
    """Samples, trains and returns the trial's metric; raises ``TrialPruned`` or ``TrialFailed``."""
    from train.__main__ import check_backend
    from train.run.loop import run

    params = {p.key: p.suggest(trial) for p in search.space}
    run_dir = study_dir / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    reporter = Reporter(trial, search.study.metric)
    start = time.perf_counter()
    with Heartbeat(trial, search.study.heartbeat_s):
        try:
            config = trial_config(search, base_tree, params, run_dir)
            check_backend(config)
            result = run(config, callbacks=[reporter])
        except ConfigError as e:
            raise _fail(trial, f"invalid config: {e}") from None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for this trial's sizes: the study goes on
            traceback.print_exc()
            raise _fail(trial, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
            trial.set_user_attr("steps", reporter.steps)
    trial.set_user_attr("eval", result.get("eval") or {})
    if result.get("preempted_at") is not None:
        raise _fail(trial, f"preempted at step {result['preempted_at']}; resume it by hand from {run_dir}", Preempted)
    if reporter.pruned:
        raise optuna.TrialPruned(reporter.pruned)
    value = (result.get("eval") or {}).get(search.study.metric)
    if value is None or not math.isfinite(value):
        raise _fail(trial, f"{search.study.metric} is {value} (diverged or never evaluated)")
    return float(value)
