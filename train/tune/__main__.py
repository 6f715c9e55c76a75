"""``python -m train.tune CONFIG SEARCH.yaml [section.key=value ...]``: search hyper-parameters with Optuna.

The overrides apply to the base config of every trial. Each trial is a normal run directory
``<study.dir>/trial-NNNN``. The study lives in ``study.storage`` (default: SQLite in study.dir):
the same command resumes it after a crash, and several processes or machines sharing the
storage work on one study. Mistakes in the config or the search file print one ``error:``
line and exit with status 2 before any trial runs.
"""

from __future__ import annotations

import pathlib
import sys

from train import cli
from train.config.sections import ConfigError, config_tree, load_config

USAGE = "usage: python -m train.tune CONFIG.yaml SEARCH.yaml [section.key=value ...]"


def tune(config_path: str, search_path: str, overrides: list[str]) -> int:
    from train.tune.search import load_search

    base = load_config(config_path, overrides)
    if base.run.num_processes > 1:
        raise ConfigError("train.tune runs each trial in one process; start one worker per machine instead")
    base_tree = config_tree(config_path, overrides)
    search = load_search(search_path, base_tree)

    try:
        import optuna
    except ImportError:
        raise ConfigError("train.tune needs Optuna; pip install -e '.[tune]'") from None

    from train.tune import results
    from train.tune.study import open_study, work

    cli.start_jax()  # imports jax: after the input is valid
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one progress line per trial instead

    def report(study: optuna.Study, number: int) -> None:
        results.write_results(study, search, base_tree)
        print(results.progress_line(study, search, number), flush=True)

    study = open_study(search)
    status = work(study, search, base_tree, report)
    study_dir = pathlib.Path(search.study.dir)
    results.write_results(study, search, base_tree)
    for note in results.write_plots(study, search):
        print(note, flush=True)
    print(results.steps_summary(study, search, base.train.steps), flush=True)
    best = results.best_trial(study)
    if best is not None:
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        print(f"best: trial {best.number} {search.study.metric} {best.value:.4f} {params}", flush=True)
        print(f"results in {study_dir}: trials.csv, best.yaml (python -m train {study_dir / 'best.yaml'}), *.png")
    return status


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip())
        return 0
    if len(argv) < 2 or "=" in argv[0] or "=" in argv[1]:
        print(f"error: give a config and a search file; {USAGE}", file=sys.stderr)
        return 2
    return cli.guarded(lambda: tune(argv[0], argv[1], argv[2:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
