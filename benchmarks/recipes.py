"""Issue 19's recipes: does the pre-trained MiniLM beat a BERT trained from scratch, by more than the seeds differ?

    python benchmarks/recipes.py --task speakers                        # scratch and minilm, seeds 0 1
    python benchmarks/recipes.py --task genre --rows scratch minilm lora --seeds 0 1 2
    python benchmarks/recipes.py train.epochs=2 --task genre --rows minilm   # overrides before the options
    python benchmarks/recipes.py --task genre --summarize a.jsonl b.jsonl     # the summary of rows run apart

Each (row, seed) trains one shipped config through the real ``python -m train`` in a fresh run
directory (benchmarks/genre_classification.py ``run``) and prints its JSON line: the scores at the
best eval step (genre: macro-F1 over a fixed seed-0 sample of ``--val-examples`` validation passages,
the sample finetune_methods.py scores on; speakers: exact-span entity F1 over the four held-out
plays), steps, step time and wall seconds. Then one summary line per row (the headline score of each
seed, their mean and spread) and a verdict: the best pre-trained row's mean minus scratch's, and
whether it is more than either row's spread (max - min over the seeds). ``key=value`` arguments go
to every run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.finetune_methods import val_subset
from benchmarks.genre_classification import ROWS as GENRE_ROWS
from benchmarks.genre_classification import run

# task -> (headline score, {row -> (config, overrides)}); "scratch" is the baseline
TASKS = {
    "genre": (
        "macro_f1",
        {
            "scratch": GENRE_ROWS["bert-scratch"],
            "minilm": ("configs/genre-minilm.yaml", []),
            "lora": ("configs/genre-minilm-lora.yaml", []),
        },
    ),
    "speakers": (
        "entity_f1",
        {"scratch": ("configs/speakers-bert.yaml", []), "minilm": ("configs/speakers-minilm.yaml", [])},
    ),
}


def summary(rows: dict[str, list[dict]], score: str) -> list[dict]:
    """One line per row (mean, min, max of ``score`` over its seeds), then the verdict against scratch."""
    lines, means, spreads = [], {}, {}
    for name, results in rows.items():
        values = [r[score] for r in results if score in r]
        if not values:
            continue
        means[name], spreads[name] = statistics.mean(values), max(values) - min(values)
        lines.append(
            {
                "row": name,
                score: [round(v, 4) for v in values],
                "mean": round(means[name], 4),
                "spread": round(spreads[name], 4),
            }
        )
    pretrained = {name: mean for name, mean in means.items() if name != "scratch"}
    if "scratch" in means and pretrained:
        best = max(pretrained, key=pretrained.get)
        margin = means[best] - means["scratch"]
        lines.append(
            {
                "best": best,
                "margin": round(margin, 4),
                "beats_scratch_beyond_spread": margin > max(spreads[best], spreads["scratch"]),
            }
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--rows", nargs="+", help="rows of the task (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--val-examples", type=int, default=1000, help="genre: score on this many passages (0: all)")
    parser.add_argument("--runs-dir", default=str(REPO_ROOT / "runs" / "recipes"))
    parser.add_argument("--summarize", nargs="+", metavar="JSONL", help="print the summary of these outputs' rows")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    args = parser.parse_args(argv)

    score, table = TASKS[args.task]
    unknown = sorted(set(args.rows or []) - set(table))
    if unknown:
        parser.error(f"--rows {' '.join(unknown)}: not a row of --task {args.task}; its rows: {' '.join(table)}")
    missing = [path for path in args.summarize or [] if not pathlib.Path(path).is_file()]
    if missing:
        parser.error(f"--summarize {' '.join(missing)}: no such file (the JSON lines a run of this script printed)")
    rows = {}
    if args.summarize:
        for path in args.summarize:
            for line in map(json.loads, pathlib.Path(path).read_text().splitlines()):
                if line.get("task") == args.task:
                    rows.setdefault(line["row"], []).append(line)
    else:
        runs_dir = pathlib.Path(args.runs_dir) / args.task
        subset = val_subset(args.val_examples, runs_dir / "val.jsonl") if args.task == "genre" else []
        for name in args.rows or list(table):
            config, overrides = table[name]
            for seed in args.seeds:
                run_overrides = [*overrides, *subset, *args.overrides, f"seed={seed}"]
                result = run(f"{name}-seed{seed}", config, run_overrides, runs_dir)
                print(json.dumps({"task": args.task, "row": name, "seed": seed, **result}), flush=True)
                rows.setdefault(name, []).append(result)
    for line in summary(rows, score):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
