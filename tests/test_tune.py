"""python -m train.tune: search-file checks, a real study on the tiny GPT with pruned and failed
trials, resume after SIGKILL, two workers on one study, and a runnable best.yaml."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import pathlib
import signal
import subprocess
import sys
import time

import optuna
import pytest

from train.config import load_config
from train.tune.__main__ import main
from train.tune.search import EVAL_METRICS, load_search

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny-gpt2.yaml")
# 20 steps, an eval every 5: a pruned trial stops at step 5 or 10
FAST = ["train.steps=20", "train.eval_every=5", "train.eval_batches=2", "train.sample_tokens=0"]


def search_file(tmp_path: pathlib.Path, study: str, space: str, name: str = "search.yaml") -> str:
    path = tmp_path / name
    path.write_text(f"study:\n{study}\nspace:\n{space}\n")
    return str(path)


def tune(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def rows(study_dir: pathlib.Path) -> list[dict]:
    with open(study_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def storage_study(study_dir: pathlib.Path, storage: str = "") -> optuna.Study:
    url = storage or f"sqlite:///{study_dir.resolve() / 'study.db'}"
    if url.startswith("journal:"):
        url = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url.removeprefix("journal:")))
    return optuna.load_study(study_name=study_dir.name, storage=url)


GOOD_STUDY = "  dir: {dir}\n  metric: eval_bpb\n  trials: 2"
GOOD_SPACE = "  optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}"


@pytest.mark.parametrize(
    "study, space, message",
    [
        (GOOD_STUDY, "  optimizer.lrr: {type: float, low: 1.0e-4, high: 1.0e-2}",
         "space.optimizer.lrr: unknown config key 'optimizer.lrr' (did you mean 'lr'?)"),
        (GOOD_STUDY, "  optimizer.lr: {type: float, low: 1.0e-2, high: 1.0e-4}",
         "space.optimizer.lr: low=0.01 must be below high=0.0001"),
        (GOOD_STUDY, "  optimizer.lr: {type: float, low: 0.0, high: 1.0e-2, log: true}",
         "space.optimizer.lr: log=true needs low > 0, got low=0.0"),
        (GOOD_STUDY, "  optimizer.warmup_steps: {type: float, low: 0.5, high: 3.5}",
         "space.optimizer.warmup_steps: optimizer.warmup_steps must be an integer, got 0.5"),
        (GOOD_STUDY, "  train.batch_size: {type: categorical, choices: []}",
         "space.train.batch_size.choices must be a non-empty list of values"),
        (GOOD_STUDY, "  optimizer.schedule: {type: categorical, choices: [cosine, cosin]}",
         "space.optimizer.schedule: optimizer.schedule='cosin' is not one of"),
        (GOOD_STUDY, "  optimizer.lr: {type: uniform, low: 0.0, high: 1.0}",
         "space.optimizer.lr.type='uniform' is not one of float, int, categorical"),
        (GOOD_STUDY, "  run.seed: {type: int, low: 0, high: 3}", "space.run.seed: run.* keys belong to each trial"),
        (GOOD_STUDY.replace("eval_bpb", "eval_accuracy"), GOOD_SPACE,
         "study.metric='eval_accuracy' is never reported by train.objective=causal_lm; use one of eval_loss, eval_bpb"),
        (GOOD_STUDY + "\n  sampler: tpee", GOOD_SPACE,
         "study.sampler='tpee' is not one of tpe, random, grid, cmaes (did you mean 'tpe'?)"),
        (GOOD_STUDY + "\n  pruner: medain", GOOD_SPACE,
         "study.pruner='medain' is not one of median, hyperband, none (did you mean 'median'?)"),
        (GOOD_STUDY + "\n  direction: maximize", GOOD_SPACE,
         "study.direction=maximize would look for the worst eval_bpb; use direction: minimize"),
        (GOOD_STUDY + "\n  trails: 3", GOOD_SPACE, "unknown key 'study.trails' (did you mean 'trials'?)"),
        (GOOD_STUDY + "\n  sampler: grid", GOOD_SPACE,
         "sampler grid needs a finite set: give space.optimizer.lr a step or make it categorical"),
        (GOOD_STUDY + "\n  pruner_options: {n_startup: 1}", GOOD_SPACE,
         "study.pruner_options do not fit the median pruner"),
    ],
)  # fmt: skip
def test_search_file_mistakes_exit_2_naming_the_key_before_any_trial(tmp_path, study, space, message):
    study_dir = tmp_path / "study"
    status, out, err = tune([TINY, search_file(tmp_path, study.replace("{dir}", str(study_dir)), space)])
    assert status == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not list(study_dir.glob("trial-*"))


def test_shipped_search_files_check_against_their_configs():
    for config, search, metric in [
        ("default.yaml", "default-lr.yaml", "eval_bpb"),
        ("genre-bert.yaml", "genre-tpe.yaml", "eval_accuracy"),
    ]:
        tree = load_config(REPO / "configs" / config).to_dict()
        found = load_search(str(REPO / "configs" / "search" / search), tree)
        assert found.study.metric == metric and found.study.trials == 20
    assert EVAL_METRICS["classification"] == ("eval_loss", "eval_accuracy", "eval_macro_f1")
