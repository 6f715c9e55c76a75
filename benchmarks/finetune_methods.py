"""Fine-tuning methods on the genre task with the shipped MiniLM (issue 21): full fine-tuning, LoRA and
the other PEFT methods, then adversarial training (FGM, PGD) and augmentation on top of the best.

    python benchmarks/finetune_methods.py                                   # full, lora; fgm, pgd, augment; 2 seeds
    python benchmarks/finetune_methods.py --methods full lora adapter prefix prompt --seeds 0
    python benchmarks/finetune_methods.py --methods --best lora --on-top fgm   # only the on-top rows
    python benchmarks/finetune_methods.py --val-examples 800 ...            # score on a fixed random 800 passages

Each row trains through the real ``python -m train`` (benchmarks/genre_classification.py ``run``) in a
fresh run directory and prints one JSON line: parameters, trainable parameters and their share, the
bytes of the final checkpoint step (adapter-only for the PEFT methods), accuracy and macro-F1 over
the validation passages at the best eval step, step time and wall seconds. The on-top rows reuse
the best method's config (highest mean macro-F1 over the seeds, or ``--best``) with one change each:
``train.adversarial.method=fgm`` / ``pgd`` (epsilon 0.05, PGD 2 steps of 0.03) or
``data.augment.swap=0.1 data.augment.delete=0.1``. ``key=value`` arguments (before the options) go to
every run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.genre_classification import DATA, run
from benchmarks.lora_checkpoint_size import step_bytes

MINILM, LORA = "configs/genre-minilm.yaml", "configs/genre-minilm-lora.yaml"
# name -> (config, overrides): each method's shipped genre config
METHODS = {
    "full": (MINILM, []),
    "lora": (LORA, []),
    **{name: (f"configs/genre-minilm-{name}.yaml", []) for name in ("adapter", "prefix", "prompt")},
}
# Cheapest first: an FGM step costs about 2 plain ones, a 2-step PGD step 3. Epsilon per row: 0.05, a
# twentieth of the default 1 (docs/fine-tuning.md): at 1 and 0.25 the classifier never left the uniform
# prediction on this task (benchmarks/README.md).
ON_TOP = {
    "augment": ["data.augment.swap=0.1", "data.augment.delete=0.1"],
    "fgm": ["train.adversarial.method=fgm", "train.adversarial.epsilon=0.05"],
    "pgd": [
        "train.adversarial.method=pgd",
        "train.adversarial.epsilon=0.05",
        "train.adversarial.steps=2",
        "train.adversarial.alpha=0.03",
    ],
}


def val_subset(n: int, out: pathlib.Path) -> list[str]:
    """Overrides scoring every run on the same ``n`` validation passages (a seed-0 sample); 0: all."""
    if n <= 0:
        return []
    rows = (DATA / "val.jsonl").read_text().splitlines()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(random.Random(0).sample(rows, min(n, len(rows)))) + "\n")
    return [f"data.val_files={out}"]


def measure(name: str, config: str, overrides: list[str], seed: int, runs_dir: pathlib.Path) -> dict:
    row = run(f"{name}-seed{seed}", config, [*overrides, f"seed={seed}"], runs_dir)
    if "error" not in row:
        row["checkpoint_bytes"] = step_bytes(runs_dir / f"{name}-seed{seed}")
    return {"method": name, "seed": seed, **row}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=["full", "lora"])
    parser.add_argument("--on-top", nargs="*", choices=list(ON_TOP), default=list(ON_TOP))
    parser.add_argument("--best", choices=list(METHODS), help="the method the on-top rows build on")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--val-examples", type=int, default=0, help="score on this many validation passages")
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "finetune-methods"))
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = parser.parse_args(argv)

    from train.data import genre

    if not (DATA / "train.jsonl").exists() or not (DATA / "val.jsonl").exists():
        genre.main(["--out", str(DATA)])
    runs_dir = pathlib.Path(args.runs_dir)
    common = [*val_subset(args.val_examples, runs_dir / "val.jsonl"), *args.overrides]
    f1 = {}
    for name in args.methods:
        config, overrides = METHODS[name]
        rows = [measure(name, config, [*overrides, *common], seed, runs_dir) for seed in args.seeds]
        for row in rows:
            print(json.dumps(row), flush=True)
        if all("macro_f1" in row for row in rows):
            f1[name] = statistics.mean(row["macro_f1"] for row in rows)
    best = args.best or max(f1, key=f1.get, default=None)
    if best is None:
        return
    config, overrides = METHODS[best]
    for extra in args.on_top:
        for seed in args.seeds:
            row = measure(f"{best}+{extra}", config, [*overrides, *ON_TOP[extra], *common], seed, runs_dir)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
