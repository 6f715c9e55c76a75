"""Pruning a trained run: held-out eval_bpb against sparsity, before and after a short recovery
fine-tune, and the size of each export; one JSON object per line per point, and a PNG.

    PYTHONPATH=. python benchmarks/prune.py SOURCE --work DIR [--steps 100] [--magnitude 0,0.5] \
        [--neurons 0.5] [--heads 0.5] [--png benchmarks/figures/prune.png]
    PYTHONPATH=. python benchmarks/prune.py --plot DIR/points.jsonl --png FILE   # redraw only
    PYTHONPATH=. python benchmarks/prune.py --speed DIR/none-0,DIR/magnitude-0.9,DIR/neurons-0.5

Each point: ``python -m train.prune SOURCE`` (method, sparsity; magnitude with ``--scope global``)
writes an export, ``train.evaluate`` scores it on ``--files`` (the default run's held-out plays),
then ``configs/default.yaml`` fine-tunes it for ``--steps`` steps (``checkpoint.init_from``, the
smaller sizes, AdamW at ``--lr`` with a cosine schedule after 10% warm-up; magnitude points keep
their masks fixed with a one-shot ``prune:`` at step 0, which finds exactly the zeros of the export)
and ``train.evaluate`` scores the result. Sparsity 0 is the control: the unpruned model fine-tuned
with the same recipe, so it gets the same extra steps.

``--speed`` times the jitted forward pass (batch 8 x 128 tokens, the default run's train batch) of
each export, the exports' calls alternating so they see the same CPU load; median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FILES = "data/shakespeare/hamlet.txt,data/shakespeare/twelfth_night.txt"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="", help="a run of configs/default.yaml (or its export)")
    p.add_argument("--work", default="", help="directory for the exports, the fine-tunes and points.jsonl")
    p.add_argument("--files", default=FILES, help="held-out text files for eval_bpb")
    p.add_argument("--tokenizer", default=str(REPO_ROOT / "data/tokenizers/shakespeare-bpe-2048"))
    p.add_argument("--steps", type=int, default=100, help="recovery fine-tune steps (0: none)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--magnitude", default="0,0.1,0.3,0.5,0.7,0.9", help="sparsities (0: the unpruned control)")
    p.add_argument("--neurons", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--heads", default="0.25,0.5,0.75")
    p.add_argument("--plot", default="", help="only redraw the PNG from this points.jsonl")
    p.add_argument("--png", default="", help="write the sparsity / eval_bpb plot here")
    p.add_argument("--speed", default="", help="only time the forward pass of these exports (comma-separated)")
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


def _bpb(source: pathlib.Path, args) -> float:
    from train import evaluate

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate.main([str(source), "--files", args.files, "--tokenizer", args.tokenizer]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])["eval_bpb"]


def _disk(directory: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in (directory / "params").rglob("*") if f.is_file())


def _recover(export: pathlib.Path, run_dir: pathlib.Path, record: dict, args, log) -> float:
    """Fine-tunes ``export`` for ``args.steps`` steps in ``run_dir``; returns the seconds it took."""
    from train.compress.pruning import recovery_overrides
    from train.config.sections import load_config
    from train.run.loop import run

    overrides = [
        f"run.dir={run_dir}", f"checkpoint.init_from={export}", f"train.steps={args.steps}",
        f"optimizer.lr={args.lr}", f"optimizer.warmup_steps={max(args.steps // 10, 1)}", "train.eval_every=0",
        "train.eval_batches=1", "train.sample_tokens=0", "train.progress_bar=false", "checkpoint.every=0",
        *recovery_overrides(record).split(),
    ]  # fmt: skip
    if record["method"] == "magnitude" and record["sparsity"] > 0:
        overrides += [f"prune.sparsity={record['sparsity']}", "prune.scope=global"]
    start = time.perf_counter()
    with contextlib.chdir(REPO_ROOT), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run(load_config(REPO_ROOT / "configs" / "default.yaml", overrides))
    return time.perf_counter() - start


def point(method: str, sparsity: float, args, work: pathlib.Path, log) -> dict:
    from benchmarks.common import machine
    from train.checkpoints.exporting import export
    from train.compress.pruning import prune_source

    name = f"{method}-{sparsity:g}"
    out = work / name
    record = {"method": "none" if sparsity == 0 else method, "sparsity": sparsity}
    done = {"method": "none", "sparsity": 0.0}
    if sparsity == 0:
        export(pathlib.Path(args.source), out)
    else:
        done = prune_source(pathlib.Path(args.source), out, method, sparsity)
        record |= {k: done[k] for k in ("params_after", "d_ff", "n_heads") if k in done}
    record["disk_bytes"] = _disk(out)
    record["eval_bpb_pruned"] = _bpb(out, args)
    if args.steps:
        seconds = _recover(out, work / f"{name}-recovered", done, args, log)
        record |= {"recovery_steps": args.steps, "recovery_s": round(seconds, 1)}
        record["eval_bpb_recovered"] = _bpb(work / f"{name}-recovered", args)
    return {**record, **machine()}


def speed(exports: list[str], repeats: int) -> None:
    import statistics

    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.common import machine
    from train.checkpoints.sources import load_source

    tokens = np.random.default_rng(0).integers(0, 2048, (8, 128))
    calls = {}
    for path in exports:
        graphdef, params = nnx.split(load_source(path).model)
        calls[path] = (jax.jit(lambda p, x, g=graphdef: nnx.merge(g, p)(x)), params)
    times = {path: [] for path in exports}
    for _ in range(repeats + 1):  # the first call of each compiles
        for path, (fn, params) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, tokens))
            times[path].append(time.perf_counter() - start)
    base = statistics.median(times[exports[0]][1:])
    for path, (_, params) in calls.items():
        ms = statistics.median(times[path][1:])
        zeros = sum(int((x == 0).sum()) for x in jax.tree.leaves(params))
        record = {"export": pathlib.Path(path).name, "forward_ms": round(1000 * ms, 2), "vs_first": round(ms / base, 3)}
        print(
            json.dumps({**record, "params": sum(x.size for x in jax.tree.leaves(params)), "zeros": zeros, **machine()})
        )


def plot(points: list[dict], png: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    control = [p for p in points if p["method"] == "none"]
    for method, color in (("magnitude", "tab:blue"), ("neurons", "tab:orange"), ("heads", "tab:green")):
        pts = sorted(control + [p for p in points if p["method"] == method], key=lambda p: p["sparsity"])
        if len(pts) <= len(control):
            continue
        xs = [p["sparsity"] for p in pts]
        ax.plot(xs, [p["eval_bpb_pruned"] for p in pts], "--o", color=color, label=f"{method}, pruned")
        done = [p for p in pts if "eval_bpb_recovered" in p]
        if len(done) > 1:
            steps = done[0]["recovery_steps"]
            ax.plot(
                [p["sparsity"] for p in done],
                [p["eval_bpb_recovered"] for p in done],
                "-s",
                color=color,
                label=f"{method}, +{steps} steps",
            )
    ax.set_xlabel("sparsity (share of weights zeroed / neurons or heads removed)")
    ax.set_ylabel("held-out eval_bpb (Hamlet, Twelfth Night)")
    ax.set_title("Pruning the default run (1.07M params, 1,400 steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.speed:
        speed(args.speed.split(","), args.repeats)
        return
    if args.plot:
        points = [json.loads(line) for line in pathlib.Path(args.plot).read_text().splitlines() if line]
        plot(points, pathlib.Path(args.png))
        return
    work = pathlib.Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    todo = [(m, float(s)) for m in ("magnitude", "neurons", "heads") for s in getattr(args, m).split(",") if s]
    points = []
    with open(work / "runs.log", "a") as log, open(work / "points.jsonl", "a") as jsonl:
        for method, sparsity in todo:
            record = point(method, sparsity, args, work, log)
            points.append(record)
            print(json.dumps(record), flush=True)
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()
    if args.png:
        plot(points, pathlib.Path(args.png))


if __name__ == "__main__":
    main()
