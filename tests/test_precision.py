"""``model.compute_dtype: auto``: bf16 on accelerators and AMX-BF16 CPUs, fp32 on other CPUs, resolved
once with the run's model config; the default run asks for it."""

from __future__ import annotations

import jax

from train.config.sections import load_config
from train.core.precision import cpu_flags, fast_compute_dtype, resolve_compute_dtype
from train.data.tokenizer import ByteTokenizer
from train.run.loop import resolve_model

CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
flags\t\t: fpu
"""


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_flags(path) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()  # macOS, Windows: no /proc/cpuinfo


def test_bf16_only_where_it_is_fast():
    assert fast_compute_dtype("cpu", frozenset({"avx512f", "amx_bf16"})) == "bfloat16"
    assert fast_compute_dtype("cpu", frozenset({"avx512f", "avx512_bf16"})) == "float32"  # no AMX: bf16 is slower
    assert fast_compute_dtype("cpu", frozenset()) == "float32"
    assert fast_compute_dtype("tpu", frozenset()) == "bfloat16"
    assert fast_compute_dtype("gpu", frozenset()) == "bfloat16"


def test_default_run_resolves_auto_once_with_its_model():
    config = load_config()
    assert config.model.compute_dtype == "auto"
    model = resolve_model(config.model, ByteTokenizer.vocab_size)
    assert model.compute_dtype == fast_compute_dtype(jax.default_backend(), cpu_flags())
    assert resolve_compute_dtype(config.model, backend="tpu").compute_dtype == "bfloat16"
    fixed = load_config(overrides=["model.compute_dtype=float32"]).model
    assert resolve_model(fixed, ByteTokenizer.vocab_size).compute_dtype == "float32"
