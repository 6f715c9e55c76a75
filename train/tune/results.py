"""What a study leaves in ``study.dir``: ``trials.csv``, ``best.yaml``, PNG plots, and a line per trial.

Every worker rewrites ``trials.csv`` and ``best.yaml`` after each of its trials (atomically, so a
reader never sees half a file); the plots are drawn once a worker is done.
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from train.config.sections import save_config
from train.tune.search import Search
from train.tune.trial import trial_config

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _value(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def trials_csv(study: optuna.Study, search: Search) -> str:
    """number, state, every param, the metric (a pruned trial: its last report), steps, seconds, fail_reason."""
    keys = [p.key for p in search.space]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["number", "state", *keys, search.study.metric, "steps", "seconds", "fail_reason"])
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        row = [t.number, t.state.name, *(_value(t.params.get(k)) for k in keys), _value(t.value)]
        writer.writerow(row + [attrs.get("steps", ""), attrs.get("seconds", ""), attrs.get("fail_reason", "")])
    return out.getvalue()


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial completed yet
        return None


def write_results(study: optuna.Study, search: Search, base_tree: dict) -> None:
    """``trials.csv``, and ``best.yaml``: the best trial's full config, training into ``<study.dir>/best``."""
    study_dir = pathlib.Path(search.study.dir)
    _write(study_dir / "trials.csv", trials_csv(study, search))
    best = best_trial(study)
    if best is not None:
        config = trial_config(search, base_tree, best.params, study_dir / "best")
        tmp = study_dir / f".best.yaml.{os.getpid()}.tmp"
        save_config(config, tmp)
        os.replace(tmp, study_dir / "best.yaml")


def progress_line(study: optuna.Study, search: Search, number: int) -> str:
    """``trial 7 PRUNED optimizer.lr=0.0012 eval_bpb 2.4512 100 steps 41.2 s | best 2.4011 (trial 3)``."""
    t = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    attrs = t.user_attrs
    parts = [f"trial {t.number} {t.state.name}", *(f"{k}={_value(v)}" for k, v in t.params.items())]
    if t.value is not None:
        parts.append(f"{search.study.metric} {t.value:.4f}")
    parts.append(f"{attrs.get('steps', 0)} steps {attrs.get('seconds', 0)} s")
    if t.state == TrialState.FAIL:
        parts.append(f"({attrs.get('fail_reason', '')})")
    best = best_trial(study)
    if best is not None:
        parts.append(f"| best {best.value:.4f} (trial {best.number})")
    return " ".join(parts)


def steps_summary(study: optuna.Study, search: Search, budget: int) -> str:
    """Steps the finished trials ran against running each to ``budget`` steps: what pruning saved."""
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    run = sum(t.user_attrs.get("steps", 0) for t in finished)
    full = budget * len(finished)
    pruned = sum(t.state == TrialState.PRUNED for t in finished)
    saved = 1 - run / full if full else 0.0
    return f"{len(finished)} finished trials ({pruned} pruned) ran {run} of {full} steps: pruning saved {saved:.0%}"


def write_plots(study: optuna.Study, search: Search) -> list[str]:
    """History, importances, intermediate values and a slice per param as PNGs; notes for plots skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    study_dir = pathlib.Path(search.study.dir)
    plots = {
        "history.png": lambda: vis.plot_optimization_history(study),
        "importances.png": lambda: vis.plot_param_importances(study),
        "intermediate.png": lambda: vis.plot_intermediate_values(study),
    }
    for p in search.space:
        plots[f"slice-{p.key}.png"] = lambda key=p.key: vis.plot_slice(study, params=[key])
    notes = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or all(len({repr(t.params.get(p.key)) for t in complete}) < 2 for p in search.space):
        del plots["importances.png"]
        notes.append("note: skipped importances.png: it needs 2 complete trials and a param that varies among them")
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(study_dir / name, dpi=80, bbox_inches="tight")
            plt.close(figure)
        except Exception as e:  # noqa: BLE001 - Optuna refuses plots it cannot make (too few trials, no variance)
            notes.append(f"note: skipped {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            plt.close("all")
    return notes
