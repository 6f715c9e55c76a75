"""Bytes on disk of a LoRA run's checkpoint against the same run's without LoRA: one JSON object per preset.

    PYTHONPATH=. python benchmarks/lora_checkpoint_size.py                        # default GPT, r=8
    PYTHONPATH=. python benchmarks/lora_checkpoint_size.py --preset genre-minilm  # needs data/genre

Trains each preset twice for ``--steps`` steps (a plain run, then ``lora.rank=--rank`` from the
plain run's checkpoint through ``checkpoint.init_from``) and sums the files of the step directory
each saved. A LoRA checkpoint holds the adapters (plus a classifier's head), their optimizer
state and a reference to the base (train/checkpoints/adapters.py); the plain one the whole model and its
AdamW moments.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def step_bytes(run_dir: pathlib.Path) -> int:
    """Bytes of the files of the newest step directory of ``run_dir``."""
    step = max((p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return sum(f.stat().st_size for f in step.rglob("*") if f.is_file())


def measure(preset: str, steps: int, rank: int, root: pathlib.Path) -> dict:
    from train.config.sections import load_config
    from train.run.loop import run

    path = pathlib.Path(preset) if pathlib.Path(preset).is_file() else REPO_ROOT / "configs" / f"{preset}.yaml"
    common = [f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0"]
    common += ["train.log_every=1", f"checkpoint.every={steps}", "checkpoint.async_save=false"]
    plain, lora = root / "plain", root / "lora"
    run(load_config(path, [*common, f"run.dir={plain}"]))
    run(load_config(path, [*common, f"run.dir={lora}", f"lora.rank={rank}", f"checkpoint.init_from={plain}"]))
    full, adapters = step_bytes(plain), step_bytes(lora)
    return {"preset": preset, "lora_rank": rank, "full_bytes": full, "lora_bytes": adapters, "ratio": adapters / full}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", help="a config name in configs/ or a YAML path")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args(argv)
    root = pathlib.Path(tempfile.mkdtemp(prefix="meshlm-lora-size-"))
    try:
        print(json.dumps(measure(args.preset, args.steps, args.rank, root)), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
