"""``python -m train CONFIG key=value ...`` end to end, on 8 fake CPU devices.

Good runs, 30 steps each: the tiny GPT-2 preset as the real command, in a subprocess; the tiny
Llama preset meanwhile in this process, through the command's ``main``; then the GPT-2 again
here, same seed, another run dir (its programs compiled by then).
Bad input: exit status 2, one ``error:`` line on stderr, and nothing written to run.dir; one
case is the real command in a subprocess, started with the GPT-2 run, the rest run here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import pytest
from cli_runs import REPO, child_env, in_this_process

from train.__main__ import main
from train.config.sections import load_config
from train.core.optimizer import schedule
from train.data.tokenizer import ByteTokenizer
from train.run.loop import resolve_model

GPT2 = "configs/tiny-gpt2.yaml"
LLAMA = "configs/tiny-llama.yaml"
TRAIN_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"}
EVAL_KEYS = {"step", "eval_loss", "eval_bpb"}
ENV = child_env(8)
TIMEOUT_S = 300


def start(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "train", *args]
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def read_records(run_dir: pathlib.Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


BAD_INPUTS = {
    # name: (arguments after the config path, what the one error line must say)
    "misspelt key": (["train.stpes=5"], "unknown config key 'train.stpes' (did you mean 'steps'?)"),
    "wrong type": (["train.batch_size=sixteen"], "train.batch_size must be an integer, got 'sixteen'"),
    "missing data path": (
        ["data.train_files=data/no_such_corpus/*.txt"],
        "data.train_files='data/no_such_corpus/*.txt' matches no file",
    ),
    "empty corpus": (["data.train_files={empty}/*.txt"], "holds only empty documents"),
    "mesh does not divide devices": (
        ["mesh.data=3", "mesh.fsdp=1"],
        "mesh sizes data=3, fsdp=1, tensor=1 use 3 devices but 8 are available",
    ),
    "batch not divisible by data parallel": (
        ["train.batch_size=12"],
        "train.batch_size=12 is not divisible by the data-parallel size 8",
    ),
    "seq_len over max_seq_len": (["train.seq_len=128"], "train.seq_len=128 is longer than model.max_seq_len=64"),
    "splash attention off TPU": (
        ["model.attention=splash", "model.max_seq_len=128", "train.seq_len=128"],
        "model.attention='splash' runs on TPU only, not on cpu; use model.attention='xla'",
    ),
}
REAL_BAD_INPUT = "misspelt key"  # the one bad input run as the real command


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    """The runs' directory, with an empty corpus for the bad input that needs one."""
    root = tmp_path_factory.mktemp("cli")
    empty = root / "empty_corpus"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    return root


def bad_argv(root: pathlib.Path, name: str) -> tuple[pathlib.Path, list[str]]:
    """(run dir that must stay absent, argv) of the bad input ``name``."""
    run_dir = root / name.replace(" ", "-")
    args = [a.format(empty=root / "empty_corpus") for a in BAD_INPUTS[name][0]]
    return run_dir, [GPT2, f"run.dir={run_dir}", *args]


@pytest.fixture(scope="module")
def launched(root):
    """Every subprocess of this file, started at once: name -> (run dir, Popen)."""
    out = {"gpt2": (root / "gpt2", start(GPT2, f"run.dir={root / 'gpt2'}"))}
    run_dir, argv = bad_argv(root, REAL_BAD_INPUT)
    out[REAL_BAD_INPUT] = (run_dir, start(*argv))
    yield out
    for _, process in out.values():
        if process.poll() is None:
            process.kill()
            process.wait()


# --- good runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(launched, root):
    """name -> (run dir, CompletedProcess) for the good runs: llama while the gpt2 subprocess
    runs, gpt2-again once it is done."""

    def here(name: str, *argv: str) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
        run = in_this_process([*argv, f"run.dir={root / name}"])
        return run.dir, subprocess.CompletedProcess(argv, run.rc, run.out, run.err)

    out = {"llama": here("llama", LLAMA)}
    out["gpt2"] = (launched["gpt2"][0], finish(launched["gpt2"][1]))
    out["gpt2-again"] = here("gpt2-again", GPT2, "train.sample_tokens=0")  # sampling happens after training
    return out


def check_ok(result: subprocess.CompletedProcess) -> None:
    output = f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"exit {result.returncode}\n{output}"


@pytest.mark.slow
@pytest.mark.parametrize("name, preset", [("gpt2", GPT2), ("llama", LLAMA)])
def test_run_writes_train_and_eval_records_with_every_metric(runs, name, preset):
    run_dir, result = runs[name]
    check_ok(result)
    config = load_config(REPO / preset)
    train, evals = read_records(run_dir)
    assert [r["step"] for r in train] == list(range(5, 31, 5))  # log_every 5, 30 steps
    assert [r["step"] for r in evals] == [10, 20, 30]  # eval_every 10, and the final eval
    lr_at = schedule(config.optimizer, config.train.steps)
    for r in train:
        assert TRAIN_KEYS <= r.keys(), r
        assert r["lr"] == pytest.approx(float(lr_at(r["step"] - 1)), rel=1e-6)
        assert math.isfinite(r["loss"]) and 0 < r["grad_norm"] < 100
        assert r["tokens_per_sec"] > 0 and r["mfu"] > 0
    # mfu = tokens_per_sec * flops_per_token / peak: the same ratio on every record of a run.
    ratios = [r["mfu"] / r["tokens_per_sec"] for r in train]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    for r in evals:
        assert EVAL_KEYS <= r.keys(), r
        # Byte tokenizer: the eval windows (the start of Hamlet) hold one byte per token and no eos,
        # so bits per byte of the tokens scored is the loss in bits.
        assert r["eval_bpb"] == pytest.approx(r["eval_loss"] / math.log(2), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_loss_falls(runs, name):
    run_dir, result = runs[name]
    check_ok(result)
    train, evals = read_records(run_dir)
    assert train[0]["loss"] > 4.5  # about ln(384) = 5.95 at step 1
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < 0.8 * math.log(384)


@pytest.mark.slow
@pytest.mark.parametrize("name, preset", [("gpt2", GPT2), ("llama", LLAMA)])
def test_run_dir_holds_resolved_config_checkpoint_and_plot(runs, name, preset):
    run_dir, result = runs[name]
    check_ok(result)
    saved = load_config(run_dir / "config.yaml")  # the saved config loads and validates as it is
    given = load_config(REPO / preset, [f"run.dir={run_dir}"])
    resolved = {
        "model": resolve_model(given.model, ByteTokenizer.vocab_size),
        "data": dataclasses.replace(given.data, packing=True),
    }
    expected = dataclasses.replace(given, **resolved)  # vocabulary size and data.packing filled in
    assert saved == expected
    assert saved.model.vocab_size == 384  # 257 byte ids rounded up to a multiple of 128
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")) == ["30"]
    assert (run_dir / "loss.png").stat().st_size > 0
    assert "final: eval_loss" in result.stdout


@pytest.mark.slow
def test_sample_is_printed_after_training(runs):
    _, result = runs["gpt2"]
    check_ok(result)
    assert "sample:\nROMEO.\n" in result.stdout


@pytest.mark.slow
def test_same_seed_in_another_run_dir_gives_identical_losses(runs):
    (dir_a, a), (dir_b, b) = runs["gpt2"], runs["gpt2-again"]
    check_ok(a)
    check_ok(b)
    train_a, eval_a = read_records(dir_a)
    train_b, eval_b = read_records(dir_b)
    assert [r["loss"] for r in train_a] == [r["loss"] for r in train_b]
    assert [r["grad_norm"] for r in train_a] == [r["grad_norm"] for r in train_b]
    assert [r["eval_loss"] for r in eval_a] == [r["eval_loss"] for r in eval_b]


# --- bad input ------------------------------------------------------------------------------


def check_bad_input(name: str, run_dir: pathlib.Path, status: int, stdout: str, stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert status == 2, f"exit {status}\nstderr:\n{stderr[-4000:]}"
    assert len(lines) == 1, f"stderr should be one line:\n{stderr[-4000:]}"
    assert lines[0].startswith("error: ")
    assert BAD_INPUTS[name][1] in lines[0]
    assert "Traceback" not in stdout
    assert not run_dir.exists(), f"{name}: wrote {sorted(p.name for p in run_dir.rglob('*'))}"


@pytest.mark.slow
def test_bad_input_as_the_real_command_exits_2_with_one_error_line_and_writes_nothing(launched):
    run_dir, process = launched[REAL_BAD_INPUT]
    result = finish(process)
    check_bad_input(REAL_BAD_INPUT, run_dir, result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("name", [name for name in BAD_INPUTS if name != REAL_BAD_INPUT])
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(root, name):
    run_dir, argv = bad_argv(root, name)
    run = in_this_process(argv)
    check_bad_input(name, run_dir, run.rc, run.out, run.err)


def test_help_exits_0_and_shows_usage(capsys):
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m train [CONFIG.yaml]")
