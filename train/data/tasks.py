"""What the loop trains on: one task per kind of data, the same interface.

    task = make_task(config, model_cfg, tokenizer)      # reads and tokenises; ConfigError on bad data
    batch = task.batch(next(task.batches), step)         # this process's rows of global batch `step`

``StreamTask`` (causal_lm, masked_lm, span_corruption) cuts a packed token stream into windows;
``ExampleTask`` (classification, token_classification, seq2seq) reads one example per JSONL row
and packs whole examples into rows (``data.packing``, train/data/packing.py).
Both draw batches from a grain iterator whose ``get_state`` / ``set_state`` resume exactly, and a
batch is a pure function of (seed, step). A task's held-out batches (``eval_set``) are scored by
train/evaluation/evaluators.py.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import numpy as np

from models.config import ModelConfig
from sharding.rules import batch_sharding
from train.config.sections import Config, ConfigError
from train.config.validate import EXAMPLE_OBJECTIVES
from train.data import augment, chat, examples, packing, tagging, windows
from train.data.objectives import raw_length, text_objective
from train.data.text import PackedTokens, eval_batches, read_documents, train_iterator
from train.data.tfds_source import open_tfds
from train.data.tokenizer import Tokenizer, markers
from train.evaluation import scores

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
        return max(tokenizer.vocab_size, markers(tokenizer).vocab_needed)
    return tokenizer.vocab_size


def packs(config: Config) -> bool:
    """``data.packing`` resolved: unset means on."""
    return config.data.packing is not False


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
        return transform(local, step, jax.process_index() * len(local["inputs"]))

    return objective


class StreamTask:
    """Documents packed into one token stream, cut into windows: in memory (train/data/text.py) or
    streamed from a TFDS dataset (train/data/tfds_source.py)."""

    def __init__(self, config: Config, model: ModelConfig, tokenizer: Tokenizer):
        t, d = config.train, config.data
        window = raw_length(t.objective, t.seq_len, t.noise_density, t.mean_span) - 1
        segments = packs(config)  # documents kept apart (text_objective)
        stream = (window, t.batch_size, config.seed, d.shuffle, jax.process_index(), jax.process_count(), d.num_workers)
        if d.format == "tfds":  # streamed from a prepared TFDS dataset, never held whole
            corpus = open_tfds(d)
            val_tokens = corpus.val_tokens(tokenizer, window, t.batch_size, t.eval_batches)
            self.batches = corpus.train_iterator(tokenizer, *stream, segments=segments)
            train_size = f"{corpus.num_records(d.tfds_train_split):,} train records (streamed)"
            self.train_examples = 0  # unknown without reading it whole: train.epochs is refused
        else:
            train_docs, val_docs = read_documents(d)
            train_tokens = PackedTokens(train_docs, tokenizer)
            val_tokens = PackedTokens(val_docs, tokenizer, count_bytes=True)
            self.batches = train_iterator(train_tokens, *stream, segments=segments)
            train_size = f"{train_tokens.num_tokens:,} train tokens"
            self.train_examples = train_tokens.num_tokens // window  # windows an epoch (train.epochs)
        self.data_config = dataclasses.replace(d, packing=segments)
        self.batch = make_objective(config, model, tokenizer)
        self.eval_set = [
            self.batch(process_rows(b), EVAL_SEED_OFFSET + i)
            for i, b in enumerate(eval_batches(val_tokens, window, t.batch_size, t.eval_batches, segments))
        ]
        # bits per byte only means something for next-token prediction: the bytes of the targets scored
        causal = t.objective == "causal_lm"
        scored = len(self.eval_set) * t.batch_size
        self.eval_bytes = val_tokens.target_bytes(window, scored, segments) if causal else None
        kept = "documents apart (segment ids)" if segments else "documents run together"
        # span corruption's packed rows end where the next document no longer fits: measured on the held-out rows
        padding, where = (
            (packing.padding_fraction(self.eval_set), "held-out rows")
            if t.objective == "span_corruption"
            else (0.0, "full windows")
        )
        self.summary = f"{train_size} / {val_tokens.num_tokens:,} val tokens; padding {padding:.1%} ({where}, {kept})"


# --- one example per row --------------------------------------------------------------------

PADDING_BATCHES = 8  # the training batches whose padding the run's first line reports


def eval_set(arrays: dict, batch_size: int, packed: bool) -> tuple[list[dict], Callable]:
    """Every held-out example once, in global batches of ``batch_size`` rows, and
    ``unpack(predictions) -> per example`` (int32 [N, T] or [N], as unpacked rows give them):
    packed rows of whole examples (train/data/packing.py) or one padded example a row."""
    if packed:
        return packing.eval_batches(arrays, batch_size)
    n = len(arrays["targets"])
    return examples.padded_batches(arrays, batch_size), lambda predictions: np.concatenate(predictions)[:n]


class ExampleTask:
    """One example per JSONL row (train/data/examples.py, tagging.py): (token) classification or seq2seq."""

    def __init__(self, config: Config, model: ModelConfig, tokenizer: Tokenizer):
        d, t = dataclasses.replace(config.data, packing=packs(config)), config.train
        train_rows, val_rows = examples.split_rows(d)
        self.objective = t.objective
        self.val_words: windows.Windows | None = None  # token_classification: the held-out words
        if t.objective in ("classification", "token_classification"):
            tagged = t.objective == "token_classification"
            if d.format == "conll":  # the training files' tags, O first; every tag checked with its line
                self.labels = examples.conll_run_labels(train_rows, val_rows, d)
            else:
                self.labels = examples.label_names(train_rows + val_rows, d, tagged)
            if len(self.labels) != model.num_labels:
                raise ConfigError(
                    f"the data has {len(self.labels)} labels ({', '.join(self.labels)}) but "
                    f"model.num_labels={model.num_labels}; set model.num_labels={len(self.labels)}"
                )
            self.data_config = dataclasses.replace(d, labels=",".join(self.labels))
            if tagged:
                scores.seqeval_metrics()  # before any training: the evals need it
                make = lambda rows: windows.windowed_arrays(rows, d, self.labels, tokenizer, t.seq_len)
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
        if isinstance(self.val, windows.Windows):
            train, self.val_words, self.val = train.arrays, self.val, self.val.arrays
            self.log_prior = tagging.log_prior(train["targets"], train["weights"], len(self.labels))
        self.train_examples = len(train["targets"])  # examples (a long sentence's windows) an epoch
        per_example = None
        if augment.enabled(d.augment):  # validate.py: only (token_)classification
            if self.train_examples != len(train_rows):  # augmented rows are remade one example each
                raise ConfigError(
                    f"data.augment needs every training example in one window of train.seq_len={t.seq_len}, but "
                    f"{len(train_rows):,} rows make {self.train_examples:,} windows; raise train.seq_len or drop data.augment"
                )
            per_example = augment.example_maker(train_rows, d, config.seed, make, t.objective == "token_classification")
        process = (jax.process_index(), jax.process_count())
        feed = (train, t.batch_size, config.seed, d.shuffle, *process, per_example, d.packing)
        self.batches = examples.example_iterator(*feed)
        self.eval_set, self.unpack = eval_set(self.val, t.batch_size, d.packing)
        padding = packing.padding_fraction(itertools.islice(examples.example_iterator(*feed), PADDING_BATCHES))
        fed = "packed rows of whole examples" if d.packing else "one padded example a row"
        self.summary = (
            f"{len(train_rows):,} train / {len(val_rows):,} val examples{what}; "
            f"padding {100 * padding:.1f}% of the computed tokens ({fed})"
        )

    def batch(self, local: dict, step: int) -> dict:
        """Examples are ready to train on: the pipeline's rows are the batch."""
        return local
