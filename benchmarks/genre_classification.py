"""Genre of a Shakespeare passage: a small BERT from scratch against all-MiniLM-L6-v2 fine-tuned three ways.

    python benchmarks/genre_classification.py                        # every row, about an hour on 2 CPU cores
    python benchmarks/genre_classification.py --only minilm-lora train.steps=50
    python benchmarks/genre_classification.py --record minilm-full=/tmp/ft/minilm-full   # a finished run

Makes the data if it is missing (``python -m train.genre --out data/genre``), then trains each row
through the real ``python -m train`` in a fresh run directory and prints one JSON line per row:
parameters and trainable parameters, steps run, the best eval step, held-out accuracy and macro-F1
over every validation passage at that step (each row keeps its best checkpoint, so these are the
numbers ``python -m train.evaluate RUN --best`` prints), the majority-class rate (the accuracy of
always guessing the most common genre) and wall seconds. Arguments of the form ``key=value`` are
passed to every run as config overrides. ``--record NAME=RUN_DIR`` prints the line of a run
already trained (wall time unknown) instead of training one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FROZEN_LOWER = ["train.freeze=embed|pos_embed|type_embed|embed_norm", "train.freeze_layers=4"]
ROWS = {  # name -> (config, overrides)
    "bert-scratch": (
        "configs/genre-bert.yaml",
        ["train.eval_every=100", "checkpoint.keep_best=true", "checkpoint.best_metric=eval_macro_f1"],
    ),
    "minilm-full": ("configs/genre-minilm.yaml", []),
    "minilm-lora": ("configs/genre-minilm-lora.yaml", []),
    "minilm-frozen": ("configs/genre-minilm.yaml", FROZEN_LOWER),
}
DATA = REPO_ROOT / "data" / "genre"


def best_eval(evals: list[dict], config: dict) -> dict:
    """The eval record the run's best checkpoint holds: the first best on the early-stopping metric
    (else ``checkpoint.best_metric``; else the last eval), lower for losses, higher otherwise."""
    stopping, checkpoint = config["train"]["early_stopping"], config["checkpoint"]
    metric = stopping["metric"] or checkpoint["best_metric"]
    if not metric:
        return evals[-1]
    mode = stopping["mode"] if stopping["metric"] else checkpoint["best_mode"]
    sign = -1.0 if (mode or ("min" if "loss" in metric or "bpb" in metric else "max")) == "min" else 1.0
    return max(evals, key=lambda r: (sign * r[metric], -r["step"]))


# eval record key -> the name it has in a row, for classifiers and taggers
EVAL_FIELDS = {
    "eval_accuracy": "accuracy",
    "eval_macro_f1": "macro_f1",
    "eval_token_accuracy": "token_accuracy",
    "eval_token_macro_f1": "token_macro_f1",
    "eval_entity_f1": "entity_f1",
    "eval_loss": "eval_loss",
}


def record(name: str, run_dir: pathlib.Path) -> dict:
    """The JSON record of a finished run directory: its scores at the best eval step (classifier:
    accuracy, macro_f1; tagger: token_accuracy, token_macro_f1, entity_f1) and at the last one."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    train = [r for r in records if "loss" in r]
    best = best_eval(evals, config)
    first = next(r for r in train if "trainable_params" in r)
    scores = {field: round(best[key], 4) for key, field in EVAL_FIELDS.items() if key in best}
    headline = "macro_f1" if "eval_macro_f1" in best else "entity_f1"
    return {
        "run": name,
        "params": first["params"],
        "trainable_params": first["trainable_params"],
        "trainable_pct": round(100 * first["trainable_params"] / first["params"], 3),
        "steps": train[-1]["step"],
        "best_step": best["step"],
        **scores,
        f"final_{headline}": round(evals[-1][f"eval_{headline}"], 4),
        "step_ms": round(sum(r["step_ms"] for r in train[1:]) / max(len(train) - 1, 1), 1),
    }


def run(name: str, config: str, overrides: list[str], runs_dir: pathlib.Path) -> dict:
    """Trains ``config`` from scratch in ``runs_dir/name``; returns its JSON record."""
    run_dir = runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would be resumed, not re-measured
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    command = [sys.executable, "-m", "train", config, f"run.dir={run_dir}", "train.progress_bar=false", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"run": name, "config": config, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return {**record(name, run_dir), "config": config, "overrides": overrides, "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(ROWS), nargs="+", default=list(ROWS))
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "genre-benchmark"))
    parser.add_argument("--record", nargs="+", default=[], metavar="NAME=RUN_DIR", help="finished runs to report")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = parser.parse_args(argv)

    from train.data import genre

    if not (DATA / "train.jsonl").exists() or not (DATA / "val.jsonl").exists():
        genre.main(["--out", str(DATA)])
    val = [json.loads(line) for line in (DATA / "val.jsonl").read_text().splitlines()]
    label, rate = genre.majority_rate(val)
    baseline = {"val_examples": len(val), "majority_label": label, "majority_rate": round(rate, 4)}
    if args.record:
        for item in args.record:
            name, run_dir = item.split("=", 1)
            print(json.dumps({**record(name, pathlib.Path(run_dir)), **baseline}), flush=True)
        return
    for name in args.only:
        config, overrides = ROWS[name]
        result = run(name, config, [*overrides, *args.overrides], pathlib.Path(args.runs_dir))
        print(json.dumps({**result, **baseline}), flush=True)


if __name__ == "__main__":
    main()
