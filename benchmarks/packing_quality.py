"""Packed vs padded quality: the same task trained for the same epochs with ``data.packing`` on and off.

    PYTHONPATH=. python benchmarks/packing_quality.py configs/speakers-bert.yaml 2 0,1
    PYTHONPATH=. python benchmarks/packing_quality.py configs/genre-bert.yaml 1 0 --only packed

For each seed and each of packed / padded, trains ``config`` from scratch through the real
``python -m train`` in a fresh run directory for ``epochs`` epochs of training examples and prints
one JSON line: steps, wall seconds (the whole process), train seconds (the logged step times),
real tokens per second of training (tokens of examples, not padding, over the train seconds),
the padding fraction the run's first line reports, and the last eval's metrics (``eval_loss`` and
every other ``eval_*``: entity F1 and token macro F1 for token classification, accuracy and macro
F1 for classification). ``train.epochs`` counts examples over ``train.batch_size`` rows a step,
which a packed row (several examples) overshoots; so the steps of an epoch are counted here, as
the batches of the run's own packed pipeline that hold ``epochs`` x the training examples.
Arguments ``key=value`` after the seeds are config overrides for every run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.packing import real_tokens

PADDING = re.compile(r"padding ([0-9.]+)% of the computed tokens")


def epoch_plan(config_path: str, packing: bool, epochs: float, overrides: list[str]) -> dict:
    """Steps covering ``epochs`` epochs of the training examples, and their real tokens, fed as the run feeds."""
    from train.config.sections import load_config
    from train.data.tasks import make_task, vocab_needed
    from train.data.tokenizer import load_tokenizer
    from train.run.loop import resolve_model

    config = load_config(REPO_ROOT / config_path, [*overrides, f"data.packing={str(packing).lower()}"])
    tokenizer = load_tokenizer(config.data.tokenizer)
    task = make_task(config, resolve_model(config.model, vocab_needed(config, tokenizer)), tokenizer)
    wanted, seen, tokens = epochs * task.train_examples, 0, 0
    for steps in itertools.count(1):
        batch_tokens, batch_examples = real_tokens(next(task.batches))
        seen, tokens = seen + batch_examples, tokens + batch_tokens
        if seen >= wanted:
            return {"steps": steps, "examples": seen, "real_tokens": tokens, "train_examples": task.train_examples}
    raise AssertionError("unreachable")


def record(run_dir: pathlib.Path, log: str, plan: dict) -> dict:
    """The JSON row of a finished run: steps, times, padding, last eval."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "step_ms" in r]
    evals = [r for r in records if "eval_loss" in r]
    logged = [(b["step"] - a["step"]) * b["step_ms"] for a, b in itertools.pairwise([{"step": 0}, *train])]
    train_s = sum(logged) / 1000
    padding = PADDING.search(log)
    row = {
        "steps": train[-1]["step"] if train else 0,
        "examples": plan["examples"],
        "train_s": round(train_s, 1),
        "real_tokens_per_s": round(plan["real_tokens"] / train_s, 1) if train_s else None,
        "padding_fraction": round(float(padding.group(1)) / 100, 4) if padding else None,
        "final_loss": round(train[-1]["loss"], 4) if train else None,
    }
    last = evals[-1] if evals else {}
    row.update({k: round(v, 4) for k, v in last.items() if k.startswith("eval_") and isinstance(v, float)})
    return row


def run(config: str, packing: bool, seed: int, epochs: float, overrides: list[str], runs_dir: pathlib.Path) -> dict:
    """Trains ``config`` for ``epochs`` epochs (packed or padded, ``seed``) in a fresh run directory."""
    name = f"{'packed' if packing else 'padded'}-seed{seed}"
    run_dir = runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would be resumed, not re-measured
    plan = epoch_plan(config, packing, epochs, [f"seed={seed}", *overrides])
    steps = plan["steps"]
    command = [
        sys.executable, "-m", "train", config, f"run.dir={run_dir}", f"seed={seed}",
        f"data.packing={str(packing).lower()}", f"train.steps={steps}", "train.epochs=0",
        f"train.eval_every={steps}", f"checkpoint.every={steps}", "train.progress_bar=false", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    head = {"config": config, "run": name, "packing": packing, "seed": seed, "epochs": epochs}
    if done.returncode != 0:
        return {**head, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    log = done.stdout + done.stderr
    (run_dir / "benchmark.log").write_text(log)
    return {**head, **record(run_dir, log, plan), "wall_s": round(wall, 1), "load_1min": round(os.getloadavg()[0], 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("epochs", type=float)
    p.add_argument("seeds", help="comma-separated, e.g. 0,1")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    p.add_argument("--only", choices=["packed", "padded"], nargs="+", default=["packed", "padded"])
    p.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "packing-quality"))
    args = p.parse_args(argv)
    runs_dir = pathlib.Path(args.runs_dir) / pathlib.Path(args.config).stem
    for seed in (int(s) for s in args.seeds.split(",")):
        for mode in args.only:
            print(
                json.dumps(run(args.config, mode == "packed", seed, args.epochs, args.overrides, runs_dir)), flush=True
            )


if __name__ == "__main__":
    main()
