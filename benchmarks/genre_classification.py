"""Genre of a Shakespeare passage: pretrained MiniLM fine-tuned vs a small BERT from scratch.

    python benchmarks/genre_classification.py                      # both, about 15 minutes on 2 CPU cores
    python benchmarks/genre_classification.py --only minilm train.steps=50

Makes the data if it is missing (``python -m train.genre --out data/genre``), then trains each
config through the real ``python -m train`` in a fresh run directory and prints one JSON line
per run: held-out accuracy and macro-F1 over every validation passage, the majority-class rate
(the accuracy of always guessing the most common genre), steps, wall seconds, parameters.
Arguments of the form ``key=value`` are passed to every run as config overrides.
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

RUNS = {"minilm": "configs/genre-minilm.yaml", "bert-scratch": "configs/genre-bert.yaml"}
DATA = REPO_ROOT / "data" / "genre"


def model_params(run_dir: pathlib.Path) -> int:
    """Parameters of the model in a run's resolved config.yaml."""
    import yaml

    from models.config import ModelConfig
    from train.state import abstract_model, count_params

    model = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    return count_params(abstract_model(ModelConfig(**model))[1])


def run(name: str, config: str, runs_dir: pathlib.Path, overrides: list[str]) -> dict:
    """Trains ``config`` from scratch in ``runs_dir/name``; returns the JSON record of the result."""
    run_dir = runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would be resumed, not re-measured
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    command = [sys.executable, "-m", "train", config, f"run.dir={run_dir}", "train.progress_bar=false", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"run": name, "config": config, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval_accuracy" in r][-1]
    train = [r for r in records if "loss" in r]
    return {
        "run": name,
        "config": config,
        "accuracy": round(final["eval_accuracy"], 4),
        "macro_f1": round(final["eval_macro_f1"], 4),
        "eval_loss": round(final["eval_loss"], 4),
        "steps": final["step"],
        "wall_s": round(wall, 1),
        "step_ms": round(sum(r["step_ms"] for r in train[1:]) / max(len(train) - 1, 1), 1),
        "params": model_params(run_dir),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(RUNS), nargs="+", default=list(RUNS))
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "genre-benchmark"))
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = parser.parse_args(argv)

    from train.data import genre

    if not (DATA / "train.jsonl").exists() or not (DATA / "val.jsonl").exists():
        genre.main(["--out", str(DATA)])
    val = [json.loads(line) for line in (DATA / "val.jsonl").read_text().splitlines()]
    label, rate = genre.majority_rate(val)
    baseline = {"val_examples": len(val), "majority_label": label, "majority_rate": round(rate, 4)}
    for name in args.only:
        record = run(name, RUNS[name], pathlib.Path(args.runs_dir), args.overrides)
        print(json.dumps({**record, **baseline}), flush=True)


if __name__ == "__main__":
    main()
