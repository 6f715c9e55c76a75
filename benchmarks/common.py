"""What the compile-time and remat benchmarks share: a model config by name, devices (host CPU or a
TPU topology's compile-only devices) and the real train step lowered and compiled for them."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp

from models.config import ModelConfig


@dataclasses.dataclass
class Compiled:
    compiled: object  # jax.stages.Compiled
    spec: object  # train.state.StateSpec
    mesh: jax.sharding.Mesh
    lower_s: float
    compile_s: float


def devices_for(topology: str | None) -> list:
    """The host's devices, or the compile-only devices of a TPU topology such as ``v5e-8`` (needs libtpu)."""
    if not topology:
        return jax.devices()
    from sharding.topology import abstract_devices, compile_only_environment, parse_topology

    parsed = parse_topology(topology)
    compile_only_environment(parsed)
    return abstract_devices(parsed, 1)


def compile_step(model_cfg: ModelConfig, batch: int, seq_len: int, devices: list) -> Compiled:
    """Lowers and compiles the train step (AdamW, fsdp over all ``devices``) against abstract inputs."""
    from sharding.mesh import make_mesh
    from train.config.sections import MeshConfig, OptimizerConfig
    from train.core.state import make_state_spec
    from train.core.step import make_train_step

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    spec = make_state_spec(model_cfg, OptimizerConfig(warmup_steps=0), 100, mesh)
    step = make_train_step(spec, mesh, grad_accum=1)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    start = time.perf_counter()
    lowered = step.lower(spec.abstract, {"inputs": tokens, "targets": tokens})
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return Compiled(compiled, spec, mesh, lower_s, time.perf_counter() - start)


def machine() -> dict:
    """Where a figure was measured: backend, device kind, host cores and load."""
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
    }
