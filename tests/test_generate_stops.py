"""Where generation stops (issue 20): a chat template's end-of-turn token, a Hugging Face directory's
``eos_token_id`` list and ``--stop``, through ``python -m train.generate`` (its ``main()``, here).

A tiny random Llama saved with save_pretrained beside a word-level tokenizer with a ChatML template
(``<|im_start|>`` / ``<|im_end|>`` added tokens); its lm_head row of ``<|im_end|>`` is set so that the
greedy answer to one user turn is three words and then ``<|im_end|>``, as a chat-tuned model's is.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_generate import CONFIGS
from test_generate_cli import EOS, VOCAB

from train.data import chat
from train.data.tokenizer import ByteTokenizer, HFTokenizer
from train.generate import main

IM_START, IM_END = 96, 97
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TURN = "w5 w17 w42"
ANSWER = 3  # words before <|im_end|>
NEW = 10
GREEDY = ["--temperature", "0", "--max-new-tokens", str(NEW)]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(directory with the model and its tokenizer, the greedy answer's ids before <|im_end|>)."""
    import tokenizers

    vocab = VOCAB | {"<|im_start|>": IM_START, "<|im_end|>": IM_END}
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": TURN}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    torch.manual_seed(0)
    config = CONFIGS["llama-gqa"]()
    config.eos_token_id, config.bos_token_id = EOS, None
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None)
        greedy = greedy[0, len(prompt) :].tolist()
        assert not {EOS, IM_END} & set(greedy[:ANSWER])
        # the lm_head row of <|im_end|>: 0 against the hidden states before word 4, the top logit there
        hidden = model.model(torch.tensor([prompt + greedy[:ANSWER]])).last_hidden_state[0, len(prompt) - 1 :]
        top = float((hidden[-1] @ model.lm_head.weight.T).max()) + 5.0
        row = np.linalg.lstsq(hidden.numpy(), np.array([0.0] * ANSWER + [top]), rcond=None)[0]
        model.lm_head.weight[IM_END] = torch.tensor(row, dtype=model.lm_head.weight.dtype)
        ended = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=[EOS, IM_END])
    assert ended[0, len(prompt) :].tolist() == greedy[:ANSWER] + [IM_END]
    path = tmp_path_factory.mktemp("chatml")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    return path, greedy[:ANSWER]


def test_the_end_of_turn_token_is_the_templates_added_token_after_the_answer_or_eos(chat_model):
    path, _ = chat_model
    assert chat.end_of_turn(HFTokenizer(str(path))) == IM_END
    assert chat.end_of_turn(ByteTokenizer()) == ByteTokenizer.eos_id  # the built-in template ends turns with eos


def test_chat_with_a_prompt_answers_one_turn_and_stops_at_the_templates_end_of_turn(chat_model, capsys):
    path, answer = chat_model
    text = HFTokenizer(str(path)).decode(answer)
    assert main([str(path), "--chat", "--prompt", TURN, *GREEDY]) == 0
    assert capsys.readouterr().out == text + "\n"  # the answer alone, as a text-generation pipeline gives it


def test_a_plain_prompt_stops_at_stop_and_at_generation_config_eos_ids_as_transformers_does(chat_model, capsys):
    path, answer = chat_model
    tokenizer = HFTokenizer(str(path))
    rendered = tokenizer.tokenizer.apply_chat_template(
        [{"role": "user", "content": TURN}], tokenize=False, add_generation_prompt=True
    )
    assert main([str(path), "--prompt", rendered, *GREEDY]) == 0
    runs_on = capsys.readouterr().out
    assert (
        runs_on.startswith(rendered + tokenizer.decode(answer))
        and len(runs_on) > len(rendered + tokenizer.decode(answer)) + 1
    )
    assert main([str(path), "--prompt", rendered, "--stop", "<|im_end|>", *GREEDY]) == 0
    assert capsys.readouterr().out == rendered + tokenizer.decode(answer) + "\n"
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, IM_END]}))
    try:
        assert main([str(path), "--prompt", rendered, *GREEDY]) == 0
        assert capsys.readouterr().out == rendered + tokenizer.decode(answer) + "\n"
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path)  # reads generation_config.json
        with torch.no_grad():
            ids = tokenizer.encode(rendered).tolist()
            out = theirs.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)[0, len(ids) :].tolist()
        assert out == answer + [IM_END]
    finally:
        (path / "generation_config.json").unlink()
    assert main([str(path), "--prompt", rendered, "--stop", "w5 w17", *GREEDY]) == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith("error: --stop 'w5 w17' is 2 tokens of the tokenizer; give one token")
    )


@pytest.mark.slow
def test_an_hf_export_lists_the_end_of_turn_in_generation_config_so_transformers_stops_there(chat_model, tmp_path):
    from train.export import main as export_main

    path, answer = chat_model
    assert export_main([str(path), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"eos_token_id": [EOS, IM_END]}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = HFTokenizer(str(tmp_path / "hf"))
    text = tokenizer.tokenizer.apply_chat_template(
        [{"role": "user", "content": TURN}], tokenize=False, add_generation_prompt=True
    )
    with torch.no_grad():
        ids = tokenizer.encode(text).tolist()
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)[0, len(ids) :].tolist()
    assert out == answer + [IM_END]
