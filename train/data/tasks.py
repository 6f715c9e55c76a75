"""What the loop trains on and how it is scored: one task per kind of data, the same interface.

    task = make_task(config, model_cfg, tokenizer)      # reads and tokenises; ConfigError on bad data
    batch = task.batch(next(task.batches), step)         # this process's rows of global batch `step`
    scores = task.evaluator(spec, mesh)(params)          # {'eval_loss', ...} over the held-out data

``StreamTask`` (causal_lm, masked_lm, span_corruption) cuts a packed token stream into windows;
``ExampleTask`` (classification, token_classification, seq2seq) reads one example per JSONL row.
Both draw batches from a grain iterator whose ``get_state`` / ``set_state`` resume exactly, and a
batch is a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np

from models.config import ModelConfig
from sharding.rules import batch_sharding
from train import scores
from train.config import Config, ConfigError
from train.data import chat, examples, tagging
from train.data.objectives import raw_length, text_objective
from train.data.text import PackedTokens, eval_batches, read_documents, train_iterator
from train.data.tfds_source import open_tfds
from train.step import make_eval_step, make_predict_step
from train.tokenizer import Tokenizer
from train.validate import EXAMPLE_OBJECTIVES

EVAL_SEED_OFFSET = 2**31  # eval batches draw objective randomness apart from any train step


def process_rows(batch: dict) -> dict:
    """This process's rows of a global host batch (rows ``[p*local, (p+1)*local)``)."""
    local = len(next(iter(batch.values()))) // jax.process_count()
    start = jax.process_index() * local
    return {k: v[start : start + local] for k, v in batch.items()}


def global_batch(local: dict, mesh) -> dict:
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def vocab_needed(config: Config, tokenizer: Tokenizer) -> int:
    """Ids the model's vocabulary must hold: the tokenizer's, plus any [CLS]/[PAD] ids reserved past it."""
    if config.train.objective in EXAMPLE_OBJECTIVES and config.train.objective != "sft":  # sft pads with eos
        return max(tokenizer.vocab_size, examples.markers(tokenizer).vocab_needed)
    return tokenizer.vocab_size


def make_task(config: Config, model: ModelConfig, tokenizer: Tokenizer) -> StreamTask | ExampleTask:
    cls = ExampleTask if config.train.objective in EXAMPLE_OBJECTIVES else StreamTask
    return cls(config, model, tokenizer)


# --- packed token stream --------------------------------------------------------------------


def make_objective(config: Config, model: ModelConfig, tokenizer: Tokenizer):
    """``objective(local_windows, step) -> batch`` turning pipeline windows into the objective's batch."""
    t = config.train
    mask_id = getattr(tokenizer, "mask_id", None) or tokenizer.vocab_size
    if t.objective == "masked_lm" and mask_id >= model.vocab_size:
        raise ConfigError(
            f"masked_lm needs a [MASK] id below model.vocab_size={model.vocab_size}; "
            "set model.vocab_size=0 (padded) or use a tokenizer with a mask token"
        )
    transform = text_objective(
        t.objective, vocab_size=model.vocab_size, eos_id=tokenizer.eos_id, mask_id=mask_id, seed=config.seed,
        rate=t.mask_rate, noise_density=t.noise_density, mean_span=t.mean_span,
    )  # fmt: skip

    def objective(local: dict, step: int) -> dict:
        rows = np.concatenate([local["inputs"][:, :1], local["targets"]], axis=1)  # the raw windows
        return transform(rows, step, jax.process_index() * len(rows))

    return objective


class StreamTask:
    """Documents packed into one token stream, cut into windows: in memory (train/data/text.py) or
    streamed from a TFDS dataset (train/data/tfds_source.py)."""

    def __init__(self, config: Config, model: ModelConfig, tokenizer: Tokenizer):
        t, d = config.train, config.data
        window = raw_length(t.objective, t.seq_len, t.noise_density, t.mean_span) - 1
        stream = (window, t.batch_size, config.seed, d.shuffle, jax.process_index(), jax.process_count(), d.num_workers)
        if d.format == "tfds":  # streamed from a prepared TFDS dataset, never held whole
            corpus = open_tfds(d)
            val_tokens = corpus.val_tokens(tokenizer, window, t.batch_size, t.eval_batches)
            self.batches = corpus.train_iterator(tokenizer, *stream)
            train_size = f"{corpus.num_records(d.tfds_train_split):,} train records (streamed)"
        else:
            train_docs, val_docs = read_documents(d)
            train_tokens = PackedTokens(train_docs, tokenizer)
            val_tokens = PackedTokens(val_docs, tokenizer, count_bytes=True)
            self.batches = train_iterator(train_tokens, *stream)
            train_size = f"{train_tokens.num_tokens:,} train tokens"
        self.data_config = d
        self.batch = make_objective(config, model, tokenizer)
        self.eval_set = [
            self.batch(process_rows(b), EVAL_SEED_OFFSET + i)
            for i, b in enumerate(eval_batches(val_tokens, window, t.batch_size, t.eval_batches))
        ]
        # bits per byte only means something for next-token prediction: the bytes of the targets scored
        causal = t.objective == "causal_lm"
        self.eval_bytes = val_tokens.target_bytes(window, len(self.eval_set) * t.batch_size) if causal else None
        self.summary = f"{train_size} / {val_tokens.num_tokens:,} val tokens"

    def evaluator(self, spec, mesh) -> Callable[[object], dict]:
        """``evaluate(params) -> {'eval_loss'[, 'eval_bpb']}`` over the first ``train.eval_batches`` windows."""
        eval_step = make_eval_step(spec, mesh)

        def evaluate(params) -> dict:
            total, weight = 0.0, 0.0
            for batch in self.eval_set:
                s, w = eval_step(params, global_batch(batch, mesh))
                total, weight = total + float(s), weight + float(w)
            if self.eval_bytes is None:
                return {"eval_loss": total / weight}
            return {"eval_loss": total / weight, "eval_bpb": total / math.log(2) / self.eval_bytes}

        return evaluate


# --- one example per row --------------------------------------------------------------------


class ExampleTask:
    """One example per JSONL row (train/data/examples.py, tagging.py): (token) classification or seq2seq."""

    def __init__(self, config: Config, model: ModelConfig, tokenizer: Tokenizer):
        d, t = config.data, config.train
        train_rows, val_rows = examples.split_rows(d)
        self.objective = t.objective
        self.val_words: tagging.TaggedArrays | None = None  # token_classification: the held-out words
        if t.objective in ("classification", "token_classification"):
            tagged = t.objective == "token_classification"
            self.labels = examples.label_names(train_rows + val_rows, d, tagged)
            if len(self.labels) != model.num_labels:
                raise ConfigError(
                    f"the data has {len(self.labels)} labels ({', '.join(self.labels)}) but "
                    f"model.num_labels={model.num_labels}; set model.num_labels={len(self.labels)}"
                )
            self.data_config = dataclasses.replace(d, labels=",".join(self.labels))
            if tagged:
                scores.seqeval_metrics()  # before any training: the evals need it
                make = lambda rows: tagging.tagged_arrays(rows, d, self.labels, tokenizer, t.seq_len)
            else:
                make = lambda rows: examples.classification_arrays(rows, d, self.labels, tokenizer, t.seq_len)
            what = f", labels {', '.join(self.labels)}"
        elif t.objective == "sft":
            self.labels, self.data_config, self.skipped = [], d, [0]

            def make(rows):
                arrays, skipped = chat.sft_arrays(rows, d, tokenizer, t.seq_len, t.loss_on)
                self.skipped[0] += skipped
                return arrays

        else:
            self.labels, self.data_config, what = [], d, ""
            make = lambda rows: examples.seq2seq_arrays(rows, d, tokenizer, t.seq_len, t.target_len)
        train, self.val = make(train_rows), make(val_rows)
        if t.objective == "sft":
            what = f", {self.skipped[0]} bad rows skipped (data.skip_bad)" if self.skipped[0] else ""
        self.log_prior = None  # token_classification: the training tags' log frequencies [num_labels]
        if isinstance(self.val, tagging.TaggedArrays):
            train, self.val_words, self.val = train.arrays, self.val, self.val.arrays
            self.log_prior = tagging.log_prior(train["targets"], train["weights"], len(self.labels))
        self.batches = examples.example_iterator(
            train, t.batch_size, config.seed, d.shuffle, jax.process_index(), jax.process_count()
        )
        self.eval_set = examples.padded_batches(self.val, t.batch_size)
        self.summary = f"{len(train_rows):,} train / {len(val_rows):,} val examples{what}"

    def batch(self, local: dict, step: int) -> dict:
        """Examples are ready to train on: the pipeline's rows are the batch."""
        return local

    def evaluator(self, spec, mesh) -> Callable[[object], dict]:
        """``evaluate(params)`` over every held-out example: ``eval_loss`` and ``eval_accuracy`` /
        ``eval_macro_f1`` (classification), ``eval_token_accuracy`` (seq2seq; token_classification:
        of the words) and ``eval_entity_precision`` / ``recall`` / ``f1`` (token_classification)."""
        predict = make_predict_step(spec, mesh)

        def evaluate(params) -> dict:
            total, weight, predictions = 0.0, 0.0, []
            for batch in self.eval_set:
                s, w, p = predict(params, global_batch(process_rows(batch), mesh))
                total, weight = total + float(s), weight + float(w)
                predictions.append(np.asarray(p))
            predicted = np.concatenate(predictions)[: len(self.val["targets"])]
            result = {"eval_loss": total / weight}
            if self.objective == "classification":
                found = scores.classification_scores(predicted, self.val["targets"], len(self.labels))
                return {**result, "eval_accuracy": found["accuracy"], "eval_macro_f1": found["macro_f1"]}
            if self.val_words is not None:
                found = tagging.tagged_scores(predicted, self.val_words, self.labels)
                entities = {f"eval_entity_{k}": found[k] for k in ("precision", "recall", "f1")}
                return {**result, "eval_token_accuracy": found["token_accuracy"], **entities}
            accuracy = scores.token_accuracy(predicted, self.val["targets"], self.val["weights"])
            return {**result, "eval_token_accuracy": accuracy}

        return evaluate
