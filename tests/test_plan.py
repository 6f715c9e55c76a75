"""``python -m train.plan``: compile the real train step for a TPU slice from this CPU host.

Each case runs the command in a subprocess, so libtpu and jax start fresh with the plan's own
environment. Cases that compile need libtpu (``pip install -e '.[tpu]'``) and skip without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from cli_runs import REPO

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

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


def plan(*args: str, without_libtpu: bool = False) -> subprocess.CompletedProcess:
    """Runs ``python -m train.plan ARGS``; ``without_libtpu`` blocks ``import libtpu`` first."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "train.plan", *args]
    if without_libtpu:
        code = "import runpy, sys; sys.modules['libtpu'] = None; runpy.run_module('train.plan', run_name='__main__')"
        command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.slow
@needs_libtpu
def test_small_model_fits_on_v5e_8_with_a_per_chip_table():
    result = plan(GPT2, "topology=v5e-8", *TINY)
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
def test_splash_attention_compiles_its_pallas_kernels_into_the_step():
    result = plan(GPT2, "topology=v5e-8", *TINY, "model.attention=splash", "model.remat=none")
    assert result.returncode == 0, result.stderr
    calls = re.search(r"kernels: attention=splash, (\d+) Pallas calls \(tpu_custom_call\)", result.stdout)
    assert calls and int(calls[1]) == 3, result.stdout  # the forward kernel and the dq and dkv backward kernels
    assert "verdict: fits" in result.stdout


@pytest.mark.slow
@needs_libtpu
def test_llama_7b_without_fsdp_does_not_fit_on_v5e_4():
    result = plan(LLAMA_7B, "topology=v5e-4", "mesh.fsdp=1", "mesh.data=-1", "train.batch_size=4")
    assert result.returncode == 1, result.stderr
    assert "verdict: does not fit" in result.stdout
    assert "RESOURCE_EXHAUSTED" in result.stdout
    assert "25.10" in result.stdout  # fp32 weights, replicated: 6.74B * 4 bytes on every chip


@pytest.mark.slow
@needs_libtpu
def test_two_slices_put_data_parallelism_across_dcn():
    result = plan(GPT2, "topology=v5e-4", "slices=2", *TINY)
    assert result.returncode == 0, result.stderr
    assert "x 2 slices (dcn_data=2, dcn_fsdp=1)" in result.stdout and "8 chips" in result.stdout
    assert "verdict: fits" in result.stdout


@pytest.mark.slow
def test_unknown_topology_lists_the_known_ones():
    line = error_line(plan(GPT2, "topology=v9z-8"))
    assert "unknown TPU topology 'v9z-8'" in line and "v5e-8" in line and "v5p-64" in line


@pytest.mark.slow
def test_missing_topology_says_how_to_give_one():
    assert "topology=NAME" in error_line(plan(GPT2))


@pytest.mark.slow
def test_missing_libtpu_says_how_to_install_it():
    line = error_line(plan(GPT2, "topology=v5e-8", without_libtpu=True))
    assert "pip install -e '.[tpu]'" in line


@pytest.mark.slow
@needs_libtpu
def test_mesh_that_does_not_divide_the_chips_gives_the_mesh_error():
    line = error_line(plan(GPT2, "topology=v5e-8", "mesh.tensor=3", *TINY))
    assert "mesh sizes" in line and "8 devices per slice" in line


@pytest.mark.slow
@needs_libtpu
def test_slices_that_disagree_with_the_dcn_mesh_are_refused():
    line = error_line(plan(GPT2, "topology=v5e-4", "slices=2", "mesh.dcn_data=3", *TINY))
    assert "slices=2" in line


@pytest.mark.slow
def test_bad_override_is_a_config_error():
    assert "did you mean 'n_layers'" in error_line(plan(GPT2, "topology=v5e-8", "model.n_layer=2"))
