"""Early stopping and the best checkpoint: the decision on recorded eval sequences, the config's
refusals, the checkpoint policy that keeps the best step, and real tiny runs.

The runs are a tiny GPT-2 at a learning rate (0.03, constant) high enough that its held-out loss
rises after the second step, so early stopping has something to stop. Its validation file is
exactly one eval batch, so ``python -m train.evaluate --best`` on it must give the trainer's eval
loss at the best step. All runs share this process (and compiled programs).
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_runs import REPO, in_this_process
from flax import nnx

from train import evaluate, export
from train.__main__ import main as train_main
from train.checkpoints import sources
from train.checkpoints.best import Best
from train.checkpoints.store import CheckpointError, Checkpoints, best_params, restore_target
from train.config.sections import CheckpointConfig, ConfigError, load_config

PLAYS = REPO / "data" / "shakespeare"
SEQ, BATCH = 32, 16


# --- the decision --------------------------------------------------------------------------


def feed(best: Best, values: list[float], patience: int) -> tuple[int | None, str | None]:
    """(step, reason) of the eval that stops the run; evals are at steps 10, 20, ..."""
    for i, value in enumerate(values):
        best.update({"step": 10 * (i + 1), best.metric: value})
        reason = best.stop_reason(patience)
        if reason:
            return 10 * (i + 1), reason
    return None, None


def test_min_mode_counts_evals_that_do_not_beat_the_best_by_min_delta():
    losses = [1.0, 0.9, 0.895, 0.91, 0.85, 0.849, 0.8495, 0.86, 0.7]  # 0.895, 0.849: better, but by < 0.01
    step, reason = feed(Best("eval_loss", "min", min_delta=0.01), losses, patience=3)
    assert step == 80
    assert reason == "early stopping: eval_loss did not improve by 0.01 for 3 evals (best 0.85 at step 50)"
    assert feed(Best("eval_loss", "min"), losses, patience=3) == (None, None)  # min_delta 0: 0.849 is better


def test_max_mode_never_takes_nan_and_an_equal_value_is_no_improvement():
    best = Best("eval_macro_f1", "max")
    step, reason = feed(best, [math.nan, 0.5, 0.6, 0.6, 0.55], patience=2)
    assert (step, best.value, best.step) == (50, 0.6, 30)
    assert reason == "early stopping: eval_macro_f1 did not improve for 2 evals (best 0.6 at step 30)"
    assert feed(Best("eval_loss", "min"), [math.nan, math.nan], patience=2)[1] == (
        "early stopping: eval_loss did not improve for 2 evals (no finite eval_loss)"
    )


def test_the_record_round_trips_through_json_and_carries_on():
    best = Best("eval_loss", "min", 0.001)
    feed(best, [3.0, 2.0, 2.5], patience=5)
    again = Best.from_dict(best.to_dict())
    assert again == best and feed(again, [2.2, 2.1], patience=3)[0] == 20  # third eval in a row without 2.0 beaten


# --- the config --------------------------------------------------------------------------------

GPT2, BERT = "configs/tiny-gpt2.yaml", "configs/tiny-bert.yaml"
CLASSIFIER = ["model.head=classification", "train.objective=classification", "data.format=jsonl",
              "model.num_labels=3", "train.eval_every=5"]  # fmt: skip
ES = "train.early_stopping"
CAUSAL = "train.objective=causal_lm; use one of eval_loss, eval_bpb"
CLASSIFY, F1S = "is never reported by train.objective=classification", "eval_loss, eval_accuracy, eval_macro_f1"


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (GPT2, [f"{ES}.metric=eval_macro_f1"], f"{ES}.metric='eval_macro_f1' is never reported by {CAUSAL}"),
        (BERT, [*CLASSIFIER, f"{ES}.metric=eval_f1"], f"{CLASSIFY}; use one of {F1S} (did you mean 'eval_macro_f1'?)"),
        (GPT2, [f"{ES}.metric=eval_loss", f"{ES}.mode=max"], f"{ES}.mode=max would look for the worst eval_loss; use min"),
        (GPT2, [f"{ES}.metric=eval_loss", "train.eval_every=0"], "train.early_stopping needs periodic evals"),
        (GPT2, [f"{ES}.metric=eval_loss", f"{ES}.patience=0"], "patience must be >= 1"),
        (GPT2, ["checkpoint.keep_best=true"], "checkpoint.keep_best needs a metric"),
        (GPT2, ["checkpoint.best_metric=eval_bpb"], "checkpoint.keep_best is false"),
        (BERT, [*CLASSIFIER, "checkpoint.keep_best=true", "checkpoint.best_metric=eval_bpb"],
         f"checkpoint.best_metric='eval_bpb' {CLASSIFY}"),
        (GPT2, [f"{ES}.metric=eval_loss", "checkpoint.keep_best=true", "checkpoint.best_metric=eval_bpb"],
         "the best checkpoint is the early-stopping one"),
    ],
)  # fmt: skip
def test_a_metric_the_objective_never_reports_is_refused_before_anything_is_written(
    config, overrides, message, tmp_path, capsys
):
    assert train_main([str(REPO / config), f"run.dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_natural_mode_needs_no_key():
    config = load_config(REPO / GPT2, [f"{ES}.metric=eval_bpb", "checkpoint.keep_best=true"])
    assert (config.train.early_stopping.mode, config.checkpoint.keep_best) == ("", True)


# --- the checkpoint policy -----------------------------------------------------------------------

MODEL = {"family": "decoder"}


def params(step: int) -> dict:
    """Parameters whose every value depends on ``step``."""
    rng = np.random.default_rng(step)
    return {"params": {"w": jnp.asarray(rng.standard_normal((64, 64), np.float32)), "b": jnp.arange(8.0) + step}}


def target(_config: dict) -> dict:
    return restore_target(params(0)["params"], jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def save_steps(directory: pathlib.Path, best_at: dict[int, int], keep_best: bool = True) -> None:
    """Steps 1..5 with ``keep=1``; ``best_at[step]`` is the best step known when ``step`` is saved."""
    config = {"model": MODEL, "checkpoint": {"keep_best": keep_best}}
    checkpoints = Checkpoints(directory, CheckpointConfig(keep=1, keep_best=keep_best, async_save=False))
    for step in range(1, 6):
        checkpoints.best = Best("eval_loss", "min", value=1.0 / best_at[step], step=best_at[step]).to_dict()
        checkpoints.save(step, params(step), {}, config)
    checkpoints.close()


def test_the_best_step_is_kept_besides_the_newest_and_read_back_with_its_integrity_checked(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, {1: 1, 2: 2, 3: 2, 4: 2, 5: 2})
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [2, 5]
    step, restored, _ = best_params(directory, target)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(params(2)["params"]["w"]))
    (directory / "5" / "best" / "metadata").write_text('{"metric": "eval_loss", "mode": "min", "step": 5}')
    step, restored, _ = best_params(directory, target)  # step 5's record is damaged: step 5 is skipped
    assert step == 2


def test_a_damaged_best_step_is_an_error_and_never_another_step(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, {1: 1, 2: 2, 3: 3, 4: 3, 5: 3})
    array = max((p for p in (directory / "3" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    array.write_bytes(array.read_bytes()[: array.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"the best checkpoint of .*, .*/3, is damaged \(.*leave out --best"):
        best_params(directory, target)


def test_a_run_without_keep_best_has_no_best_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory, {s: 1 for s in range(1, 6)}, keep_best=False)
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [5]
    with pytest.raises(ConfigError, match="was trained without checkpoint.keep_best, so it has no best checkpoint"):
        best_params(directory, target)


# --- real runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("early")
    val = root / "val.txt"
    val.write_bytes((PLAYS / "hamlet.txt").read_bytes()[: SEQ * BATCH])  # one eval batch of windows
    base = [
        "configs/tiny-gpt2.yaml", f"data.val_files={val}", f"train.seq_len={SEQ}", f"train.batch_size={BATCH}",
        "train.eval_every=2", "train.eval_batches=1", "train.log_every=1", "train.sample_tokens=0",
        "optimizer.lr=0.03", "optimizer.schedule=constant", "optimizer.warmup_steps=0",
        "checkpoint.every=4", "checkpoint.keep=1",
    ]  # fmt: skip
    early = [*base, f"{ES}.metric=eval_loss", f"{ES}.patience=2", "checkpoint.keep_best=true"]
    out = {"val": val, "root": root}
    out["full"] = in_this_process([*early, f"run.dir={root / 'full'}", "train.steps=20"])
    out["split-1"] = in_this_process([*early, f"run.dir={root / 'split'}", "train.steps=4"])
    out["split-2"] = in_this_process([*early, f"run.dir={root / 'split'}", "train.steps=20"])
    best_only = ["checkpoint.keep_best=true", "checkpoint.best_metric=eval_bpb", "train.steps=6", "checkpoint.every=2"]
    out["best-only"] = in_this_process([*base, f"run.dir={root / 'best-only'}", *best_only])
    return out


def evals(run) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in run.metrics if "eval_loss" in r}


def expected_stop(losses: dict[int, float], patience: int) -> tuple[int, int]:
    """(stop step, best step) of mode min, min_delta 0, over the steps in order."""
    best_step, since = None, 0
    for step, loss in losses.items():
        if best_step is None or loss < losses[best_step]:
            best_step, since = step, 0
        else:
            since += 1
        if since == patience:
            return step, best_step
    raise AssertionError(f"no stop in {losses}")


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_early_stopping_stops_at_the_first_eval_after_patience_without_improvement(runs):
    run = runs["full"]
    assert run.rc == 0, run.err[-3000:]
    losses = evals(run)
    stop, best = expected_stop(losses, patience=2)
    assert max(losses) == stop < 20 and max(r["step"] for r in run.metrics) == stop  # no step after the stop
    reason = f"early stopping: eval_loss did not improve for 2 evals (best {losses[best]:.4g} at step {best})"
    assert f"stopped at step {stop}: {reason}\n" in run.out
    assert "final:" not in run.out  # the stopping eval was the last
    assert checkpoint_steps(run.dir) == sorted({best, stop})  # keep=1 newest, and the best


@pytest.mark.slow
def test_evaluate_best_scores_the_checkpoint_of_the_best_eval(runs, capsys):
    run = runs["full"]
    _, best = expected_stop(evals(run), patience=2)
    assert evaluate.main([str(run.dir), "--best", "--files", str(runs["val"])]) == 0
    result = read_last_json(capsys.readouterr().out)
    assert result["step"] == best
    assert result["eval_loss"] == pytest.approx(evals(run)[best], abs=1e-5)
    assert evaluate.main([str(run.dir), "--files", str(runs["val"])]) == 0  # the newest step scores otherwise
    newest = read_last_json(capsys.readouterr().out)
    assert "step" not in newest and newest["eval_loss"] == pytest.approx(evals(run)[max(evals(run))], abs=1e-5)


def read_last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_export_best_writes_the_best_steps_parameters(runs, tmp_path, capsys):
    run = runs["full"]
    _, best = expected_stop(evals(run), patience=2)
    assert export.main([str(run.dir), str(tmp_path / "out"), "--best"]) == 0
    assert f"exported best checkpoint, step {best} of {run.dir}" in capsys.readouterr().out
    _, exported = sources.load_export(tmp_path / "out")
    saved = saved_state(run.dir, best)
    pure = nnx.to_pure_dict(exported)
    assert len(jax.tree.leaves(pure)) == len([path for path in saved if path.startswith("['params']")])
    for path, value in jax.tree_util.tree_leaves_with_path(pure):
        np.testing.assert_array_equal(np.asarray(value), saved[f"['params']{jax.tree_util.keystr(path)}['value']"])


def saved_state(run_dir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's train state, by path, as numpy."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        directory = run_dir / "checkpoints" / str(step) / "state"
        tree = checkpointer.metadata(directory).item_metadata.tree
        restored = checkpointer.restore(
            directory, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        )
    return {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_leaves_with_path(restored)}


@pytest.mark.slow
def test_a_resumed_run_carries_the_early_stopping_state_and_stops_at_the_same_eval(runs):
    full, first, resumed = runs["full"], runs["split-1"], runs["split-2"]
    assert first.rc == 0 and resumed.rc == 0, resumed.err[-3000:]
    assert "resumed from" in resumed.out and max(evals(first)) == 4
    assert evals(resumed) == evals(full)  # the same evals, bit for bit, and no more
    assert resumed.out.splitlines()[-1] == full.out.splitlines()[-1]  # "stopped at step N: early stopping: ..."
    assert checkpoint_steps(resumed.dir) == checkpoint_steps(full.dir)
    last = checkpoint_steps(full.dir)[-1]
    records = [Checkpoints(r.dir / "checkpoints", CheckpointConfig(), read_only=True) for r in (full, resumed)]
    assert records[0].read_best(last) == records[1].read_best(last)
    for c in records:
        c.close()


@pytest.mark.slow
def test_keep_best_alone_ranks_steps_by_its_own_metric_and_never_stops(runs, tmp_path, capsys):
    run = runs["best-only"]
    assert run.rc == 0 and "stopped" not in run.out and max(r["step"] for r in run.metrics) == 6
    bpb = {r["step"]: r["eval_bpb"] for r in run.metrics if "eval_bpb" in r}
    best = min(bpb, key=bpb.get)
    assert best == 6  # the final eval, at a step checkpoint.every=2 falls on too: its checkpoint names itself best
    assert checkpoint_steps(run.dir) == [6]
    assert evaluate.main([str(run.dir), "--best", "--files", str(runs["val"])]) == 0
    result = read_last_json(capsys.readouterr().out)
    assert result["step"] == best and result["eval_bpb"] == pytest.approx(bpb[best], rel=1e-5)
