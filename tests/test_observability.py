"""Profiler traces (train.profile) of a short tiny-GPT-2 run on the 8 fake devices."""

from __future__ import annotations

import pytest
from cli_runs import in_this_process
from test_resume import FAST

from train.config.sections import ConfigError, load_config

RUN = ["configs/tiny-gpt2.yaml", *FAST, "train.steps=3", "checkpoint.every=0"]


@pytest.mark.slow
def test_profile_writes_a_trace_of_the_chosen_steps_and_says_where(tmp_path):
    run = in_this_process([*RUN, f"run.dir={tmp_path}", "train.profile.start_step=1", "train.profile.steps=1"])
    assert run.rc == 0, run.err
    lines = [line for line in run.out.splitlines() if line.startswith("profile:")]
    assert lines == [
        f"profile: steps 2-2 traced to {tmp_path / 'profile'} (tensorboard --logdir {tmp_path / 'profile'}, or xprof)"
    ]
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000, traces


def test_a_profile_past_the_last_step_is_refused():
    with pytest.raises(ConfigError, match=r"train.profile traces steps 3-4, past train.steps=3; lower"):
        load_config("configs/tiny-gpt2.yaml", ["train.steps=3", "train.profile.start_step=2", "train.profile.steps=2"])


# --- trackers ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_and_mlflow_get_the_scalars_config_and_artifacts_and_a_resume_continues_their_runs(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = [*RUN, f"run.dir={tmp_path}", "run.trackers=[jsonl,wandb,mlflow]"]
    first = in_this_process([*argv, "train.steps=2"])
    wandb_id, mlflow_id = (tmp_path / "wandb_id").read_text(), (tmp_path / "mlflow_run_id").read_text()
    second = in_this_process(argv)
    assert (first.rc, second.rc) == (0, 0), first.err + second.err
    assert not [line for line in (first.err + second.err).splitlines() if line.startswith("warning: tracker")]
    assert not (tmp_path / "tensorboard").exists()
    # W&B: one offline run directory per attempt, both of the same run
    assert (tmp_path / "wandb_id").read_text() == wandb_id
    offline = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(wandb_id.strip()) for name in offline), offline

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (tmp_path / "mlflow_run_id").read_text() == mlflow_id
    run = client.get_run(mlflow_id.strip())
    assert run.data.params["train.steps"] == "2" and run.data.params["model.d_model"] == "64"
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert losses == pytest.approx(second.losses())  # steps 1, 2 from the first attempt and 3 from the resume
    assert sorted(losses) == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"loss.png", "evals.json"}
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_failing_tracker_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    run = in_this_process([*RUN, f"run.dir={tmp_path}", "run.trackers=[jsonl,mlflow]"])
    assert run.rc == 0, run.err
    warnings = [line for line in run.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: tracker mlflow failed ("), warnings
    assert warnings[0].endswith("; the run goes on without it")
    assert sorted(run.losses()) == [1, 2, 3]


def test_an_unknown_tracker_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"run.trackers\[1\]='wandbb' is not one of .*did you mean 'wandb'"):
        load_config("configs/tiny-gpt2.yaml", ["run.trackers=[jsonl,wandbb]"])
