"""Will this run fit on that TPU slice? Compile the real train step for it, from any host.

    python -m train.plan CONFIG.yaml topology=v5p-256 [slices=N] [section.key=value ...]

Builds the mesh, the abstract train state and the jitted train step with the same functions
training uses, lowers the step against ShapeDtypeStructs (state + a batch of int32
[train.batch_size, train.seq_len]) and compiles it with libtpu for compile-only devices of the
topology (names: see ``sharding.topology``). Prints a per-chip memory table and a verdict.
The compiler is the authority: a plan fits when XLA compiles it, and does not when XLA
answers RESOURCE_EXHAUSTED for HBM.

``slices=N`` plans a multi-slice run (N copies of the topology joined over DCN): the mesh's
``dcn_data * dcn_fsdp`` must equal N; when both are 1, ``dcn_data`` is set to N. Without
``slices=``, the config's own ``dcn_data * dcn_fsdp`` is the number of slices.

Exit status: 0 fits, 1 does not fit, 2 bad input (one ``error:`` line on stderr).
Needs libtpu (``pip install -e '.[tpu]'``) but no TPU; the host's own devices are not used.
"""

from __future__ import annotations

import sys

from sharding.topology import compile_only_environment, has_libtpu, parse_topology
from train import cli
from train.config.sections import ConfigError, load_config
from train.core.planning import format_plan, make_plan, multislice_mesh

USAGE = "usage: python -m train.plan CONFIG.yaml topology=NAME [slices=N] [section.key=value ...]"


def _parse_args(argv: list[str]) -> tuple[str, str, int | None, list[str]]:
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        raise ConfigError(f"the first argument must be a config file; {USAGE}")
    path, topology, slices, overrides = argv[0], "", None, []
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        if key == "topology":
            topology = value
        elif key == "slices":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"slices must be a positive integer, got '{value}'")
            slices = int(value)
        else:
            overrides.append(arg)
    if not topology:
        raise ConfigError(f"no topology given; add topology=NAME (e.g. topology=v5e-8); {USAGE}")
    return path, topology, slices, overrides


def main(argv: list[str] | None = None) -> int:

    def command() -> int:
        path, name, slices, overrides = _parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(path, overrides)
        topology = parse_topology(name)
        if slices is None:  # the config's own multi-slice layout
            slices = cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp
        if not has_libtpu():
            raise ConfigError("libtpu is not installed, and TPU plans compile with it; run pip install -e '.[tpu]'")
        compile_only_environment(topology)
        plan = make_plan(cfg, topology, slices)
        print(format_plan(plan, multislice_mesh(cfg, slices), path))
        return 0 if plan.fits else 1

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
