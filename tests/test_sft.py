"""train.objective=sft (train/data/chat.py): the templated rows, the loss mask, bad rows, a tiny run."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import re
import shutil
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from sharding.rules import activation_context
from tests.cli_runs import REPO, in_this_process
from train import evaluate, generate
from train.config.sections import ConfigError, DataConfig, load_config
from train.core.state import init_state
from train.data import chat
from train.data.files import Row
from train.data.tokenizer import ByteTokenizer, load_tokenizer
from train.evaluation.evaluators import make_evaluator
from train.run.loop import prepare

BYTE = ByteTokenizer()
EOS = BYTE.eos_id
DATA = DataConfig(format="jsonl", train_files="x.jsonl")


def arrays(records: list[dict], loss_on: str = "assistant", seq_len: int = 96, **data) -> tuple[dict, int]:
    rows = [Row(r, "chat.jsonl", i + 1) for i, r in enumerate(records)]
    return chat.sft_arrays(rows, dataclasses.replace(DATA, **data), BYTE, seq_len, loss_on)


def scored(a: dict, i: int = 0) -> list[int]:
    """The target ids the loss reads in row i."""
    return a["targets"][i][a["weights"][i] > 0].tolist()


def test_prompt_completion_row_is_the_built_in_template_with_loss_on_the_completion_and_eos():
    a, _ = arrays([{"prompt": "Who?", "completion": "Kent"}])
    text = b"<|user|>\nWho?\n<|assistant|>\nKent"
    expected = list(text) + [EOS]
    n = len(expected) - 1  # inputs/targets are the ids shifted by one
    assert a["inputs"][0][:n].tolist() == expected[:-1]
    assert a["targets"][0][:n].tolist() == expected[1:]
    # weights: exactly the 4 completion bytes and the end-of-turn eos, nothing of the prompt or padding
    mask = np.zeros(96, np.float32)
    mask[n - 5 : n] = 1
    np.testing.assert_array_equal(a["weights"][0], mask)
    assert scored(a) == list(b"Kent") + [EOS]


def test_multi_turn_messages_score_every_assistant_turn_and_only_those():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A?"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "B?"},
        {"role": "assistant", "content": "two"},
    ]
    a, _ = arrays([{"messages": msgs}, {"prompt": "A?", "completion": "one"}])
    assert scored(a, 0) == list(b"one") + [EOS] + list(b"two") + [EOS]
    assert scored(a, 1) == list(b"one") + [EOS]
    full = b"<|system|>\nBe brief.\n<|user|>\nA?\n<|assistant|>\none" + b"\x00" + b"<|user|>\nB?\n<|assistant|>\ntwo"
    ids = [EOS if c == 0 else c for c in full] + [EOS]
    assert a["targets"][0][: len(ids) - 1].tolist() == ids[1:]
    # loss_on=all: every real token (the shifted targets), none of the padding
    everything, _ = arrays([{"messages": msgs}], loss_on="all")
    assert everything["weights"][0].sum() == len(ids) - 1 and everything["weights"][0][len(ids) - 1 :].sum() == 0


def test_a_tokenizer_chat_template_is_used_and_masks_the_assistant_text(tmp_path):
    directory = tmp_path / "tok"
    shutil.copytree(REPO / "data/tokenizers/shakespeare-bpe-2048", directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(directory))
    conversation = [("user", "Who speaks?"), ("assistant", "HAMLET"), ("user", "Again?"), ("assistant", "Yes")]
    ids, weights = chat.example(conversation, tokenizer, "assistant")
    assert tokenizer.decode(ids[weights > 0]) == "HAMLET<|im_end|>\nYes<|im_end|>\n"
    assert tokenizer.decode(ids) == tokenizer.tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in conversation], tokenize=False
    )


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat.jsonl' line 2 has no assistant turn"),
        ({"messages": [{"role": "king", "content": "hi"}]}, "chat.jsonl' line 2 has unknown role 'king'"),
        ({"prompt": "x" * 200, "completion": "y"}, "chat.jsonl' line 2: its prompt is 224 tokens, longer than"),
        ({"text": "hi"}, "chat.jsonl' line 2 has neither 'messages' nor"),
    ],
)
def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(record, message):
    good = {"prompt": "Who?", "completion": "Kent"}
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        arrays([good, record, good])
    a, skipped = arrays([good, record, good], skip_bad=True)
    assert skipped == 1 and len(a["targets"]) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.family=encoder"], "train.objective=sft trains model.family=decoder, not encoder"),
        (["data.format=text"], "train.objective=sft reads one example per JSONL row; set data.format=jsonl"),
        (
            ["train.objective=causal_lm", "data.format=text"],
            "train.loss_on and data.skip_bad are for train.objective=sft",
        ),
    ],
)
def test_sft_config_must_fit(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO / "configs/sft-gpt.yaml", ["data.skip_bad=true", *overrides])
    for name in ("sft-gpt", "sft-llama"):
        assert load_config(REPO / f"configs/{name}.yaml").train.objective == "sft"


def tiny_config(tmp_path: pathlib.Path, **train):
    rows = [
        {"prompt": f"Who says {w}?", "completion": n} for w, n in [("aye", "KENT"), ("nay", "LEAR"), ("so", "FOOL")]
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 6))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    base = load_config(REPO / "configs/sft-llama.yaml")
    return dataclasses.replace(
        base,
        data=dataclasses.replace(
            base.data, train_files=str(tmp_path / "train.jsonl"), val_files=str(tmp_path / "val.jsonl")
        ),
        train=dataclasses.replace(base.train, seq_len=48, batch_size=8, **train),
        model=dataclasses.replace(base.model, max_seq_len=48),
    )


def test_eval_loss_is_the_mean_cross_entropy_of_the_assistant_tokens_only(tmp_path):
    setup = prepare(tiny_config(tmp_path))
    params = init_state(setup.spec, setup.config.model, seed=0).params
    eval_loss = make_evaluator(setup.task, setup.spec, setup.mesh)(params)["eval_loss"]
    val = setup.task.val  # 2 rows
    with activation_context(setup.mesh, setup.config.mesh.logical_rules):
        logits = jax.jit(lambda p, x: nnx.merge(setup.spec.graphdef, p).forward({"inputs": x}))(params, val["inputs"])
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits.astype(np.float32), val["targets"]))
    w = val["weights"]
    assert w.sum() == len("KENT") + 1 + len("LEAR") + 1  # the answers and their eos
    np.testing.assert_allclose(eval_loss, (losses * w).sum() / w.sum(), rtol=1e-5)
    assert abs(eval_loss - losses[:, :10].mean()) > 1e-3  # not the loss of the prompt tokens


@pytest.mark.slow
def test_a_tiny_sft_run_learns_the_answers_and_chats(tmp_path, monkeypatch, capsys):
    argv = [
        "configs/sft-llama.yaml", f"run.dir={tmp_path / 'run'}", f"data.train_files={tmp_path / 'train.jsonl'}",
        f"data.val_files={tmp_path / 'val.jsonl'}", "train.seq_len=48", "model.max_seq_len=96", "train.batch_size=8",
        "train.steps=12", "train.log_every=1", "train.eval_every=0", "optimizer.lr=0.01", "train.sample_tokens=4",
    ]  # fmt: skip
    tiny_config(tmp_path)  # writes the rows
    run = in_this_process(argv)
    assert run.rc == 0, run.err
    losses = run.losses()
    assert losses[12] < 0.7 * losses[1], losses
    assert run.evals()[-1]["eval_loss"] < losses[1]
    # train.evaluate scores the run's held-out rows over the same masked tokens as its last eval
    capsys.readouterr()
    assert evaluate.main([str(run.dir)]) == 0
    scored_again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert scored_again["tokens"] == len("KENT") + 1 + len("LEAR") + 1
    assert scored_again["eval_loss"] == pytest.approx(run.evals()[-1]["eval_loss"], rel=1e-4)
    # --chat: one answer line per user line, each stopped at the end-of-turn eos (never past the budget)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who says aye?\n\nWho says nay?\n"))
    capsys.readouterr()
    assert generate.main([str(run.dir), "--chat", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(len(line) <= 6 for line in lines), lines
