"""Multi-process training on CPU: 2 processes x 4 fake devices behave as 1 process x 8.

Every multi-process run of the file starts at once, in subprocesses: a two-process run that
stops at step 3, a two-process run that one SIGTERM preempts, and a process whose coordinator
never answers. The one-process runs they are compared with (the uninterrupted reference, the
resumes of the two-process checkpoints) run in this process.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from cli_runs import REPO, child_env, in_this_process

# A constant schedule after 2 warm-up steps: train.steps only says where to stop, so a run stopped
# at step 3 and resumed to 6 must log the uninterrupted 6-step run's losses. Metrics to
# metrics.jsonl only: importing TensorBoard's writer takes 2 s of CPU in each process.
TINY = """
seed: 0
run: {trackers: [jsonl]}
model: {d_model: 64, n_layers: 2, n_heads: 4, d_ff: 128, max_seq_len: 64, compute_dtype: float32}
data: {train_files: data/shakespeare/*.txt, val_files: data/shakespeare/hamlet.txt, tokenizer: byte}
optimizer: {lr: 0.003, warmup_steps: 2, schedule: constant}
train: {steps: 6, batch_size: 16, seq_len: 32, log_every: 1, eval_every: 3, eval_batches: 2, sample_tokens: 0, progress_bar: false}
mesh: {data: 2, fsdp: 2, tensor: 2}
checkpoint: {every: 0}
"""
STOP = 3  # the two-process run's last step; it resumes in one process to TINY's 6
LONG_RUN = ["train.steps=5000", "train.eval_every=0"]  # until the SIGTERM
TIMEOUT_S = 600  # generous: every process of the file shares 2 loaded cores


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now (held open together while they are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _train(config: pathlib.Path, log: pathlib.Path, *overrides: str) -> tuple[subprocess.Popen, pathlib.Path]:
    """One process of a two-process run (4 fake devices; give it run.coordinator and run.process_id),
    its stdout and stderr into ``log``."""
    cmd = [sys.executable, "-m", "train", str(config), "run.num_processes=2", *overrides]
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=child_env(4), stdout=out, stderr=subprocess.STDOUT), log


def _pair(
    config: pathlib.Path, run_dir: pathlib.Path, port: int, *overrides: str
) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    where = [f"run.dir={run_dir}", f"run.coordinator=127.0.0.1:{port}"]
    logs = [run_dir.with_name(f"{run_dir.name}-{i}.log") for i in range(2)]
    return [_train(config, logs[i], *where, *overrides, f"run.process_id={i}") for i in range(2)]


def _losses(run_dir: pathlib.Path) -> list[tuple[int, str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "eval" if "eval_loss" in r else "train", r.get("loss", r.get("eval_loss"))) for r in records]


def _assert_close(got: list[tuple], expected: list[tuple]) -> None:
    assert [r[:2] for r in got] == [r[:2] for r in expected]
    for (_, _, b), (_, _, a) in zip(got, expected):
        assert b == pytest.approx(a, rel=1e-5)


@dataclasses.dataclass
class Runs:
    root: pathlib.Path
    config: pathlib.Path
    unreachable_port: int
    done: dict[str, list[tuple[int, str]]]  # name -> each process's (exit status, output)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Starts every subprocess, preempts one run once it trains, and meanwhile trains the
    one-process reference here."""
    root = tmp_path_factory.mktemp("multihost")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    ports = _free_ports(3)
    unreachable = ["run.process_id=1", f"run.coordinator=127.0.0.1:{ports[2]}", "run.coordinator_timeout_s=2"]
    procs = {
        "two": _pair(config, root / "two", ports[0], f"train.steps={STOP}", "train.sample_tokens=8"),
        "preempted": _pair(config, root / "preempted", ports[1], *LONG_RUN),
        "unreachable": [_train(config, root / "unreachable.log", f"run.dir={root / 'unreachable'}", *unreachable)],
    }
    every = [p for group in procs.values() for p, _ in group]
    try:
        metrics = root / "preempted" / "metrics.jsonl"
        deadline = time.monotonic() + TIMEOUT_S
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # training has started
            alive = all(p.poll() is None for p, _ in procs["preempted"])
            assert time.monotonic() < deadline and alive, "the run to preempt did not start"
            time.sleep(0.2)
        procs["preempted"][1][0].send_signal(signal.SIGTERM)  # one host is preempted; the other must stop too
        reference = in_this_process([str(config), f"run.dir={root / 'one'}"])
        assert reference.rc == 0, reference.err[-3000:]
        done = {
            name: [(p.wait(timeout=TIMEOUT_S), log.read_text()) for p, log in group] for name, group in procs.items()
        }
    finally:
        for p in every:
            if p.poll() is None:
                p.kill()
                p.wait()
    return Runs(root, config, ports[2], done)


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    for status, out in runs.done["two"]:
        assert status == 0, out[-3000:]
    (_, out0), (_, out1) = runs.done["two"]
    assert "sample:" in out0 and "sample:" not in out1  # process 0 prints it
    one, two = _losses(runs.root / "one"), _losses(runs.root / "two")
    assert len([r for r in two if r[1] == "train"]) == STOP
    _assert_close(two, [r for r in one if r[0] <= STOP])


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs):
    assert [status for status, _ in runs.done["two"]] == [0, 0]
    two = runs.root / "two"
    resumed = in_this_process([str(runs.config), f"run.dir={two}"])
    assert resumed.rc == 0, resumed.err[-3000:]
    assert f"resumed from {two / 'checkpoints' / str(STOP)}" in resumed.out
    tail_one = [r for r in _losses(runs.root / "one") if r[0] > STOP]
    tail_two = [r for r in _losses(two) if r[0] > STOP]
    assert len(tail_one) == 4  # steps 4..6 and the eval at 6
    _assert_close(tail_two, tail_one)


@pytest.mark.slow
def test_unreachable_coordinator_fails_fast_with_the_address(runs):
    [(status, out)] = runs.done["unreachable"]
    assert status == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{runs.unreachable_port}" in errors[0], out[-3000:]
    assert not (runs.root / "unreachable").exists()


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step_with_a_checkpoint(runs):
    outputs = [out for _, out in runs.done["preempted"]]
    assert [status for status, _ in runs.done["preempted"]] == [0, 0], outputs[1][-3000:]
    saved = [re.search(r"preempted: saved checkpoint at step (\d+)", out) for out in outputs]
    assert all(saved), outputs[0][-3000:]
    step = int(saved[0][1])
    assert int(saved[1][1]) == step < 5000
    run_dir = runs.root / "preempted"
    assert (run_dir / "checkpoints" / str(step)).is_dir()
    resumed = in_this_process([str(runs.config), f"run.dir={run_dir}", f"train.steps={step + 1}"])
    assert resumed.rc == 0, resumed.err[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / str(step)}" in resumed.out
    assert [r["step"] for r in resumed.metrics if "loss" in r][-1] == step + 1
