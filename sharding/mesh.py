"""Device mesh from the config's axis sizes: ``-1`` fills, DCN (multi-slice) sizes multiply."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sharding.rules import MESH_AXES
from train.config import ConfigError, MeshConfig


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


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
