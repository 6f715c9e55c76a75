"""``python -m train.export RUN_DIR OUT_DIR``: a run's newest parameters, for inference or sharing.

Writes ``OUT_DIR/params`` (an Orbax StandardCheckpointer tree of fp32 arrays, nested dicts
keyed like the model's parameters) and ``OUT_DIR/model.json`` (the ``ModelConfig``). No
optimizer state, data position or run config. ``load(OUT_DIR)`` reads both back.
User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

USAGE = "usage: python -m train.export RUN_DIR OUT_DIR"


def _model_config(saved: dict, where: str):
    from models.config import ModelConfig
    from train.config import ConfigError

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise ConfigError(
            f"{where} has model fields this version does not know ({', '.join(unknown)}); use a matching meshlm"
        )
    return ModelConfig(**saved)


def _cpu_target(model_cfg):
    import jax

    from train.state import abstract_model

    device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    _, abstract = abstract_model(model_cfg)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def export(run_dir: pathlib.Path, out_dir: pathlib.Path) -> int:
    """Writes ``run_dir``'s newest intact parameters to ``out_dir``; returns the step exported."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from train.checkpoint import newest_params
    from train.config import ConfigError

    out_dir = pathlib.Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"OUT_DIR '{out_dir}' exists and is not empty; choose a new directory")
    step, params, config = newest_params(
        run_dir, lambda saved: _cpu_target(_model_config(saved.get("model", {}), str(run_dir))), what="RUN_DIR"
    )
    model_cfg = _model_config(config["model"], str(run_dir))

    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "params", nnx.to_pure_dict(params))
        checkpointer.wait_until_finished()
    (out_dir / "model.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n")
    return step


def load(out_dir: pathlib.Path):
    """(ModelConfig, params nnx.State of fp32 arrays on the default device) from an export."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from train.config import ConfigError
    from train.state import abstract_model

    out_dir = pathlib.Path(out_dir).absolute()
    if not (out_dir / "model.json").is_file() or not (out_dir / "params").is_dir():
        raise ConfigError(f"'{out_dir}' is not an export (no model.json and params/); run python -m train.export")
    model_cfg = _model_config(json.loads((out_dir / "model.json").read_text()), str(out_dir / "model.json"))
    _, abstract = abstract_model(model_cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(abstract))
    with ocp.StandardCheckpointer() as checkpointer:
        pure = checkpointer.restore(out_dir / "params", target)
    nnx.replace_by_pure_dict(abstract, pure)
    return model_cfg, abstract


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from train.config import ConfigError

    try:
        step = export(pathlib.Path(argv[0]), pathlib.Path(argv[1]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} of {argv[0]} to {argv[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
