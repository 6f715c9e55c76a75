"""Compiling the real train step of a config for a TPU topology on compile-only devices: the work of
``python -m train.plan`` (its --help says what is planned). ``make_plan`` returns the compiler's verdict and
per-chip memory (a ``Plan``), ``format_plan`` the report the command prints."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from sharding.fit import check_fits
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding
from sharding.topology import Topology, abstract_devices
from train.config.sections import Config, ConfigError
from train.config.validate import fit_sizes
from train.core.freeze import Freeze
from train.core.precision import resolve_compute_dtype
from train.core.state import count_params, make_state_spec
from train.core.step import make_train_step

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one compile says about a run on a topology; byte counts are per device (chip)."""

    topology: Topology
    slices: int
    mesh_shape: dict[str, int]
    num_params: int
    param_bytes: int  # the fp32 master weights held by one chip
    opt_bytes: int  # optimizer state held by one chip
    batch_bytes: int  # one chip's slice of the input batch
    lower_s: float
    compile_s: float
    memory: object | None  # compiled.memory_analysis() when it compiled
    oom_message: str = ""  # the compiler's RESOURCE_EXHAUSTED text when it did not
    pallas_calls: int = 0  # Pallas/Mosaic kernels (tpu_custom_call) in the compiled step, e.g. splash attention

    @property
    def fits(self) -> bool:
        return self.memory is not None

    @property
    def temp_bytes(self) -> int | None:
        """Temporaries (activations, gradients, workspace) per chip; when it did not fit, what XLA asked for."""
        if self.memory is not None:
            return self.memory.temp_size_in_bytes
        return _bytes_in(r"HLO temporaries \(([\d.]+)([KMGT])", self.oom_message)

    @property
    def total_bytes(self) -> int | None:
        """Peak HBM of the step: arguments + outputs - donated aliases + temporaries + code.

        When it did not fit: what XLA reported as used, else state + batch + requested temporaries.
        """
        if self.memory is None:
            used = _bytes_in(r"Used ([\d.]+)([KMGT]) of", self.oom_message)
            if used is None and self.temp_bytes is not None:
                used = self.param_bytes + self.opt_bytes + self.batch_bytes + self.temp_bytes
            return used
        m = self.memory
        return (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes
        )


def abstract_batch(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch's shapes: ``{'inputs', 'targets'}: int32[batch_size, seq_len]``."""
    tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len), jnp.int32)
    return {"inputs": tokens, "targets": tokens}


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs laid out by a matching tree of shardings."""
    sizes = jax.tree.map(
        lambda a, s: math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize, abstract, shardings
    )
    return sum(jax.tree.leaves(sizes))


def multislice_mesh(cfg: Config, slices: int) -> Config:
    """The config with its DCN mesh axes checked against (or set from) the number of slices."""
    m = cfg.mesh
    if m.dcn_data * m.dcn_fsdp == slices:
        return cfg
    if m.dcn_data == m.dcn_fsdp == 1:
        return dataclasses.replace(cfg, mesh=dataclasses.replace(m, dcn_data=slices))
    raise ConfigError(
        f"mesh.dcn_data * mesh.dcn_fsdp = {m.dcn_data * m.dcn_fsdp} but slices={slices}; "
        "make their product the number of slices"
    )


def make_plan(cfg: Config, topology: Topology, slices: int = 1) -> Plan:
    """Compiles the train step of ``cfg`` for ``slices`` x ``topology``; raises ConfigError on bad input."""
    if cfg.model.family != "decoder":
        raise ConfigError(
            f"plans support model.family='decoder' only (got '{cfg.model.family}'): its batch shapes are not described yet"
        )
    if cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size must be set for a plan (no tokenizer is loaded); set model.vocab_size=N")
    if slices < 1:
        raise ConfigError(f"slices must be a positive integer, got {slices}")
    cfg = dataclasses.replace(multislice_mesh(cfg, slices), model=resolve_compute_dtype(cfg.model, backend="tpu"))
    try:
        devices = abstract_devices(topology, slices)
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"libtpu cannot lay out topology '{topology.name}' ({_first_line(e)})") from None
    mesh = make_mesh(cfg.mesh, devices)
    mesh_shape = dict(mesh.shape)
    check_fits(cfg.model, mesh_shape, cfg.mesh.logical_rules, **fit_sizes(cfg, process_count=1))

    freeze = Freeze(cfg.train.freeze, cfg.train.freeze_layers, cfg.model.peft_method != "none")
    spec = make_state_spec(cfg.model, cfg.optimizer, cfg.train.steps, mesh, cfg.mesh.logical_rules, freeze, cfg.prune)
    step = make_train_step(spec, mesh, cfg.train.grad_accum, cfg.seed, adversarial=cfg.train.adversarial)
    batch = abstract_batch(cfg)
    batch_shardings = jax.tree.map(lambda _: batch_sharding(mesh), batch)

    start = time.perf_counter()
    lowered = step.lower(spec.abstract, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    memory, oom, pallas_calls = None, "", 0
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        oom = str(e)
    compile_s = time.perf_counter() - start
    if not oom:
        memory = compiled.memory_analysis()
        pallas_calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    return Plan(
        topology=topology,
        slices=slices,
        mesh_shape=mesh_shape,
        num_params=count_params(spec.abstract.params),
        param_bytes=per_device_bytes(spec.abstract.params, spec.shardings.params),
        opt_bytes=per_device_bytes(spec.abstract.opt_state, spec.shardings.opt_state),
        batch_bytes=per_device_bytes(batch, batch_shardings),
        lower_s=lower_s,
        compile_s=compile_s,
        memory=memory,
        oom_message=oom,
        pallas_calls=pallas_calls,
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _bytes_in(pattern: str, message: str) -> int | None:
    """The first XLA size ('113.00G': GiB, binary units) captured by ``pattern`` as (number, unit)."""
    match = re.search(pattern, message)
    return None if match is None else int(float(match[1]) * 1024 ** (1 + "KMGT".index(match[2])))


def format_plan(plan: Plan, cfg: Config, config_name: str) -> str:
    """The human-readable report: setup, compile time, per-chip memory table, verdict."""
    topo, t, m = plan.topology, cfg.train, cfg.model
    dp = plan.mesh_shape["data"] * plan.mesh_shape["fsdp"]  # global: ICI sizes times DCN sizes
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
    slices = (
        f" x {plan.slices} slices (dcn_data={cfg.mesh.dcn_data}, dcn_fsdp={cfg.mesh.dcn_fsdp})"
        if plan.slices > 1
        else ""
    )
    where = f"{topo.cloud_name}, layout {topo.layout}, {topo.chips * plan.slices} chips"
    lines = [
        f"plan: {config_name} on {topo.name}{slices}: {where}",
        f"model: {_count(plan.num_params)} parameters, remat={m.remat}, compute {m.compute_dtype}",
        (
            f"mesh: {mesh}; batch {t.batch_size} x {t.seq_len} tokens, grad_accum {t.grad_accum}, "
            f"{t.batch_size // max(dp, 1)} sequences per data-parallel shard"
        ),
        f"compile: lowered in {plan.lower_s:.1f} s, compiled in {plan.compile_s:.1f} s",
        f"kernels: attention={m.attention}, "
        + (f"{plan.pallas_calls} Pallas calls (tpu_custom_call) in the compiled step" if plan.fits else "not compiled"),
        "",
        f"{'per chip':<34}{'GiB':>8}",
    ]

    def row(label: str, nbytes: int | None, note: str = "") -> None:
        value = "?" if nbytes is None else f"{nbytes / GIB:.2f}"
        lines.append(f"  {label:<32}{value:>8}{'   ' + note if note else ''}")

    row("parameters (fp32)", plan.param_bytes, "from the state's shardings")
    row("optimizer state", plan.opt_bytes, "from the state's shardings")
    row("batch", plan.batch_bytes)
    usable = topo.hbm_bytes
    if plan.fits:
        mem = plan.memory
        row("arguments", mem.argument_size_in_bytes, "compiler: state + batch")
        row("outputs", mem.output_size_in_bytes, "compiler")
        row("aliased (donated state)", -mem.alias_size_in_bytes, "compiler: outputs reusing arguments")
        row("temporaries", mem.temp_size_in_bytes, "compiler: activations, gradients, workspace")
        row("generated code", mem.generated_code_size_in_bytes, "compiler")
    else:
        row("temporaries", plan.temp_bytes, "compiler: requested, RESOURCE_EXHAUSTED")
    total = plan.total_bytes
    if total is None:
        share = "(the compiler did not say)"
    else:
        share = f"({'at least ' if not plan.fits else ''}{total / usable:.0%} of usable)"
    row("total", total, share)
    row(f"usable HBM ({topo.generation})", usable)
    lines.append("")
    if plan.fits:
        lines.append(f"verdict: fits ({(usable - total) / GIB:.2f} GiB headroom per chip)")
    else:
        lines.append("verdict: does not fit")
        detail = re.search(r"Used [\d.]+[KMGT] of [\d.]+[KMGT] hbm[^\n]*", plan.oom_message)
        lines.append(f"compiler: {detail[0] if detail else _first_line(Exception(plan.oom_message))}")
    return "\n".join(lines)
