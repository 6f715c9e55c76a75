"""python -m train.tune: search-file checks, a real study on the tiny GPT with pruned and failed
trials, resume after SIGKILL, two workers on one study, and a runnable best.yaml."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import optuna
import pytest
from cli_runs import REPO

from train.__main__ import main as train_main
from train.config.sections import load_config
from train.tune.__main__ import main
from train.tune.search import EVAL_METRICS, load_search

TINY = str(REPO / "configs" / "tiny-gpt2.yaml")
# 4 steps, an eval every 2: a pruned trial stops at step 2. Metrics to metrics.jsonl only:
# importing TensorBoard's writer takes 2 s of CPU in each worker process.
STEPS = 4
FAST = [
    f"train.steps={STEPS}",
    "train.eval_every=2",
    "train.log_every=2",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "run.trackers=[jsonl]",
]


def search_file(tmp_path: pathlib.Path, study: str, space: str, name: str = "search.yaml") -> str:
    path = tmp_path / name
    path.write_text(f"study:\n{study}\nspace:\n{space}\n")
    return str(path)


def tune(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def records(run_dir: pathlib.Path, key: str) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` that hold ``key`` (loss: train, eval_loss: eval)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def rows(study_dir: pathlib.Path) -> list[dict]:
    with open(study_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


def storage_study(study_dir: pathlib.Path, storage: str = "") -> optuna.Study:
    url = storage or f"sqlite:///{study_dir.resolve() / 'study.db'}"
    if url.startswith("journal:"):
        url = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url.removeprefix("journal:")))
    return optuna.load_study(study_name=study_dir.name, storage=url)


def queue(study_dir: pathlib.Path, *params: dict) -> None:
    """Queues trials with ``params`` in the study's storage first (Optuna runs them before sampling)."""
    study_dir.mkdir()
    queued = optuna.create_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}")
    for p in params:
        queued.enqueue_trial(p)


GOOD_STUDY = "  dir: {dir}\n  metric: eval_bpb\n  trials: 2"
GOOD_SPACE = "  optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}"


@pytest.mark.slow
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
    status, _out, err = tune([TINY, search_file(tmp_path, study.replace("{dir}", str(study_dir)), space)])
    assert status == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not list(study_dir.glob("trial-*"))


@pytest.mark.slow
def test_missing_search_file_is_named():
    status, _out, err = tune([TINY, "configs/search/nope.yaml"])
    assert status == 2 and err.startswith("error: search file 'configs/search/nope.yaml' does not exist")


@pytest.mark.slow
def test_search_file_errors_say_search_file_and_binary_ones_exit_2(tmp_path):
    binary, listing = tmp_path / "binary.bin", tmp_path / "list.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    listing.write_text("- a\n")
    problems = {binary: "is not UTF-8 text; pass a YAML file", listing: "must hold a mapping of sections"}
    for path, problem in problems.items():
        status, _out, err = tune([TINY, str(path)])
        assert status == 2 and err == f"error: search file '{path}' {problem}\n"


def test_shipped_search_files_check_against_their_configs():
    for config, search, metric in [
        ("default.yaml", "configs/search/default-lr.yaml", "eval_bpb"),
        ("genre-bert.yaml", "configs/search/genre-tpe.yaml", "eval_accuracy"),
        ("default.yaml", "benchmarks/tune-default-lr.yaml", "eval_bpb"),  # the measured study
    ]:
        tree = load_config(REPO / "configs" / config).to_dict()
        found = load_search(str(REPO / search), tree)
        assert found.study.metric == metric and found.study.trials == 20
    assert EVAL_METRICS["classification"] == ("eval_loss", "eval_accuracy", "eval_macro_f1")


@pytest.mark.slow
def test_study_prunes_bad_trials_fails_invalid_ones_and_best_yaml_reruns_the_best(tmp_path):
    """lr 1e-6 is hopeless next to 1e-2: after one complete trial the median pruner stops it at its
    first eval. Batch 12 does not divide over 8 devices: that trial fails with the reason. The three
    trials are queued in the study's storage first (Optuna runs queued params before sampling)."""
    study_dir = tmp_path / "study"
    study = (
        f"  dir: {study_dir}\n  metric: eval_bpb\n  trials: 2\n  sampler: random\n"
        "  pruner: median\n  pruner_options: {n_startup_trials: 1, n_warmup_steps: 0}"
    )
    space = (
        "  optimizer.lr: {type: categorical, choices: [0.01, 1.0e-6]}\n"
        "  train.batch_size: {type: categorical, choices: [16, 12]}"
    )
    queue(
        study_dir,
        *({"optimizer.lr": lr, "train.batch_size": batch} for lr, batch in [(0.01, 16), (1e-6, 12), (1e-6, 16)]),
    )
    status, out, err = tune([TINY, search_file(tmp_path, study, space), *FAST])
    assert status == 0, err[-3000:]
    good, invalid, bad = rows(study_dir)
    assert [good["state"], invalid["state"], bad["state"]] == ["COMPLETE", "FAIL", "PRUNED"]
    assert (good["optimizer.lr"], good["train.batch_size"], good["steps"]) == ("0.01", "16", "4")
    assert invalid["fail_reason"].startswith(
        "invalid config: train.batch_size=12 is not divisible by the data-parallel"
    )
    assert not (study_dir / "trial-0001").exists()
    assert (bad["optimizer.lr"], bad["steps"]) == ("1e-06", "2")  # stopped at its first eval, cleanly:
    evals = records(study_dir / "trial-0002", "eval_loss")
    assert [e["step"] for e in evals] == [2] and f"{evals[0]['eval_bpb']:.6g}" == bad["eval_bpb"]
    assert (study_dir / "trial-0002" / "checkpoints" / "2").is_dir()
    good_evals = records(study_dir / "trial-0000", "eval_loss")
    assert float(bad["eval_bpb"]) > good_evals[0]["eval_bpb"]
    assert set(good_evals[0]) == {"step", *EVAL_METRICS["causal_lm"]}  # what the metric check knows
    assert "trial 2 PRUNED optimizer.lr=1e-06 train.batch_size=16 eval_bpb" in out
    assert "2 finished trials (1 pruned) ran 6 of 8 steps: pruning saved 25%" in out
    for name in ("history.png", "intermediate.png", "slice-optimizer.lr.png", "slice-train.batch_size.png"):
        assert (study_dir / name).stat().st_size > 1000, name
    assert "note: skipped importances.png" in out  # one complete trial is too few

    best = load_config(study_dir / "best.yaml")  # the full config, training into its own run.dir
    assert best.run.dir == str(study_dir / "best") and best.optimizer.lr == 0.01 and best.train.batch_size == 16
    assert best.train.steps == STEPS and best.train.eval_every == 2  # the command line's overrides too
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main([str(study_dir / "best.yaml")]) == 0
    rerun = records(study_dir / "best", "eval_loss")[-1]
    assert f"{rerun['eval_bpb']:.6g}" == good["eval_bpb"]  # the same run, bitwise on CPU


def tune_process(argv: list[str], log: pathlib.Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "train.tune", *argv], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def wait_for(predicate, proc: subprocess.Popen, log: pathlib.Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the worker ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.mark.slow
def test_same_command_after_sigkill_finishes_the_study_without_repeating_trials(tmp_path):
    """Trial 1 is queued with 5000 steps: the worker is surely training it when it is killed."""
    study_dir = tmp_path / "study"
    study = f"  dir: {study_dir}\n  metric: eval_bpb\n  trials: 2\n  sampler: random\n  seed: 0\n  pruner: none"
    space = f"{GOOD_SPACE}\n  train.steps: {{type: categorical, choices: [{STEPS}, 5000]}}"
    queue(
        study_dir,
        *({"optimizer.lr": lr, "train.steps": steps} for lr, steps in [(0.01, STEPS), (0.01, 5000), (0.003, STEPS)]),
    )
    argv = [TINY, search_file(tmp_path, study, space), *FAST]
    log = tmp_path / "killed.log"
    proc = tune_process(argv, log)

    def second_trial_training() -> bool:
        metrics = study_dir / "trial-0001" / "metrics.jsonl"
        return metrics.exists() and metrics.stat().st_size > 0

    wait_for(second_trial_training, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = storage_study(study_dir).get_trials()
    first_metrics = (study_dir / "trial-0000" / "metrics.jsonl").read_text()
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING", "WAITING"]

    status, out, err = tune(argv)
    assert status == 0, err[-3000:]
    assert f"trial 1 marked FAIL: its worker {before[1].user_attrs['worker']} is gone" in out
    after = storage_study(study_dir).get_trials()
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert after[0].value == before[0].value and "trial 0 COMPLETE" not in out  # finished trials do not rerun
    assert (study_dir / "trial-0000" / "metrics.jsonl").read_text() == first_metrics
    assert after[1].user_attrs["fail_reason"].startswith("stale: its worker")


@pytest.mark.slow
def test_two_workers_share_one_study_and_finish_exactly_the_trials(tmp_path):
    """A worker process and this process work on one journal. This one joins once the other has
    started trial 0: joining at once, it could run every trial while the other still imports jax."""
    study_dir = tmp_path / "study"
    journal = tmp_path / "shared" / "journal.log"
    study = f"  dir: {study_dir}\n  metric: eval_bpb\n  trials: 3\n  sampler: random\n  pruner: none\n"
    study += f"  storage: journal:{journal}"
    argv = [TINY, search_file(tmp_path, study, GOOD_SPACE), *FAST]
    log = tmp_path / "worker.log"
    proc = tune_process(argv, log)
    try:
        wait_for((study_dir / "trial-0000").exists, proc, log)
        status, _out, err = tune(argv)
        assert status == 0, err[-3000:]
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    trials = storage_study(study_dir, f"journal:{journal}").get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both worked on the one study
    for t in finished:  # each trial trained once, in its own directory
        steps = [r["step"] for r in records(study_dir / f"trial-{t.number:04d}", "loss")]
        assert steps == [2, STEPS]


@pytest.mark.parametrize(
    "sampler, pruner", [("tpe", "median"), ("random", "hyperband"), ("grid", "none"), ("cmaes", "median")]
)
def test_each_sampler_and_pruner_opens_a_study_and_samples_the_space(tmp_path, sampler, pruner):
    from train.tune.study import open_study

    study = f"  dir: {tmp_path / 'study'}\n  metric: eval_loss\n  trials: 6\n  sampler: {sampler}\n  pruner: {pruner}"
    space = (
        "  optimizer.warmup_steps: {type: int, low: 0, high: 20, step: 10}\n"
        "  optimizer.schedule: {type: categorical, choices: [cosine, linear]}"
    )
    search = load_search(search_file(tmp_path, study, space), load_config(TINY).to_dict())
    opened = open_study(search)
    assert type(opened.sampler).__name__.lower().startswith(sampler)
    assert type(opened.pruner).__name__.lower().startswith({"none": "nop"}.get(pruner, pruner))
    seen = set()

    def objective(trial: optuna.Trial) -> float:
        seen.add(tuple(p.suggest(trial) for p in search.space))
        return 1.0

    opened.optimize(objective, n_trials=6)  # as the worker does: the grid sampler stops the study itself
    assert seen <= {(w, s) for w in (0, 10, 20) for s in ("cosine", "linear")}
    if sampler == "grid":
        assert len(seen) == 6  # every point once
