"""Convert between Hugging Face model directories and our Orbax checkpoints.

    python -m models.hf import HF_DIR OUT_DIR
        Writes OUT_DIR/0/{state,config} in the layout of a run's ``checkpoints/`` directory
        (state = {"params": ...}, config = the run config with the imported model), plus
        OUT_DIR/config.yaml: ``python -m train OUT_DIR/config.yaml run.dir=...`` fine-tunes it
        (its checkpoint.init_from points at OUT_DIR).
    python -m models.hf export SRC OUT_DIR [--tokenizer DIR]
        SRC: a run directory, its checkpoints/ directory or an import's OUT_DIR; the newest
        step is written as OUT_DIR/{config.json, model.safetensors} for transformers.

User errors print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see python -m models.hf --help)", file=sys.stderr)
        raise SystemExit(2)


def import_checkpoint(hf_dir: str, out_dir: str) -> pathlib.Path:
    import yaml
    from flax import nnx

    from models.hf import load
    from train.checkpoint import Checkpoints
    from train.config import CheckpointConfig, Config

    out = pathlib.Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass a new output directory")
    model, cfg = load(hf_dir)
    config = dataclasses.replace(Config(), model=cfg, checkpoint=CheckpointConfig(init_from=str(out)))
    checkpoints = Checkpoints(out, CheckpointConfig(async_save=False))
    checkpoints.save(0, {"params": nnx.state(model, nnx.Param)}, {}, config.to_dict())
    checkpoints.close()
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return out


def export_checkpoint(src: str, out_dir: str, tokenizer: str | None) -> pathlib.Path:
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from models import build_model
    from models.config import ModelConfig
    from models.hf import export
    from train.checkpoint import params_only

    directory = pathlib.Path(src).absolute()
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{src} is not a directory; pass a run directory or an import's output")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory} holds no complete checkpoint")
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in saved.get("model", {}).items() if k in fields})
    _, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    params = params_only(directory, target)
    return export(params, cfg, out_dir, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m models.hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    imp = commands.add_parser("import", help="Hugging Face directory -> Orbax checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    exp = commands.add_parser("export", help="run or checkpoint directory -> Hugging Face directory")
    exp.add_argument("src")
    exp.add_argument("out_dir")
    exp.add_argument("--tokenizer", default=None, help="a tokenizer directory to write alongside")
    args = parser.parse_args(argv)

    from models.hf.common import ConversionError
    from train.config import ConfigError

    try:
        if args.command == "import":
            out = import_checkpoint(args.hf_dir, args.out_dir)
        else:
            out = export_checkpoint(args.src, args.out_dir, args.tokenizer)
    except (ConversionError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
