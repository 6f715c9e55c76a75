"""TPU slice names as Google Cloud spells them, and abstract devices for compiling against one.

Names follow Cloud's accelerator types, so the number means different things per generation:

- ``v5e-N`` (alias ``v5litepod-N``) and ``v6e-N``: N is the number of chips (one core each).
- ``v4-N`` and ``v5p-N``: N is the number of TensorCores, two per chip; the chips run as one
  megacore JAX device each, so ``v5p-64`` is 32 chips and 32 devices.

A raw libtpu layout such as ``v5p:4x4x12`` or ``v5e:2x4`` is accepted too, for slice shapes the
table does not list. Nothing here needs a TPU: libtpu builds compile-only devices on any host.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax

from models.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Generation:
    cores_per_name_unit: int  # 2 where Cloud names count TensorCores (v4, v5p), else 1
    dims: int  # 2 (v5e, v6e) or 3 (v4, v5p) torus dimensions
    megacore: bool
    hbm_gib: float  # usable HBM per device (what XLA may allocate), GiB
    cloud_prefix: str  # Cloud's accelerator-type prefix (v5e is 'v5litepod')


GENERATIONS = {
    "v4": Generation(2, 3, True, 30.75, "v4"),
    "v5p": Generation(2, 3, True, 95.74, "v5p"),
    "v5e": Generation(1, 2, False, 15.75, "v5litepod"),
    "v6e": Generation(1, 2, False, 31.25, "v6e"),
}
ALIASES = {"v5litepod": "v5e"}

# chips -> layout; the standard slice shapes of each torus dimensionality
LAYOUTS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
LAYOUTS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
MAX_CHIPS = {"v4": 2048, "v5p": 8960, "v5e": 256, "v6e": 256}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it, e.g. 'v5p-64'
    generation: str  # 'v4' | 'v5p' | 'v5e' | 'v6e'
    shape: tuple[int, ...]  # chips along each torus axis, e.g. (2, 4, 4)

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def layout(self) -> str:
        """The name libtpu's ``get_topology_desc`` takes, e.g. 'v5p:2x4x4'."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def hbm_bytes(self) -> int:
        return int(GENERATIONS[self.generation].hbm_gib * 2**30)

    @property
    def cloud_name(self) -> str:
        gen = GENERATIONS[self.generation]
        return f"{gen.cloud_prefix}-{self.chips * gen.cores_per_name_unit}"


def known_names() -> list[str]:
    out = []
    for name, gen in GENERATIONS.items():
        layouts = LAYOUTS_3D if gen.dims == 3 else LAYOUTS_2D
        out += [f"{name}-{c * gen.cores_per_name_unit}" for c in layouts if c <= MAX_CHIPS[name]]
    return out


def parse_topology(name: str) -> Topology:
    """'v5p-64' / 'v5litepod-16' / 'v5e:2x4' -> Topology; unknown names raise ConfigError."""
    text = name.strip().lower()
    layout = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    if layout:
        gen_name = ALIASES.get(layout[1], layout[1])
        shape = tuple(int(s) for s in layout[2].split("x"))
        if gen_name in GENERATIONS and len(shape) == GENERATIONS[gen_name].dims and all(shape):
            return Topology(name, gen_name, shape)
    sized = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if sized:
        gen_name = ALIASES.get(sized[1], sized[1])
        gen = GENERATIONS.get(gen_name)
        if gen is not None and int(sized[2]) % gen.cores_per_name_unit == 0:
            chips = int(sized[2]) // gen.cores_per_name_unit
            layouts = LAYOUTS_3D if gen.dims == 3 else LAYOUTS_2D
            if chips in layouts and chips <= MAX_CHIPS[gen_name]:
                return Topology(name, gen_name, tuple(int(s) for s in layouts[chips].split("x")))
    raise ConfigError(
        f"unknown TPU topology '{name}'; use one of {', '.join(known_names())} "
        "(v4/v5p count TensorCores, v5e/v6e count chips) or a layout like v5p:4x4x12"
    )


def _wrap(shape: tuple[int, ...], dims: int) -> tuple[bool, bool, bool]:
    """Torus wrap-around links: full pods of v4/v5p (every side a multiple of 4) and 16-wide v5e/v6e sides."""
    if dims == 3:
        full = len(shape) == 3 and all(s % 4 == 0 for s in shape)
        return (full, full, full)
    return (shape[0] == 16, shape[1] == 16, False)


def abstract_devices(topology: Topology, slices: int = 1) -> list:
    """Compile-only TPU devices of ``slices`` copies of ``topology`` (needs libtpu, not a TPU).

    With ``slices > 1`` each device carries a ``slice_index`` for multi-slice (DCN) meshes.
    """
    from jax.experimental import topologies

    gen = GENERATIONS[topology.generation]
    shape3 = topology.shape + (1,) * (3 - len(topology.shape))
    kwargs = {
        "chip_config_name": "megacore" if gen.megacore else "default",
        "chips_per_host_bounds": (1, 1, 1) if topology.chips == 1 else (2, 2, 1),
        "wrap": _wrap(shape3 if gen.dims == 3 else topology.shape, gen.dims),
    }
    if slices > 1:
        kwargs["num_slices"] = slices
    return list(topologies.get_topology_desc(topology.layout, platform="tpu", **kwargs).devices)


def has_libtpu() -> bool:
    """Whether libtpu can be imported (compile-only TPU devices need it, a TPU does not)."""
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):  # blocked (sys.modules entry None) or broken
        return False


def compile_only_environment(topology: Topology) -> None:
    """Keeps jax off the host's own accelerators and lets libtpu start without a TPU or metadata server."""
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Without these, libtpu logs warnings about a TPU host it does not need to find.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.cloud_name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
