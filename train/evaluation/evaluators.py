"""The trainer's evaluations: ``make_evaluator(task, spec, mesh)(params) -> {'eval_loss', ...}`` over a task's
held-out batches (train/data/tasks.py builds them), through the jitted eval / predict steps of train/core/step.py.
The record's keys per objective are ``EVAL_METRICS`` in train/config/validate.py."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from train.core.step import make_eval_step, make_predict_step
from train.data import windows
from train.data.tasks import ExampleTask, StreamTask, global_batch, process_rows
from train.evaluation import scores


def make_evaluator(task: StreamTask | ExampleTask, spec, mesh) -> Callable[[object], dict]:
    """``evaluate(params) -> {'eval_loss', ...}`` over ``task``'s held-out batches, on ``mesh``."""
    if isinstance(task, StreamTask):
        return _stream_evaluator(task, spec, mesh)
    return _example_evaluator(task, spec, mesh)


def _stream_evaluator(task: StreamTask, spec, mesh) -> Callable[[object], dict]:
    """``evaluate(params) -> {'eval_loss'[, 'eval_bpb']}`` over the first ``train.eval_batches`` windows."""
    eval_step = make_eval_step(spec, mesh)

    def evaluate(params) -> dict:
        total, weight = 0.0, 0.0
        for batch in task.eval_set:
            s, w = eval_step(params, global_batch(batch, mesh))
            total, weight = total + float(s), weight + float(w)
        if task.eval_bytes is None:
            return {"eval_loss": total / weight}
        return {"eval_loss": total / weight, "eval_bpb": total / math.log(2) / task.eval_bytes}

    return evaluate


def _example_evaluator(task: ExampleTask, spec, mesh) -> Callable[[object], dict]:
    """``evaluate(params)`` over every held-out example: ``eval_loss`` and ``eval_accuracy`` /
    ``eval_macro_f1`` (classification), ``eval_token_accuracy`` (seq2seq; token_classification:
    of the words) and ``eval_token_macro_f1``, ``eval_entity_precision`` / ``recall`` / ``f1``
    (token_classification)."""
    predict = make_predict_step(spec, mesh)

    def evaluate(params) -> dict:
        total, weight, predictions = 0.0, 0.0, []
        for batch in task.eval_set:
            s, w, p = predict(params, global_batch(process_rows(batch), mesh))
            total, weight = total + float(s), weight + float(w)
            predictions.append(np.asarray(p))
        predicted = task.unpack(predictions)
        result = {"eval_loss": total / weight}
        if task.objective == "classification":
            found = scores.classification_scores(predicted, task.val["targets"], len(task.labels))
            return {**result, "eval_accuracy": found["accuracy"], "eval_macro_f1": found["macro_f1"]}
        if task.val_words is not None:
            gold, guessed = windows.word_tags(predicted, task.val_words, task.labels)
            found = scores.entity_scores(gold, guessed)
            entities = {f"eval_entity_{k}": found[k] for k in ("precision", "recall", "f1")}
            macro = scores.token_macro_f1(gold, guessed, task.labels)
            return {**result, "eval_token_accuracy": found["token_accuracy"], "eval_token_macro_f1": macro,
                    **entities}  # fmt: skip
        accuracy = scores.token_accuracy(predicted, task.val["targets"], task.val["weights"])
        return {**result, "eval_token_accuracy": accuracy}

    return evaluate
