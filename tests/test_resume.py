"""Exact resume, preemption, a callback's stop, resharding and init_from, on 8 fake CPU devices.

The runs are tiny (2 layers, 64 wide, 16 x 32 tokens a step, 6 steps) and all but one run in this
process, one after another, through the CLI's ``main`` (imports and compiled programs are paid
for once); the run on a 1-device mesh needs a process of its own and overlaps with the others.
A run stopped at step 3 serves several tests. The Llama one (Adafactor, the embeddings and layer 0
frozen) is continued, preempted by a real SIGTERM that a callback sends this process, and continued
again. The GPT-2 one (AdamW) was stopped by a callback; it is continued, and a copy of it continues
on other meshes. Tests then read the metrics and checkpoints the runs left behind. Losses are
compared exactly where the mesh is the same (CPU is deterministic) and within fp32 tolerance across
meshes.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_runs import REPO, Run, child_env, in_this_process, read_jsonl, run_dir
from flax import nnx

from train import export
from train.checkpoints import sources
from train.run.callbacks import Callback

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
# Adafactor with factored moments (64-wide matrices factor above 32), the embeddings and layer 0 frozen
FROZEN_ADAFACTOR = [
    "optimizer.name=adafactor",
    "optimizer.lr=0.05",
    "optimizer.min_dim_size_to_factor=32",
    "train.freeze=embed|pos_embed",
    "train.freeze_layers=1",
]
GPT2 = ["configs/tiny-gpt2.yaml", *FAST, "train.grad_accum=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
LLAMA = [
    "configs/tiny-llama.yaml",
    *FAST,
    *FROZEN_ADAFACTOR,
    "train.grad_accum=4",
    "mesh.data=1",
    "mesh.fsdp=4",
    "mesh.tensor=2",
]
STEPS = 6  # every run's train.steps; a run stopped early stops at step 3
STOP_REASON = "eval_loss is low enough"


class StopAtEval(Callback):
    """Keeps every eval record it is shown and stops the run at the first one at ``step`` or later."""

    def __init__(self, step: int):
        self.step, self.seen, self.result = step, [], None

    def on_eval(self, loop, record: dict) -> None:
        self.seen.append(record)
        if record["step"] >= self.step:
            loop.request_stop(STOP_REASON)

    def on_end(self, loop, result: dict) -> None:
        self.result = result


class SigtermAfter(Callback):
    """Sends this process SIGTERM after ``step``, as a scheduler preempting the job would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop, step: int) -> None:
        if step == self.step:
            signal.raise_signal(signal.SIGTERM)


def start_cli(argv: list[str], devices: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "train", *argv]
    return subprocess.Popen(
        command, cwd=REPO, env=child_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_cli(process: subprocess.Popen, argv: list[str]) -> Run:
    out, err = process.communicate(timeout=900)
    return Run(run_dir(argv), process.returncode, out, err, read_jsonl(run_dir(argv) / "metrics.jsonl"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")

    def args(preset: list[str], name: str, steps: int, *extra: str) -> list[str]:
        return [*preset, f"run.dir={root / name}", f"train.steps={steps}", *extra]

    out = {}
    stop = out["stop-callback"] = StopAtEval(3)
    out["gpt2-callback-stopped"] = in_this_process(args(GPT2, "gpt2-stop", STEPS, "train.eval_every=3"), (stop,))
    shutil.copytree(root / "gpt2-stop", root / "gpt2-meshes")  # its first 3 steps continue on other meshes
    out["meshes-data8"] = in_this_process(args(GPT2, "gpt2-meshes", 5, "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"))
    one_device = args(GPT2, "gpt2-meshes", STEPS, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1")
    one_device_process = start_cli(one_device, devices=1)  # runs while the others do
    try:
        out["gpt2-callback-resumed"] = in_this_process(args(GPT2, "gpt2-stop", STEPS, "train.eval_every=3"))
        for name, argv in {
            "gpt2-ref": args(GPT2, "gpt2-ref", STEPS),
            "gpt2-other-model": args(GPT2, "gpt2-ref", STEPS, "model.n_layers=3", "model.d_ff=128"),
            "gpt2-init": args(GPT2, "gpt2-init", 2, f"checkpoint.init_from={root / 'gpt2-ref'}", "checkpoint.every=1"),
            "llama-ref": args(LLAMA, "llama-ref", STEPS),
            "llama-stopped": args(LLAMA, "llama-resumed", 3),
        }.items():
            out[name] = in_this_process(argv)
        handler = signal.getsignal(signal.SIGTERM)
        out["llama-preempted"] = in_this_process(args(LLAMA, "llama-resumed", STEPS), (SigtermAfter(4),))
        out["sigterm-handler-kept"] = signal.getsignal(signal.SIGTERM) == handler
        out["llama-resumed"] = in_this_process(args(LLAMA, "llama-resumed", STEPS))
    finally:
        out["meshes-1-device"] = finish_cli(one_device_process, one_device)
    return out


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


@pytest.mark.slow
def test_a_run_stopped_at_step_3_and_continued_is_bitwise_the_uninterrupted_run(runs):
    """The Llama run stopped at step 3 is continued twice: preempted after step 5, then to the end."""
    ref, stopped, continued, resumed = (runs[f"llama-{leg}"] for leg in ("ref", "stopped", "preempted", "resumed"))
    assert_ok(ref, stopped, continued, resumed)
    assert f"resumed from {continued.dir / 'checkpoints' / '3'}" in continued.out
    warning = f"warning: train.steps={STEPS} differs from the 3 steps of the run that saved step 3; "
    assert warning + f"the learning-rate schedule is rebuilt for {STEPS} steps" in continued.err
    assert list(resumed.losses()) == list(range(1, STEPS + 1))
    assert resumed.losses() == ref.losses()  # exact float equality, every step
    assert_states_equal(saved_state(resumed.dir, STEPS), saved_state(ref.dir, STEPS))


@pytest.mark.slow
def test_a_frozen_adafactor_run_keeps_no_moments_of_its_frozen_params_and_reports_its_trainable_params(runs):
    """The Llama runs, whose resumes the tests above and below compare bitwise with this one."""
    ref = runs["llama-ref"]
    assert_ok(ref)
    final = saved_state(ref.dir, STEPS)
    moments = [path for path in final if path.startswith("['opt_state']")]
    assert any("['v_row']" in path for path in moments)  # factored
    assert not any("embed'" in path for path in moments)  # frozen: no moments
    sizes = {path: value.size for path, value in final.items() if path.startswith("['params']")}
    frozen = sum(size for path, size in sizes.items() if "embed'" in path)
    stacked = sum(size for path, size in sizes.items() if path.startswith("['params']['stack']"))
    first = ref.metrics[0]
    assert (first["params"], first["trainable_params"]) == (
        sum(sizes.values()),
        sum(sizes.values()) - frozen - stacked // 2,
    )
    assert "params" not in ref.metrics[1]
    assert f"model: {first['params'] / 1e6:.2f}M params ({first['trainable_params'] / 1e6:.2f}M trainable)" in ref.out


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_once_and_the_resumed_run_is_bitwise_uninterrupted(runs):
    """The signal arrives after step 4's callbacks looked for it: the run stops after step 5."""
    ref, stopped, resumed = runs["llama-ref"], runs["llama-preempted"], runs["llama-resumed"]
    assert_ok(ref, stopped, resumed)
    saved_lines = [line for line in stopped.out.splitlines() if line.startswith("preempted:")]
    assert len(saved_lines) == 1, stopped.out
    step = int(re.search(r"at step (\d+) ", saved_lines[0]).group(1))
    assert step == 5
    assert runs["sigterm-handler-kept"]  # the run put the previous handler back
    assert saved_lines[0] == f"preempted: saved checkpoint at step {step} to {stopped.dir / 'checkpoints' / str(step)}"
    assert "final:" not in stopped.out
    assert max(stopped.losses()) == step  # the step it was in when signalled, then stopped
    assert f"resumed from {stopped.dir / 'checkpoints' / str(step)}" in resumed.out
    assert resumed.losses() == ref.losses()
    assert_states_equal(saved_state(resumed.dir, STEPS), saved_state(ref.dir, STEPS))


@pytest.mark.slow
def test_a_callback_sees_every_eval_record_and_its_stop_saves_a_step_that_resumes_exactly(runs):
    ref, stopped, resumed, callback = (
        runs["gpt2-ref"],
        runs["gpt2-callback-stopped"],
        runs["gpt2-callback-resumed"],
        runs["stop-callback"],
    )
    assert_ok(ref, stopped, resumed)
    assert callback.seen == stopped.evals() and [r["step"] for r in callback.seen] == [3]
    assert f"stopped at step 3: {STOP_REASON}" in stopped.out
    assert "final:" not in stopped.out  # the eval at step 3 was the last one
    assert callback.result == {"train": stopped.metrics[-2], "eval": callback.seen[-1], "stopped": STOP_REASON}
    assert max(stopped.losses()) == 3
    assert f"resumed from {resumed.dir / 'checkpoints' / '3'}" in resumed.out  # checkpoint.every=2: saved on stopping
    assert resumed.losses() == ref.losses()
    assert [r["step"] for r in resumed.evals()] == [3, 6]
    assert_states_equal(saved_state(resumed.dir, STEPS), saved_state(ref.dir, STEPS))


@pytest.mark.slow
def test_continuing_on_other_meshes_matches_the_unresharded_run_within_fp32_tolerance(runs):
    """The first 3 steps on the reference mesh (data 2, fsdp 2, tensor 2), 2 on 8-way data parallelism, 1 on one device."""
    ref = runs["gpt2-ref"]
    legs = runs["meshes-data8"], runs["meshes-1-device"]
    assert_ok(ref, *legs)
    assert f"resumed from {legs[0].dir / 'checkpoints' / '3'}" in legs[0].out
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in legs[0].out
    assert f"resumed from {legs[1].dir / 'checkpoints' / '5'}" in legs[1].out
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in legs[1].out
    losses, expected = legs[1].losses(), ref.losses()
    assert list(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=2e-5)
    final, final_ref = saved_state(legs[1].dir, STEPS), saved_state(ref.dir, STEPS)
    for path in final_ref:
        np.testing.assert_allclose(final[path], final_ref[path], rtol=1e-3, atol=1e-5, err_msg=path)


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_naming_the_fields(runs):
    run = runs["gpt2-other-model"]
    assert run.rc == 2
    errors = [line for line in run.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.err
    assert f"checkpoint {run.dir / 'checkpoints' / str(STEPS)} holds a different model" in errors[0]
    assert "(n_layers: 2 -> 3; d_ff: 256 -> 128)" in errors[0]
    assert run.metrics == runs["gpt2-ref"].metrics  # the run it refused is untouched


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_another_runs_parameters(runs):
    source, init = runs["gpt2-ref"], runs["gpt2-init"]
    assert_ok(source, init)
    assert "resumed from" not in init.out
    first = init.metrics[0]
    assert first["step"] == 1 and first["lr"] == 0.0  # warm-up starts at lr 0: step 1 leaves params as loaded
    state, source_state = saved_state(init.dir, 1), saved_state(source.dir, STEPS)
    params = [path for path in state if path.startswith("['params']")]
    assert params
    for path in params:
        np.testing.assert_array_equal(state[path], source_state[path], err_msg=path)
    assert int(state["['step']"]) == 1 and int(source_state["['step']"]) == STEPS
    counts = [path for path in state if path.endswith("['count']")]
    assert counts and all(int(state[path]) == 1 for path in counts)  # a fresh optimizer


@pytest.mark.slow
def test_export_of_a_trained_run_loads_back_its_parameters(runs, tmp_path, capsys):
    source = runs["gpt2-ref"]
    assert export.main([str(source.dir), str(tmp_path / "export")]) == 0
    model_cfg, params = sources.load_export(tmp_path / "export")
    assert (model_cfg.d_model, model_cfg.n_layers, model_cfg.vocab_size) == (64, 2, 384)
    saved = saved_state(source.dir, STEPS)
    pure = nnx.to_pure_dict(params)
    assert len(jax.tree.leaves(pure)) == len([path for path in saved if path.startswith("['params']")])
    for path, value in jax.tree_util.tree_leaves_with_path(pure):
        np.testing.assert_array_equal(np.asarray(value), saved[f"['params']{jax.tree_util.keystr(path)}['value']"])
