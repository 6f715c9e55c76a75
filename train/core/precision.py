"""``model.compute_dtype: auto``: the compute dtype that is fast on the hardware at hand.

TPUs and GPUs multiply bf16 natively: ``bfloat16``. On a CPU, XLA runs bf16 matmuls fast only
on AMX-BF16 units (YNNPACK); elsewhere they are upcast to fp32 and the casts make bf16 slower
than fp32 (benchmarks/README.md), so ``auto`` is ``bfloat16`` only where ``/proc/cpuinfo``
lists ``amx_bf16``. Resolved once when a run's model config is resolved; the run's saved
config.yaml and start-up line record the concrete dtype.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from models.config import ModelConfig

CPUINFO = pathlib.Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: pathlib.Path = CPUINFO) -> frozenset[str]:
    """The first ``flags`` line of ``cpuinfo`` as a set; empty where there is none (macOS, Windows, ARM)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def fast_compute_dtype(backend: str, flags: frozenset[str]) -> str:
    """``bfloat16`` on accelerators and on CPUs with AMX-BF16, else ``float32``."""
    if backend != "cpu":
        return "bfloat16"
    return "bfloat16" if "amx_bf16" in flags else "float32"


def resolve_compute_dtype(cfg: ModelConfig, backend: str | None = None) -> ModelConfig:
    """``cfg`` with ``compute_dtype='auto'`` replaced by the fast dtype of ``backend`` (default: this
    process's default backend; a compile-only TPU plan passes ``'tpu'``)."""
    if cfg.compute_dtype != "auto":
        return cfg
    return dataclasses.replace(cfg, compute_dtype=fast_compute_dtype(backend or jax.default_backend(), cpu_flags()))
