"""Scoring models on held-out data: the trainer's evaluators, train.evaluate's scoring, train.predict's predictions,
the reports made from the scores and the lm-eval model."""
