"""The study: its storage, sampler and pruner, and one worker's loop over trials.

Any number of workers (processes, machines) run ``work`` on one storage. Each loop turn fails
stale trials (liveness.py), stops once ``study.trials`` trials are finished (COMPLETE or PRUNED),
waits while the running trials of other workers could reach that number, and else runs one
trial. A trial that finds, once asked, that enough trials with lower numbers are running or
finished steps aside (FAIL, ``fail_reason`` surplus) before it trains, so racing workers never
overshoot ``study.trials``.
"""

from __future__ import annotations

import pathlib
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from train.config.sections import ConfigError
from train.tune import liveness
from train.tune.search import Search
from train.tune.trial import TrialFailed, run_trial

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_S = 2.0
MAX_FAILURES = 10  # a worker gives up after this many (or study.trials) failed trials in a row


def open_storage(search: Search) -> optuna.storages.BaseStorage | str:
    """``study.storage``: empty -> SQLite in study.dir; ``journal:<file>``; else an Optuna storage URL."""
    url = search.study.storage or f"sqlite:///{pathlib.Path(search.study.dir).resolve() / 'study.db'}"
    try:
        if url.startswith("journal:"):
            path = pathlib.Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server
        raise ConfigError(f"study.storage={url!r} cannot be opened ({type(e).__name__}: {e}); fix the URL") from None


def _build(kind: str, name: str, table: dict, options: dict, errors: tuple[type[Exception], ...], **fixed):
    """``table[name](**fixed, **options)``; ConfigError when the options do not fit it."""
    try:
        return table[name](**fixed, **options)
    except errors as e:
        raise ConfigError(f"study.{kind}_options do not fit the {name} {kind} ({e})") from None


def make_sampler(search: Search) -> optuna.samplers.BaseSampler:
    s = search.study
    samplers = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "grid": optuna.samplers.GridSampler,
    }
    fixed = {"search_space": {p.key: p.grid() for p in search.space}} if s.sampler == "grid" else {}
    return _build("sampler", s.sampler, samplers, s.sampler_options, (TypeError,), seed=s.seed, **fixed)


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
    s = search.study
    pruners = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }
    return _build("pruner", s.pruner, pruners, s.pruner_options, (TypeError, ValueError))


def open_study(search: Search) -> optuna.Study:
    """Creates the study, or loads it when the storage already holds it (resume, other workers)."""
    s = search.study
    sampler, pruner = make_sampler(search), make_pruner(search)
    pathlib.Path(s.dir).mkdir(parents=True, exist_ok=True)
    name = s.name or pathlib.Path(s.dir).resolve().name
    study = optuna.create_study(
        study_name=name,
        storage=open_storage(search),
        sampler=sampler,
        pruner=pruner,
        direction=s.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != s.direction:
        raise ConfigError(f"study '{name}' in the storage is to {study.direction.name.lower()}; use a new study.name")
    known = study.user_attrs.get("metric")
    if known and known != s.metric:
        raise ConfigError(f"study '{name}' in the storage measures {known}, not {s.metric}; use a new study.name")
    if not known:
        study.set_user_attr("metric", s.metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([s.metric])  # the plots' axis label
    return study


def _surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """True when ``target`` trials numbered below this one are already finished or running."""
    trials = study.get_trials(deepcopy=False)
    ahead = sum(t.state in FINISHED or (t.state == TrialState.RUNNING and t.number < trial.number) for t in trials)
    return ahead >= target


def work(study: optuna.Study, search: Search, base_tree: dict, report: Callable[[optuna.Study, int], None]) -> int:
    """Runs trials until ``study`` has ``study.trials`` finished; 0 when it has, 1 when stopped early."""
    target, heartbeat_s = search.study.trials, search.study.heartbeat_s
    study_dir = pathlib.Path(search.study.dir)
    failures, waiting = 0, False

    def objective(trial: optuna.Trial) -> float:
        if _surplus(study, trial, target):
            trial.set_user_attr("fail_reason", "surplus: enough trials were already running or finished")
            raise TrialFailed("surplus")
        return run_trial(trial, search, base_tree, study_dir)

    while True:
        for number, reason in liveness.fail_stale(study, heartbeat_s):
            print(f"trial {number} marked FAIL: {reason}", flush=True)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if finished >= target:
            return 0
        if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
            print(f"the grid is exhausted after {finished} finished trials", flush=True)
            return 0
        if finished + running >= target:
            if not waiting:
                print(f"waiting for {running} running trial(s) of other workers", flush=True)
            waiting = True
            time.sleep(POLL_S)
            continue
        waiting = False
        number = _run_one(study, objective)
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        if trial.user_attrs.get("fail_reason", "").startswith("surplus"):
            continue
        report(study, number)
        failures = failures + 1 if trial.state == TrialState.FAIL else 0
        if trial.user_attrs.get("fail_reason", "").startswith("preempted"):
            print("stopped: the worker was asked to stop; run the same command to continue", flush=True)
            return 1
        if failures >= max(target, MAX_FAILURES):
            print(f"stopped: {failures} trials in a row failed (see fail_reason in trials.csv)", flush=True)
            return 1


def _run_one(study: optuna.Study, objective: Callable[[optuna.Trial], float]) -> int:
    """Runs one trial through ``study.optimize`` (which also lets the grid sampler stop); its number."""
    numbers = []
    study.optimize(
        objective,
        n_trials=1,
        catch=(TrialFailed,),
        callbacks=[lambda _study, frozen: numbers.append(frozen.number)],
        gc_after_trial=True,
    )
    return numbers[0]
