"""``distill.teacher``: load the frozen teacher of a distillation run and check it fits the student.

The teacher is a run, export or Hugging Face directory (train/checkpoints/sources.py). Its parameters are
placed on the run's mesh with the shardings the run's logical-axis rules give them (a mesh axis
that does not divide a dimension is dropped there), so a teacher larger than the student is
sharded as it would be trained. They are an argument of the jitted train step, never part of
the train state: no gradients, no optimizer state, not in the checkpoints (a resumed run loads
the teacher again from the path its config names). The loss is in train/compress/distill_loss.py.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
from flax import nnx
from jax.sharding import Mesh

from models import abstract_model
from models.config import ModelConfig
from train.checkpoints.sources import Source, load_source, shardings_for
from train.compress.distill_loss import TeacherSpec
from train.config.sections import Config, ConfigError
from train.config.validate import split_labels
from train.core.state import count_params
from train.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

SPECIAL_IDS = ("eos_id", "cls_id", "sep_id", "pad_id", "mask_id")


def load_teacher(config: Config, mesh: Mesh, tokenizer: Tokenizer) -> tuple[TeacherSpec | None, nnx.State | None]:
    """(teacher spec, its placed parameters) for a resolved run ``config``; (None, None) without a teacher.

    Raises ConfigError when the directory holds no model, or the teacher's family, head, labels,
    vocabulary or tokenizer differ from the student's.
    """
    d = config.distill
    if not d.teacher:
        return None, None
    try:
        source = load_source(d.teacher, mesh=mesh)
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    problems = (
        family_problem(source.config, config),
        tokenizer_problem(source, tokenizer, config),  # before the vocabulary: the usual cause of a mismatch
        size_problem(source.config, config),
        labels_problem(source, config),
    )
    problem = next((p for p in problems if p), "")
    if problem:
        raise ConfigError(f"distill.teacher='{d.teacher}' {problem}")
    cfg = dataclasses.replace(source.config, compute_dtype=config.model.compute_dtype)  # the student's numerics
    graphdef, abstract = abstract_model(cfg)
    shardings = shardings_for(abstract, mesh, config.mesh.logical_rules)
    params = jax.device_put(nnx.state(source.model), shardings)
    if jax.process_index() == 0:
        count = count_params(params)
        print(
            f"distill: teacher {d.teacher} ({count / 1e6:.2f}M params, {cfg.n_layers} layers, d_model {cfg.d_model}), "
            f"temperature {d.temperature}, alpha {d.alpha}, top_k {d.top_k or 'all'}",
            flush=True,
        )
    return TeacherSpec(graphdef, shardings, d.temperature, d.alpha, d.top_k), params


def family_problem(teacher: ModelConfig, config: Config) -> str:
    """Why a teacher of config ``teacher`` gives logits of another kind than the student's (empty: same)."""
    student, objective = config.model, config.train.objective
    if teacher.family != student.family:
        return (
            f"has model.family={teacher.family} but the student {student.family}; use a teacher of the student's family"
        )
    if teacher.family == "encoder" and teacher.head != student.head:
        return (
            f"has a {teacher.head} head but train.objective={objective} needs {student.head} logits; "
            f"give a teacher with model.head={student.head} (fine-tune one first)"
        )
    if student.head == "classification" and teacher.num_labels != student.num_labels:
        return f"has {teacher.num_labels} labels, the student {student.num_labels}; use a teacher of the same task"
    return ""


def size_problem(teacher: ModelConfig, config: Config) -> str:
    """Why the teacher's vocabulary or positions do not fit the student's batches (empty: they do)."""
    student = config.model
    if teacher.vocab_size != student.vocab_size:
        return (
            f"has model.vocab_size={teacher.vocab_size}, the student {student.vocab_size}; teacher and student "
            f"must share the tokenizer and vocabulary: set model.vocab_size={teacher.vocab_size} and the teacher's "
            "data.tokenizer"
        )
    if teacher.position == "learned" and teacher.max_seq_len < config.train.seq_len:
        return f"reads at most {teacher.max_seq_len} tokens; lower train.seq_len to {teacher.max_seq_len}"
    return ""


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ``a`` and ``b`` map every text to the same ids: both bytes, or the same vocabulary
    (token -> id) and special ids."""
    if isinstance(a, ByteTokenizer) or isinstance(b, ByteTokenizer):
        return isinstance(a, ByteTokenizer) and isinstance(b, ByteTokenizer)
    if not (isinstance(a, HFTokenizer) and isinstance(b, HFTokenizer)):
        return False
    specials = all(getattr(a, name) == getattr(b, name) for name in SPECIAL_IDS)
    return specials and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def tokenizer_problem(source: Source, tokenizer: Tokenizer, config: Config) -> str:
    """Why the teacher's tokenizer is not the student's ``data.tokenizer`` (empty: it is)."""
    if source.tokenizer is None:
        print(
            f"warning: distill.teacher='{config.distill.teacher}' holds no tokenizer, so only its vocabulary size "
            f"is checked against data.tokenizer='{config.data.tokenizer}'",
            file=sys.stderr,
            flush=True,
        )
        return ""
    if same_tokenizer(source.tokenizer, tokenizer):
        return ""
    theirs = source.run_config.data.tokenizer if source.run_config else str(source.path)
    return (
        f"uses another tokenizer ({theirs}) than data.tokenizer='{config.data.tokenizer}'; teacher and student "
        f"must share one: set data.tokenizer={theirs} (and train the student with it) or pick a teacher trained "
        "with the student's tokenizer"
    )


def labels_problem(source: Source, config: Config) -> str:
    """Why a classifier teacher's labels (its run's ``data.labels``) differ from the student's (empty: same)."""
    if config.train.objective != "classification" or source.run_config is None:
        return ""
    theirs, ours = split_labels(source.run_config.data.labels), split_labels(config.data.labels)
    if theirs and ours and theirs != ours:
        return f"orders its labels {theirs}, the student {ours}; set data.labels={','.join(theirs)}"
    return ""
