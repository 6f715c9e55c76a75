"""Scoring a model on held-out data and the reports made from the scores."""
