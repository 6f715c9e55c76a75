"""Hyper-parameter search on Optuna: ``python -m train.tune CONFIG SEARCH.yaml [section.key=value ...]``.

search.py reads the search file, trial.py runs one trial as a normal run (reporting evals to the
pruner through a loop callback), liveness.py finds trials whose worker died, study.py runs a
worker's loop over a shared study, results.py writes trials.csv, best.yaml and the plots.
"""
