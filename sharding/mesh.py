"""The mesh config and the device mesh it gives: ``-1`` fills, DCN (multi-slice) sizes multiply."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from models.config import ConfigError
from sharding.rules import MESH_AXES, MeshAxes, Rules, merge_rules, rule_problems


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1  # -1: take the devices left over
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1  # slices / hosts along data (multi-slice); multiplies `data`
    dcn_fsdp: int = 1
    # [logical axis, mesh axis | [mesh axes] | null] pairs that replace the default rules of their
    # logical axes (sharding/rules.py), e.g. [[embed, tensor]]; as MaxText's logical_axis_rules
    rules: tuple[tuple[str, MeshAxes], ...] = ()

    def problems(self) -> list[str]:
        """Impossible sizes or rules, each as 'what is wrong; how to fix it'."""
        out = []
        for name in MESH_AXES:
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                out.append(f"mesh.{name} must be a positive size or -1 (fill), got {getattr(self, name)}")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            out.append("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        if self.dcn_data < 1 or self.dcn_fsdp < 1:
            out.append("mesh.dcn_data and mesh.dcn_fsdp must be >= 1")
        return out + rule_problems(self.rules)

    @property
    def logical_rules(self) -> Rules:
        """The rules table of this run: ``rules`` over the defaults."""
        return merge_rules(self.rules)


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Per-slice (ICI) sizes of (data, fsdp, tensor) with ``-1`` filled in.

    Raises ConfigError when the sizes do not multiply to the device count.
    """
    dcn = cfg.dcn_data * cfg.dcn_fsdp
    if num_devices % dcn:
        raise ConfigError(
            f"mesh.dcn_data * mesh.dcn_fsdp = {dcn} does not divide the {num_devices} devices; "
            "set them to the number of slices"
        )
    per_slice = num_devices // dcn
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise ConfigError(
                f"mesh sizes {_describe(sizes)} cannot fill {per_slice} devices per slice "
                f"({per_slice} is not divisible by {known}); choose sizes whose product divides it"
            )
        sizes[sizes.index(-1)] = per_slice // known
    elif known != per_slice:
        raise ConfigError(
            f"mesh sizes {_describe(sizes)} use {known} devices but {per_slice} are available per slice; "
            "make mesh.data * mesh.fsdp * mesh.tensor equal the device count or set one of them to -1"
        )
    return tuple(sizes)


def _describe(sizes) -> str:
    return ", ".join(f"{name}={s}" for name, s in zip(MESH_AXES, sizes))


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with axes ``('data', 'fsdp', 'tensor')`` over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    ici = resolve_shape(cfg, len(devices))
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1)
    if math.prod(dcn) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (AssertionError, NotImplementedError, ValueError):
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
