"""Multi-process training on CPU: 2 processes x 4 fake devices behave as 1 process x 8."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from cli_runs import REPO, child_env

TINY = """
seed: 0
model: {d_model: 64, n_layers: 2, n_heads: 4, d_ff: 128, max_seq_len: 64, compute_dtype: float32}
data: {train_files: data/shakespeare/*.txt, val_files: data/shakespeare/hamlet.txt, tokenizer: byte}
optimizer: {lr: 0.003, warmup_steps: 5}
train: {steps: 8, batch_size: 16, seq_len: 32, log_every: 1, eval_every: 4, eval_batches: 2, sample_tokens: 8, progress_bar: false}
mesh: {data: 2, fsdp: 2, tensor: 2}
checkpoint: {every: 4}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(config: pathlib.Path, *overrides: str, devices: int = 8, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "train", str(config), *overrides]
    return subprocess.Popen(
        cmd, cwd=REPO, env=child_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def _losses(run_dir: pathlib.Path) -> list[tuple[int, str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "eval" if "eval_loss" in r else "train", r.get("loss", r.get("eval_loss"))) for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    port = _free_port()
    procs = [_train(config, f"run.dir={root / 'one'}")]
    procs += [
        _train(
            config,
            f"run.dir={root / 'two'}",
            f"run.coordinator=127.0.0.1:{port}",
            "run.num_processes=2",
            f"run.process_id={i}",
            devices=4,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return root, config


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    root, _ = runs
    one, two = _losses(root / "one"), _losses(root / "two")
    assert [r[:2] for r in one] == [r[:2] for r in two]
    assert len([r for r in one if r[1] == "train"]) == 8
    for (_, _, a), (_, _, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs):
    root, config = runs
    for name in ("one", "two"):
        p = _train(config, f"run.dir={root / name}", "train.steps=12")
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
        assert "resumed from" in out
    one, two = _losses(root / "one"), _losses(root / "two")
    tail_one = [r for r in one if r[0] > 8]
    tail_two = [r for r in two if r[0] > 8]
    assert len(tail_one) == 5  # steps 9..12 and the final eval
    for (_, _, a), (_, _, b) in zip(tail_one, tail_two):
        assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
def test_unreachable_coordinator_fails_fast_with_the_address(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    port = _free_port()
    p = _train(
        config,
        f"run.dir={tmp_path / 'run'}",
        f"run.coordinator=127.0.0.1:{port}",
        "run.num_processes=2",
        "run.process_id=1",
        "run.coordinator_timeout_s=2",
        devices=4,
    )
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step_with_a_checkpoint(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    run_dir, port = tmp_path / "run", _free_port()
    long_run = ["train.steps=5000", "train.eval_every=0", "train.sample_tokens=0", "checkpoint.every=0"]
    procs = [
        _train(
            config,
            f"run.dir={run_dir}",
            *long_run,
            f"run.coordinator=127.0.0.1:{port}",
            "run.num_processes=2",
            f"run.process_id={i}",
            devices=4,
        )
        for i in range(2)
    ]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # training has started
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run did not start"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # one host is preempted; the other must stop at the same step
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][-3000:]
    saved = [re.search(r"preempted: saved checkpoint at step (\d+)", out) for out in outputs]
    assert all(saved), outputs[0][-3000:]
    step = int(saved[0][1])
    assert int(saved[1][1]) == step < 5000
    assert (run_dir / "checkpoints" / str(step)).is_dir()
    resumed = _train(config, f"run.dir={run_dir}", f"train.steps={step + 1}", "train.sample_tokens=0")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and f"resumed from {run_dir / 'checkpoints' / str(step)}" in out, out[-3000:]
