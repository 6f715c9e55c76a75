"""Sums up a finished ``python -m train.tune`` study against a baseline run at the same step budget.

    PYTHONPATH=. python benchmarks/tune_study.py --study runs/tune-default-lr --baseline runs/default-300 \
        [--best runs/tune-default-lr/best]

Prints one JSON object: trials by state, steps run against running every finished trial to the
end (what pruning saved), the best trial's metric and params, the baseline's final metric, and
(with ``--best``) the final metric of best.yaml trained again as a plain run.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib

import yaml


def final_eval(run_dir: pathlib.Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_loss" in r][-1]


def summary(study_dir: pathlib.Path, baseline: pathlib.Path, best_run: pathlib.Path | None) -> dict:
    rows = list(csv.DictReader((study_dir / "trials.csv").open()))
    metric = list(rows[0])[list(rows[0]).index("steps") - 1]
    train = yaml.safe_load((study_dir / "best.yaml").read_text())["train"]
    budget = train["steps"]
    finished = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = min(complete, key=lambda r: float(r[metric]))  # the studies here minimise
    steps_run = sum(int(r["steps"]) for r in finished)
    params = [k for k in rows[0] if k not in ("number", "state", metric, "steps", "seconds", "fail_reason")]
    out = {
        "study": str(study_dir),
        "metric": metric,
        "steps_per_trial": budget,
        "trials": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "steps_run": steps_run,
        "steps_if_unpruned": budget * len(finished),
        "pruning_saved": round(1 - steps_run / (budget * len(finished)), 4),
        "trial_seconds": round(sum(float(r["seconds"] or 0) for r in rows), 1),
        "best_trial": int(best["number"]),
        "best_params": {k: best[k] for k in params},
        "best_trial_" + metric: float(best[metric]),  # on the study's eval (train.eval_batches of best.yaml)
        "study_eval_batches": train["eval_batches"],
        "baseline_" + metric: final_eval(baseline)[metric],  # the default config, same steps, its own eval
    }
    if best_run:
        out["best_rerun_" + metric] = final_eval(best_run)[metric]  # best.yaml again, the baseline's eval
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, type=pathlib.Path)
    parser.add_argument("--baseline", required=True, type=pathlib.Path, help="the default config's run, same steps")
    parser.add_argument("--best", type=pathlib.Path, help="best.yaml's run dir, if it was trained again")
    args = parser.parse_args()
    print(json.dumps(summary(args.study, args.baseline, args.best)))


if __name__ == "__main__":
    main()
