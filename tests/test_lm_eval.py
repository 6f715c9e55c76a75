"""The ``meshlm`` model of lm-eval (train/evaluation/harness.py) on a tiny random Hugging Face GPT-2
with the byte tokenizer: its log-likelihoods equal transformers' and train.evaluate's scoring of the
same windows, and lm-eval runs a local multiple-choice task through it."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import transformers
from lm_eval.api.instance import Instance

from sharding.rules import RULES, activation_context
from train.data.tokenizer import ByteTokenizer
from train.evaluation import scoring
from train.evaluation.harness import MeshLM, continuation_batch

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random GPT-2 of 2 layers, 32 wide, 260 tokens (the bytes and eos), context 64, in fp32."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=260, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=256, eos_token_id=256
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def lm(hf_gpt2):
    return MeshLM(str(hf_gpt2[0]), tokenizer="byte", batch_size=8, max_length=32)


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _torch_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    picked = logprobs[torch.arange(len(targets)), targets]
    return float(picked[len(context) - 1 :].sum())


def test_loglikelihood_equals_transformers_and_greedy_is_the_argmax(lm, hf_gpt2):
    byte = ByteTokenizer()
    pairs = [("To be, or not", " to be"), ("", "Hamlet"), ("whether 'tis ", "nobler in the mind")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    for (context, continuation), (logprob, _) in zip(pairs, got):  # HF sources compute in bf16
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
        ctx = byte.encode(context).tolist() or [byte.eos_id]
        assert logprob == pytest.approx(
            _torch_logprob(hf_gpt2[1], ctx, byte.encode(continuation).tolist()), rel=5e-4
        )  # HF sources compute in bf16
    # a continuation of the greedy tokens themselves is greedy; a random model rarely picks " to be"
    prompt = byte.encode("To be").tolist()
    with torch.no_grad():
        first = int(hf_gpt2[1](torch.tensor([prompt])).logits[0, -1].argmax())
    if first < 256:
        assert lm.loglikelihood(_instances("loglikelihood", [("To be", byte.decode([first]))]))[0][1] is True


def test_rolling_loglikelihood_equals_train_evaluates_scoring_of_the_same_windows(lm):
    byte = ByteTokenizer()
    text = TEXT[:64]  # 64 tokens: lm-eval's disjoint windows of 32 are train.evaluate's windows at stride 32
    [rolling] = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    tokens = np.concatenate([[byte.eos_id], byte.encode(text)]).astype(np.int32)
    rules = types.SimpleNamespace(mesh=types.SimpleNamespace(logical_rules=RULES))
    setup = types.SimpleNamespace(source=lm.source, mesh=lm.mesh, config=rules)
    batches = scoring._causal_batches(tokens, np.zeros_like(tokens), 32, 32, 8)
    with activation_context(lm.mesh):
        total = sum(s for s, _, _, _ in scoring._run(setup, batches))
    assert rolling == pytest.approx(-total, rel=1e-5)


def test_continuation_batch_weights_only_the_continuation_and_keeps_the_last_tokens():
    batch = continuation_batch([([1, 2, 3], [4, 5]), (list(range(10, 50)), [7])], max_length=32, rows=4)
    assert batch["inputs"].shape == (4, 32)
    np.testing.assert_array_equal(batch["inputs"][0, :4], [1, 2, 3, 4])
    np.testing.assert_array_equal(batch["weights"][0, :5], [0, 0, 1, 1, 0])
    assert batch["targets"][1, 31] == 7 and batch["inputs"][1, 0] == 18  # the last 33 tokens kept
    assert batch["weights"][1].sum() == 1 and batch["weights"][2:].sum() == 0


def test_generate_until_stops_at_the_stop_string_and_matches_greedy_tokens(lm, hf_gpt2):
    byte = ByteTokenizer()
    [free] = lm.generate_until(_instances("generate_until", [("To be", {"max_gen_toks": 8, "until": []})]))
    prompt = byte.encode("To be").tolist()
    with torch.no_grad():
        ids = hf_gpt2[1].generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=256)
    expected = [t for t in ids[0, len(prompt) :].tolist()]
    expected = expected[: expected.index(256)] if 256 in expected else expected
    assert free == byte.decode(expected)
    if len(free) > 2:
        [cut] = lm.generate_until(_instances("generate_until", [("To be", {"max_gen_toks": 8, "until": [free[2]]})]))
        assert cut == free.split(free[2])[0]


@pytest.mark.slow
def test_lm_eval_runs_a_local_multiple_choice_task(lm, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    rows = [{"question": "To be, or not", "choices": [" to be", " xq!z"], "answer": 0},
            {"question": "that is the", "choices": [" question", " zzzz"], "answer": 0}]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    scores = [lm.loglikelihood(_instances("loglikelihood", [(r["question"], c) for c in r["choices"]])) for r in rows]
    expected = np.mean([int(np.argmax([s for s, _ in row]) == r["answer"]) for row, r in zip(scores, rows)])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(expected)
