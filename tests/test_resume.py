"""Exact resume, preemption, resharding and init_from, through the real CLI on 8 fake CPU devices.

The runs are tiny (2 layers, 64 wide, 16 x 32 tokens a step) and start together in one module
fixture: three chains of runs in parallel, each chain in one process where it can be (runs after
the first then cost no imports) and all sharing a compilation cache. Tests then read the
metrics and checkpoints the runs left behind. Losses are compared exactly where the mesh is
the same (CPU is deterministic) and within fp32 tolerance across meshes.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_runs import Run, in_one_process, run_dir
from flax import nnx

from train import export
from train.writers import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent

# A constant schedule (after a 2-step warm-up) makes train.steps only say where to stop, so a
# run stopped with train.steps=k and continued with a larger value is the uninterrupted run.
FAST = [
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=2",
    "train.seq_len=32",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "checkpoint.every=2",
    "checkpoint.keep=3",
]
GPT2 = ["configs/tiny-gpt2.yaml", *FAST, "train.grad_accum=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
LLAMA = ["configs/tiny-llama.yaml", *FAST, "train.grad_accum=4", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]
GPT2_STEPS, LLAMA_STEPS = 8, 30


class Runs:
    """Starts runs under ``root`` (they share the session's compilation cache, tests/conftest.py)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        }

    def args(self, preset: list[str], name: str, steps: int, *extra: str) -> list[str]:
        return [*preset, f"run.dir={self.root / name}", f"train.steps={steps}", *extra]

    def in_one_process(self, *argvs: list[str]) -> list[Run]:
        """Runs each argv with ``train.__main__.main`` in turn, in one fresh process."""
        return in_one_process(list(argvs), self.root, self.env)

    def cli(self, argv: list[str], devices: int = 8) -> Run:
        env = {**self.env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        done = subprocess.run(
            [sys.executable, "-m", "train", *argv],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        return Run(run_dir(argv), done.returncode, done.stdout, done.stderr, read_metrics(run_dir(argv)))

    def cli_terminated(self, argv: list[str], after_steps: int) -> Run:
        """Runs ``python -m train`` and sends SIGTERM once ``after_steps`` losses are logged."""
        directory = run_dir(argv)
        proc = subprocess.Popen(
            [sys.executable, "-m", "train", *argv],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 600
        while len([r for r in read_metrics(directory) if "loss" in r]) < after_steps:
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
        return Run(directory, proc.returncode, out, err, read_metrics(directory))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    r = Runs(tmp_path_factory.mktemp("runs"))

    def gpt2():
        ref, stopped, resumed, other_model, init = r.in_one_process(
            r.args(GPT2, "gpt2-ref", GPT2_STEPS),
            r.args(GPT2, "gpt2-resumed", 3),
            r.args(GPT2, "gpt2-resumed", GPT2_STEPS),
            r.args(GPT2, "gpt2-ref", GPT2_STEPS, "model.n_layers=3", "model.d_ff=128"),
            r.args(GPT2, "gpt2-init", 2, f"checkpoint.init_from={r.root / 'gpt2-ref'}", "checkpoint.every=1"),
        )
        return {
            "gpt2-ref": ref,
            "gpt2-stopped": stopped,
            "gpt2-resumed": resumed,
            "gpt2-other-model": other_model,
            "gpt2-init": init,
        }

    def llama():  # one chain, so that the SIGTERM run finds the compiled step in the cache
        ref, stopped, resumed = r.in_one_process(
            r.args(LLAMA, "llama-ref", LLAMA_STEPS),
            r.args(LLAMA, "llama-resumed", 3),
            r.args(LLAMA, "llama-resumed", LLAMA_STEPS),
        )
        argv = r.args(LLAMA, "llama-sigterm", LLAMA_STEPS)
        terminated = r.cli_terminated(argv, after_steps=3)
        (terminated_resumed,) = r.in_one_process(argv)
        return {
            "llama-ref": ref,
            "llama-stopped": stopped,
            "llama-resumed": resumed,
            "llama-sigterm": terminated,
            "llama-sigterm-resumed": terminated_resumed,
        }

    def meshes():
        data8, fsdp_tensor = r.in_one_process(
            r.args(GPT2, "gpt2-meshes", 3, "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"),
            r.args(GPT2, "gpt2-meshes", 6, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"),
        )
        one = r.cli(r.args(GPT2, "gpt2-meshes", GPT2_STEPS, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"), devices=1)
        return {"meshes-data8": data8, "meshes-fsdp4-tensor2": fsdp_tensor, "meshes-1-device": one}

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        chains = [pool.submit(chain) for chain in (llama, gpt2, meshes)]
        results = {}
        for chain in chains:
            results.update(chain.result())
    return results


def saved_state(run_dir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's train state, by path, as numpy (whatever mesh wrote it)."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        directory = run_dir / "checkpoints" / str(step) / "state"
        tree = checkpointer.metadata(directory).item_metadata.tree
        restored = checkpointer.restore(
            directory, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        )
    return {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_leaves_with_path(restored)}


def assert_ok(*checked: Run) -> None:
    for run in checked:
        assert run.rc == 0, f"{run.dir} exited {run.rc}:\n{run.err[-3000:]}"


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for path, value in a.items():
        np.testing.assert_array_equal(value, b[path], err_msg=path)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_a_run_stopped_at_step_3_and_continued_is_bitwise_the_uninterrupted_run(runs, model):
    ref, stopped, resumed = runs[f"{model}-ref"], runs[f"{model}-stopped"], runs[f"{model}-resumed"]
    assert_ok(ref, stopped, resumed)
    steps = GPT2_STEPS if model == "gpt2" else LLAMA_STEPS
    assert f"resumed from {resumed.dir / 'checkpoints' / '3'}" in resumed.out
    assert list(resumed.losses()) == list(range(1, steps + 1))
    assert resumed.losses() == ref.losses()  # exact float equality, every step
    assert_states_equal(saved_state(resumed.dir, steps), saved_state(ref.dir, steps))


def test_sigterm_finishes_the_step_saves_once_and_the_resumed_run_is_bitwise_uninterrupted(runs):
    ref, stopped, resumed = runs["llama-ref"], runs["llama-sigterm"], runs["llama-sigterm-resumed"]
    assert_ok(ref, stopped, resumed)
    saved_lines = [line for line in stopped.out.splitlines() if line.startswith("preempted:")]
    assert len(saved_lines) == 1, stopped.out
    step = int(re.search(r"at step (\d+) ", saved_lines[0]).group(1))
    assert 3 <= step < LLAMA_STEPS
    assert saved_lines[0] == f"preempted: saved checkpoint at step {step} to {stopped.dir / 'checkpoints' / str(step)}"
    assert "final:" not in stopped.out
    assert max(stopped.losses()) == step  # the step it was in when signalled, then stopped
    assert f"resumed from {stopped.dir / 'checkpoints' / str(step)}" in resumed.out
    assert resumed.losses() == ref.losses()
    assert_states_equal(saved_state(resumed.dir, LLAMA_STEPS), saved_state(ref.dir, LLAMA_STEPS))


def test_continuing_on_other_meshes_matches_the_unresharded_run_within_fp32_tolerance(runs):
    ref = runs["gpt2-ref"]
    legs = runs["meshes-data8"], runs["meshes-fsdp4-tensor2"], runs["meshes-1-device"]
    assert_ok(ref, *legs)
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in legs[0].out
    assert f"resumed from {legs[1].dir / 'checkpoints' / '3'}" in legs[1].out
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in legs[1].out
    assert f"resumed from {legs[2].dir / 'checkpoints' / '6'}" in legs[2].out
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in legs[2].out
    losses, expected = legs[2].losses(), ref.losses()
    assert list(losses) == list(range(1, GPT2_STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=2e-5)
    final, final_ref = saved_state(legs[2].dir, GPT2_STEPS), saved_state(ref.dir, GPT2_STEPS)
    for path in final_ref:
        np.testing.assert_allclose(final[path], final_ref[path], rtol=1e-3, atol=1e-5, err_msg=path)


def test_a_checkpoint_of_another_model_is_refused_naming_the_fields(runs):
    run = runs["gpt2-other-model"]
    assert run.rc == 2
    errors = [line for line in run.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.err
    assert f"checkpoint {run.dir / 'checkpoints' / str(GPT2_STEPS)} holds a different model" in errors[0]
    assert "(n_layers: 2 -> 3; d_ff: 256 -> 128)" in errors[0]
    assert run.metrics == runs["gpt2-ref"].metrics  # the run it refused is untouched


def test_init_from_starts_a_new_run_from_another_runs_parameters(runs):
    source, init = runs["gpt2-ref"], runs["gpt2-init"]
    assert_ok(source, init)
    assert "resumed from" not in init.out
    first = init.metrics[0]
    assert first["step"] == 1 and first["lr"] == 0.0  # warm-up starts at lr 0: step 1 leaves params as loaded
    state, source_state = saved_state(init.dir, 1), saved_state(source.dir, GPT2_STEPS)
    params = [path for path in state if path.startswith("['params']")]
    assert params
    for path in params:
        np.testing.assert_array_equal(state[path], source_state[path], err_msg=path)
    assert int(state["['step']"]) == 1 and int(source_state["['step']"]) == GPT2_STEPS
    counts = [path for path in state if path.endswith("['count']")]
    assert counts and all(int(state[path]) == 1 for path in counts)  # a fresh optimizer


def test_export_of_a_trained_run_loads_back_its_parameters(runs, tmp_path, capsys):
    source = runs["gpt2-ref"]
    assert export.main([str(source.dir), str(tmp_path / "export")]) == 0
    model_cfg, params = export.load(tmp_path / "export")
    assert (model_cfg.d_model, model_cfg.n_layers, model_cfg.vocab_size) == (64, 2, 384)
    saved = saved_state(source.dir, GPT2_STEPS)
    pure = nnx.to_pure_dict(params)
    assert len(jax.tree.leaves(pure)) == len([path for path in saved if path.startswith("['params']")])
    for path, value in jax.tree_util.tree_leaves_with_path(pure):
        np.testing.assert_array_equal(np.asarray(value), saved[f"['params']{jax.tree_util.keystr(path)}['value']"])
