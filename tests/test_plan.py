"""``python -m train.plan``: compile the real train step for a TPU slice from this CPU host.

The cases that reach libtpu (``pip install -e '.[tpu]'``; they skip without it) run one after
another in one subprocess, so libtpu and jax start with the plan's own environment, not this
process's 8 fake CPU devices; each case's exit status and output as ``python -m train.plan``
gives them. Mistakes found before libtpu is needed run here, through the command's ``main``;
the missing libtpu runs as the real command, with its real exit status and stderr.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest
from cli_runs import REPO

from train.plan import main

GPT2 = str(REPO / "configs" / "gpt2-124m.yaml")
LLAMA_7B = str(REPO / "configs" / "llama-7b.yaml")
# GPT-2's layout at a size that compiles in seconds
TINY = [
    "model.n_layers=2",
    "model.d_model=128",
    "model.n_heads=2",
    "model.d_ff=512",
    "model.vocab_size=256",
    "model.max_seq_len=128",
    "train.seq_len=128",
    "train.batch_size=16",
]
COMPILED = {  # name: the plan's arguments; every case that reaches libtpu
    "small": [GPT2, "topology=v5e-8", *TINY],
    "splash": [GPT2, "topology=v5e-8", *TINY, "model.attention=splash", "model.remat=none"],
    "llama_7b": [LLAMA_7B, "topology=v5e-4", "mesh.fsdp=1", "mesh.data=-1", "train.batch_size=4"],
    "two_slices": [GPT2, "topology=v5e-4", "slices=2", *TINY],
    "mesh_error": [GPT2, "topology=v5e-8", "mesh.tensor=3", *TINY],
    "dcn_error": [GPT2, "topology=v5e-4", "slices=2", "mesh.dcn_data=3", *TINY],
}
DRIVER = """
import contextlib, io, json, sys
from train.plan import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    results.append([status, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


def plan_env() -> dict[str, str]:
    """This environment without the suite's fake CPU devices, CPU only, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def compiled() -> dict[str, subprocess.CompletedProcess]:
    """name -> each case of ``COMPILED`` as the command would end it: exit status, stdout, stderr."""
    command = [sys.executable, "-c", DRIVER, json.dumps(list(COMPILED.values()))]
    done = subprocess.run(command, cwd=REPO, env=plan_env(), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr[-3000:]  # nothing written around the cases
    results = json.loads(done.stdout.splitlines()[-1])
    return {name: subprocess.CompletedProcess(argv, *r) for (name, argv), r in zip(COMPILED.items(), results)}


def here(*args: str) -> subprocess.CompletedProcess:
    """``train.plan``'s main run in this process, for the mistakes found before libtpu is needed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.slow
@needs_libtpu
def test_small_model_fits_on_v5e_8_with_a_per_chip_table(compiled):
    result = compiled["small"]
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "layout v5e:2x4, 8 chips" in out and "fsdp=8" in out
    for row in ("parameters (fp32)", "optimizer state", "arguments", "temporaries", "total", "usable HBM (v5e)"):
        assert row in out
    assert "compiled in" in out
    assert "kernels: attention=xla, 0 Pallas calls" in out
    assert "verdict: fits" in out


@pytest.mark.slow
@needs_libtpu
def test_splash_attention_compiles_its_pallas_kernels_into_the_step(compiled):
    result = compiled["splash"]
    assert result.returncode == 0, result.stderr
    calls = re.search(r"kernels: attention=splash, (\d+) Pallas calls \(tpu_custom_call\)", result.stdout)
    assert calls and int(calls[1]) == 3, result.stdout  # the forward kernel and the dq and dkv backward kernels
    assert "verdict: fits" in result.stdout


@pytest.mark.slow
@needs_libtpu
def test_llama_7b_without_fsdp_does_not_fit_on_v5e_4(compiled):
    result = compiled["llama_7b"]
    assert result.returncode == 1, result.stderr
    assert "verdict: does not fit" in result.stdout
    assert "RESOURCE_EXHAUSTED" in result.stdout
    assert "25.10" in result.stdout  # fp32 weights, replicated: 6.74B * 4 bytes on every chip


@pytest.mark.slow
@needs_libtpu
def test_two_slices_put_data_parallelism_across_dcn(compiled):
    result = compiled["two_slices"]
    assert result.returncode == 0, result.stderr
    assert "x 2 slices (dcn_data=2, dcn_fsdp=1)" in result.stdout and "8 chips" in result.stdout
    assert "verdict: fits" in result.stdout


def test_unknown_topology_lists_the_known_ones():
    line = error_line(here(GPT2, "topology=v9z-8"))
    assert "unknown TPU topology 'v9z-8'" in line and "v5e-8" in line and "v5p-64" in line


def test_missing_topology_says_how_to_give_one():
    assert "topology=NAME" in error_line(here(GPT2))


@pytest.mark.slow
def test_missing_libtpu_says_how_to_install_it():
    """The real command, in a process where ``import libtpu`` fails: its exit status and its stderr."""
    code = "import runpy, sys; sys.modules['libtpu'] = None; runpy.run_module('train.plan', run_name='__main__')"
    command = [sys.executable, "-c", code, GPT2, "topology=v5e-8"]
    result = subprocess.run(command, cwd=REPO, env=plan_env(), capture_output=True, text=True, timeout=300, check=False)
    line = error_line(result)
    assert "pip install -e '.[tpu]'" in line


@pytest.mark.slow
@needs_libtpu
def test_mesh_that_does_not_divide_the_chips_gives_the_mesh_error(compiled):
    line = error_line(compiled["mesh_error"])
    assert "mesh sizes" in line and "8 devices per slice" in line


@pytest.mark.slow
@needs_libtpu
def test_slices_that_disagree_with_the_dcn_mesh_are_refused(compiled):
    line = error_line(compiled["dcn_error"])
    assert "slices=2" in line


def test_bad_override_is_a_config_error():
    assert "did you mean 'n_layers'" in error_line(here(GPT2, "topology=v5e-8", "model.n_layer=2"))
