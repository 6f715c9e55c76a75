"""Knowledge distillation: a student taught by a bigger teacher against the same student trained alone.

    python benchmarks/distill.py lm                      # the plays: 3x teacher, default student alone vs distilled
    python benchmarks/distill.py genre --teacher RUN     # a fine-tuned MiniLM teaches a 3-layer student
    python benchmarks/distill.py overhead --teacher RUN  # step time with / without the teacher, one process
    python benchmarks/distill.py report RUN [RUN ...]    # the JSON line of runs made by hand

``lm`` trains the teacher (``configs/default.yaml`` at d_model 192, 6 layers, 6 heads, d_ff 768:
3.09M parameters against the student's 1.05M) unless ``--teacher`` names one, then the default
student for ``--steps`` steps alone and distilled (same seed, data order and schedule).
``genre`` starts a ``--layers``-layer student from the teacher's lower layers
(``checkpoint.init_layers=lower``) and fine-tunes it alone and distilled. Every run goes through
the real ``python -m train`` in a fresh directory under ``--runs-dir``; each prints one JSON line
with the held-out metrics of its final eval, parameters (also without the token embeddings),
steps, the mean step time and the distillation settings. ``overhead`` times the jitted step of
the student with and without the teacher, alternating blocks of steps in one process, so load
from other processes hits both alike. Arguments ``key=value`` are config overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TEACHER = ["model.d_model=192", "model.n_layers=6", "model.n_heads=6", "model.d_ff=768"]  # about 3x the default
GENRE = "configs/genre-minilm.yaml"


def params(run_dir: pathlib.Path) -> tuple[int, int]:
    """(parameters, parameters less the token and position embeddings) of the model in a run's config.yaml."""
    import yaml
    from flax import nnx, traverse_util

    from models import abstract_model
    from models.config import ModelConfig

    cfg = ModelConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())["model"])
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_model(cfg)[1]))
    total = sum(x.size for x in flat.values())
    embeddings = sum(x.size for p, x in flat.items() if p[0] in ("embed", "pos_embed", "type_embed"))
    return total, total - embeddings


def report(run_dir: pathlib.Path, name: str = "", wall_s: float | None = None) -> dict:
    """The JSON record of a finished run: its final eval, size, steps, step time and distillation settings."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals, train = [r for r in records if "eval_loss" in r], [r for r in records if "loss" in r]
    total, no_embed = params(run_dir)
    out = {"run": name or run_dir.name, "dir": str(run_dir), "params": total, "params_no_embeddings": no_embed}
    out.update({k: round(v, 4) for k, v in evals[-1].items() if k != "step"})
    out["steps"] = evals[-1]["step"]
    out["step_ms"] = round(statistics.mean(r["step_ms"] for r in train[1:]), 1) if len(train) > 1 else None
    if config.get("distill", {}).get("teacher"):
        out["distill"] = config["distill"]
        out["final_hard_loss"], out["final_distill_loss"] = train[-1]["hard_loss"], train[-1]["distill_loss"]
    if wall_s is not None:
        out["wall_s"] = round(wall_s, 1)
    out["load_1min"] = round(os.getloadavg()[0], 2)
    return out


def train(name: str, config: str, runs_dir: pathlib.Path, overrides: list[str]) -> dict:
    """Trains ``config`` in a fresh ``runs_dir/name``; returns its ``report``."""
    run_dir = runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run would be resumed, not re-measured
    command = [sys.executable, "-m", "train", config, f"run.dir={run_dir}", "train.progress_bar=false", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"run": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return report(run_dir, name, time.perf_counter() - start)


def distill_args(teacher: str, args) -> list[str]:
    return [f"distill.teacher={teacher}", f"distill.temperature={args.temperature}", f"distill.alpha={args.alpha}"]


def lm(args) -> None:
    runs = pathlib.Path(args.runs_dir)
    teacher = args.teacher
    if not teacher:
        teacher_steps = [f"train.steps={args.teacher_steps}", f"train.eval_every={args.teacher_steps}"]
        print(json.dumps(train("teacher", "configs/default.yaml", runs, [*TEACHER, *teacher_steps, *args.overrides])))
        teacher = str(runs / "teacher")
    common = [f"train.steps={args.steps}", f"train.eval_every={args.steps}", "checkpoint.every=0", *args.overrides]
    print(json.dumps(train("student-alone", "configs/default.yaml", runs, common)), flush=True)
    distilled = train("student-distilled", "configs/default.yaml", runs, [*common, *distill_args(teacher, args)])
    print(json.dumps(distilled), flush=True)


def genre(args) -> None:
    if not args.teacher:
        sys.exit(
            "error: genre needs --teacher RUN (a fine-tuned MiniLM run: python -m train configs/genre-minilm.yaml)"
        )
    runs = pathlib.Path(args.runs_dir)
    student = [
        f"model.n_layers={args.layers}",
        f"checkpoint.init_from={args.teacher}",
        "checkpoint.init_layers=lower",
        f"train.steps={args.steps}",
        *args.overrides,
    ]
    print(json.dumps(train(f"student{args.layers}-alone", GENRE, runs, student)), flush=True)
    distilled = train(f"student{args.layers}-distilled", GENRE, runs, [*student, *distill_args(args.teacher, args)])
    print(json.dumps(distilled), flush=True)


def overhead(args) -> None:
    """Median step time of the student with and without the teacher, in alternating blocks."""
    import jax

    from train.config.sections import load_config
    from train.core.step import make_train_step
    from train.data.tasks import global_batch
    from train.run.loop import fresh_state, prepare

    config = load_config(args.config, [*distill_args(args.teacher, args), *args.overrides])
    setup = prepare(config)
    batch = global_batch(setup.task.batch(next(setup.task.batches), 0), setup.mesh)
    steps = {
        "alone": (make_train_step(setup.spec, setup.mesh, 1, config.seed), ()),
        "distilled": (make_train_step(setup.spec, setup.mesh, 1, config.seed, setup.teacher), (setup.teacher_params,)),
    }
    states = {name: fresh_state(setup) for name in steps}
    times = {name: [] for name in steps}
    for block in range(args.blocks + 1):  # block 0 compiles and warms up
        for name, (step, extra) in steps.items():
            for _ in range(args.block_steps):
                start = time.perf_counter()
                states[name], metrics = step(states[name], batch, *extra)
                jax.block_until_ready(metrics)
                if block:
                    times[name].append(time.perf_counter() - start)
    alone, distilled = statistics.median(times["alone"]), statistics.median(times["distilled"])
    record = {"config": args.config, "teacher": args.teacher, "steps_each": len(times["alone"])}
    record |= {"alone_step_ms": round(1000 * alone, 1), "distilled_step_ms": round(1000 * distilled, 1)}
    record |= {"overhead": round(distilled / alone, 3), "load_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["lm", "genre", "overhead", "report"])
    parser.add_argument("runs", nargs="*", help="report: run directories; else config overrides (key=value)")
    parser.add_argument("--teacher", default="", help="a teacher run (lm: trained when empty)")
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "distill-benchmark"))
    parser.add_argument("--teacher-steps", type=int, default=700)
    parser.add_argument("--steps", type=int, default=400, help="student steps (genre: e.g. 100)")
    parser.add_argument("--layers", type=int, default=3, help="genre: student layers")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--config", default="configs/default.yaml", help="overhead: the student's config")
    parser.add_argument("--blocks", type=int, default=5, help="overhead: timed blocks per variant")
    parser.add_argument("--block-steps", type=int, default=4, help="overhead: steps per block")
    args = parser.parse_args(argv)
    if args.what == "report":
        for run_dir in args.runs:
            print(json.dumps(report(pathlib.Path(run_dir))), flush=True)
        return
    args.overrides = args.runs
    {"lm": lm, "genre": genre, "overhead": overhead}[args.what](args)


if __name__ == "__main__":
    main()
