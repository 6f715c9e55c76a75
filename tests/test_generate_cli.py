"""``python -m train.generate`` (its ``main()``, in this process) and the end-of-run sample.

The CLI's greedy text is transformers' ``generate()`` token for token on a tiny random T5 and Llama
saved with save_pretrained next to a word-level tokenizer (``w5 w17 ...``: its text names every token);
``--top-k`` above the vocabulary keeps every token; a post-norm decoder run with an empty sample prompt
ends with its sample and ``loss.png``, and the CLI continues it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cli_runs import in_this_process
from test_generate import CONFIGS, T5

from models import hf
from models.generate import generate
from train.data.tokenizer import HFTokenizer
from train.generate import main

NEW = 10
EOS = 1
VOCAB = {"<pad>": 0, "</s>": EOS, "<unk>": 2} | {f"w{i}": i for i in range(3, 96)}  # both models hold 96 ids
PROMPT = "w5 w17 w42 w8 w3 w77"
GREEDY = ["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(NEW)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """name -> (directory with the model and its tokenizer, the torch model)."""
    import tokenizers

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>")  # pad: a plain word
    out = {}
    for name in ("t5-v1.1", "llama-gqa"):
        torch.manual_seed(0)
        auto = transformers.AutoModelForSeq2SeqLM if name.startswith("t5") else transformers.AutoModelForCausalLM
        theirs = auto.from_config(CONFIGS[name]()).eval()
        path = tmp_path_factory.mktemp(name)
        theirs.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path, theirs
    return out


def hf_greedy(theirs, prompt: np.ndarray, seq2seq: bool) -> list[int]:
    """transformers' greedy new tokens for one prompt, up to (without) eos; T5 from its decoder_start_token_id."""
    with torch.no_grad():
        out = theirs.generate(
            torch.tensor(prompt[None], dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=EOS,
            use_cache=not seq2seq,  # transformers' T5 cache assumes as many decoder layers as encoder layers
        )[0].tolist()
    new = out[1:] if seq2seq else out[len(prompt) :]
    return new[: new.index(EOS)] if EOS in new else new


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5-v1.1", "llama-gqa"])
def test_cli_greedy_text_is_transformers_generate_token_for_token(models, name, capsys):
    path, theirs = models[name]
    seq2seq = name.startswith("t5")
    tokenizer = HFTokenizer(str(path))
    prompt = tokenizer.encode(PROMPT)
    expected = hf_greedy(theirs, prompt, seq2seq)
    ours, _ = hf.load(path)  # the library, on the model as the CLI loads it; T5 starts from pad_id (0)
    library = generate(ours, [prompt], NEW, eos_id=EOS)[0].tolist()
    assert library[: library.index(EOS) if EOS in library else NEW] == expected

    assert main([str(path), *GREEDY]) == 0
    shown = "" if seq2seq else PROMPT
    assert capsys.readouterr().out == shown + tokenizer.decode(expected) + "\n"


@pytest.mark.slow
def test_the_decoder_start_is_the_hf_configs_or_what_the_runs_objective_fed_the_decoder(tmp_path):
    import yaml

    from train.checkpoints.sources import load_source
    from train.export import main as export_cli

    torch.manual_seed(0)
    config = transformers.T5Config(**(T5 | {"vocab_size": 300, "decoder_start_token_id": 7}))
    transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "hf")
    assert load_source(tmp_path / "hf").decoder_start_id == 7
    assert export_cli([str(tmp_path / "hf"), str(tmp_path / "run"), "--format", "checkpoint"]) == 0
    assert load_source(tmp_path / "run").decoder_start_id == 0  # its config.yaml: span corruption, which feeds 0
    run_config = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(run_config.read_text())
    saved["train"]["objective"], saved["data"]["format"], saved["data"]["tokenizer"] = "seq2seq", "jsonl", "byte"
    run_config.write_text(yaml.safe_dump(saved))
    assert load_source(tmp_path / "run").decoder_start_id == 259  # seq2seq feeds the byte tokenizer's [PAD]


@pytest.mark.slow
def test_cli_top_k_above_the_vocabulary_keeps_every_token_as_transformers_clamps_it(models, capsys):
    path, _ = models["llama-gqa"]
    sampling = [str(path), "--prompt", PROMPT, "--temperature", "1.5", "--max-new-tokens", str(NEW), "--seed", "3"]
    assert main([*sampling, "--top-k", "0"]) == 0
    every_token = capsys.readouterr().out
    assert main([*sampling, "--top-k", "1000000"]) == 0  # the model's vocabulary holds 128
    assert capsys.readouterr().out == every_token
    assert main([*sampling, "--top-k", "1"]) == 0
    assert capsys.readouterr().out != every_token  # a draw that top-k can change


@pytest.mark.slow
def test_a_post_norm_decoder_run_with_an_empty_sample_prompt_ends_with_a_sample_and_generates(tmp_path, capsys):
    """The end-of-run sample decodes the post-norm stack from the KV cache, starting a new document
    (eos) for the empty prompt; train.generate continues the run's checkpoint with both prompts."""
    fast = ["configs/tiny-gpt2.yaml", "train.seq_len=32", "train.eval_every=0", "train.eval_batches=1"]
    fast += ["data.train_files=data/shakespeare/hamlet.txt", "data.val_files=data/shakespeare/macbeth.txt"]
    argv = [*fast, f"run.dir={tmp_path}", "train.steps=2", "model.post_norm=true", "train.sample_prompt="]
    run = in_this_process([*argv, "train.sample_tokens=8"])
    assert run.rc == 0, run.err[-2000:]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "\nsample:\n" in "\n" + run.out
    for prompt in ("", "ROMEO."):
        args = [str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]
        assert main(args) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.startswith(prompt)
