"""Today's decoder families from Hugging Face: Llama 3.x scaled RoPE, Mistral, Qwen2/2.5, Qwen3, Gemma.

Each tiny random model (every parameter perturbed, so zero-initialised biases and unit norms are
tested too) must give transformers' fp32 logits and (one per family and window) greedy tokens, export
back to the same architecture and refuse config fields we do not compute with one error line. Llama
and the families that train through code of their own fine-tune from ``checkpoint.init_from`` (with
LoRA too where the adapters' shapes differ) and generate. Sequences run past the sliding windows and
the scaled RoPE's original context, so both change the numbers these tests compare.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import hf
from models.generate import generate, pad_prompts
from train.export import main as export_cli

TOL = 1e-4
BASE = {
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
CONFIGS = {  # name -> (HF config, the model_type an export of ours writes)
    "llama3.1": lambda: transformers.LlamaConfig(
        **BASE, rope_parameters=LLAMA3 | {"original_max_position_embeddings": 16}
    ),
    "llama-linear": lambda: transformers.LlamaConfig(
        **BASE, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
    ),
    "llama-yarn": lambda: transformers.LlamaConfig(
        **BASE,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 500.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-dynamic": lambda: transformers.LlamaConfig(
        **BASE, rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0, "factor": 4.0}
    ),
    "mistral": lambda: transformers.MistralConfig(**BASE, head_dim=8, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**BASE, tie_word_embeddings=True),
    "qwen2-window": lambda: transformers.Qwen2Config(
        **BASE, use_sliding_window=True, sliding_window=6, max_window_layers=0
    ),
    "qwen3": lambda: transformers.Qwen3Config(**BASE, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**BASE, head_dim=16),
}
TOKENS = np.random.default_rng(0).integers(0, 96, (3, 24))  # past every window and original context here
PROMPT_LENGTHS = (3, 9, 6)
NEW = 10


def hf_model(name: str, config=None):
    """A transformers model of ``CONFIGS[name]`` with every parameter moved off its initial value."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config or CONFIGS[name]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """(name, HF directory, torch model, our fp32 model, our config)."""
    model = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ours, cfg = hf.load(path, compute_dtype="float32")
    return request.param, path, model, ours, cfg


def test_imported_model_gives_transformers_logits_in_fp32(reference):
    _, _, theirs, ours, _ = reference
    np.testing.assert_allclose(np.asarray(ours(TOKENS)), logits(theirs), atol=TOL, rtol=0)


# One config per family and window: the linear, YaRN and dynamic RoPEs decode as llama3.1's does, with
# other frequency tables (their logits above)
GENERATED = ("llama3.1", "mistral", "qwen2", "qwen2-window", "qwen3", "gemma")


@pytest.mark.parametrize("reference", GENERATED, indirect=True)
def test_greedy_tokens_equal_transformers_generate_on_a_ragged_batch(reference):
    name, _, theirs, ours, _ = reference
    prompts = [np.random.default_rng(1).integers(2, 90, n) for n in PROMPT_LENGTHS]
    tokens, mask = pad_prompts(prompts, None, 0, left=True)
    with torch.no_grad():
        expected = theirs.generate(
            torch.tensor(tokens), attention_mask=torch.tensor(mask), max_new_tokens=NEW, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        ).numpy()[:, tokens.shape[1] :]  # fmt: skip
    np.testing.assert_array_equal(generate(ours, prompts, NEW), expected)
    if name == "mistral":  # the window without a cache too: positions instead of cache slots
        np.testing.assert_array_equal(generate(ours, prompts, NEW, cache=False), expected)


def test_export_is_the_same_architecture_with_the_same_logits(reference, tmp_path):
    _name, path, theirs, ours, cfg = reference
    hf.export(ours, cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == json.loads((path / "config.json").read_text())["model_type"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(logits(back), logits(theirs), atol=TOL, rtol=0)
    assert hf.load_config(tmp_path, compute_dtype="float32") == cfg


@pytest.mark.parametrize(
    ("name", "without"), [("llama3.1", {"rope_scaling": "none"}), ("mistral", {"sliding_window": 0})]
)
def test_the_scaling_and_the_window_change_these_logits(name, without, tmp_path):
    """Parity above is not vacuous: dropping the feature moves the logits far past the tolerance."""
    theirs = hf_model(name)
    theirs.save_pretrained(tmp_path)
    cfg, params = hf.read_params(tmp_path)
    plain = hf.assemble(dataclasses.replace(cfg, compute_dtype="float32", **without), params)
    assert np.abs(np.asarray(plain(TOKENS)) - logits(theirs)).max() > 100 * TOL


UNSUPPORTED = {  # a change to a config.json -> what the one error line names
    "longrope": ("llama3.1", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type 'longrope'"),
    "yarn-no-truncate": (
        "llama-yarn",
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "truncate": False}},
        "truncate",
    ),
    "rope-key": ("llama3.1", {"rope_parameters": LLAMA3 | {"original_max_position_embeddings": 16, "x": 1}}, "rope_parameters.x"),
    "unknown-field": ("qwen3", {"attn_logit_softcapping": 50.0}, "field 'attn_logit_softcapping'"),
    "mixed-windows": (
        "qwen2-window",
        {"max_window_layers": 1, "layer_types": ["full_attention", "sliding_attention"]},
        "layer_types",
    ),
    "bidirectional": ("gemma", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    "gemma2": ("gemma", {"model_type": "gemma2"}, "model_type 'gemma2' is not supported"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_config_fields_are_one_error_line_naming_them(case, tmp_path, capsys):
    from safetensors.numpy import save_file

    name, change, message = UNSUPPORTED[case]
    config = CONFIGS[name]().to_dict() | change
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.ConversionError, match=message.replace("(", r"\(").replace(".", r"\.")):
        hf.load_config(tmp_path / "hf")
    save_file({"unread": np.zeros(1, np.float32)}, str(tmp_path / "hf" / "model.safetensors"))
    assert export_cli([str(tmp_path / "hf"), str(tmp_path / "out"), "--format", "hf"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.split("'")[0] in lines[0]


# --- fine-tuning from an HF directory: full and LoRA, then generation ---------------------------

TRAIN = [
    "data.tokenizer=byte",
    "train.steps=2",
    "train.batch_size=4",
    "train.seq_len=16",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "optimizer.warmup_steps=0",
    "checkpoint.every=0",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]
# Llama (untied head) and the families whose training runs code no other test trains through: qk-norm
# (qwen3); scaled embeddings and heads of 16 on a 32-wide model, so that q and o project 32 <-> 64 (gemma,
# with LoRA too: adapters of those shapes). Qwen2's q, k, v biases and tied embeddings are GPT-2's, which
# tests/test_lora.py trains on this mesh, in full and with LoRA; Mistral's window and the scaled RoPEs add
# no parameter. All train through the forward whose logits and tokens the tests above compare.
TRAINED = ("llama3.1", "qwen3", "gemma")
LORA = ("gemma",)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_the_families_fine_tune_from_init_from_also_with_lora_and_generate(name, tmp_path):
    """Two steps from the exported checkpoint on data 2 x fsdp 2 x tensor 2, then generation from the
    last run: a LoRA run's first loss is the full run's (its fresh adapters change nothing)."""
    from cli_runs import in_this_process

    from train.generate import main as generate_cli

    config = CONFIGS[name]()
    config.vocab_size = 264  # the byte tokenizer's 257 ids
    hf_model(name, config).save_pretrained(tmp_path / "hf")
    assert export_cli([str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--format", "checkpoint"]) == 0
    text, held_out = tmp_path / "train.txt", tmp_path / "val.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    held_out.write_text("Whether 'tis nobler in the mind to suffer.\n" * 20)
    base = [str(tmp_path / "ckpt" / "config.yaml"), *TRAIN, f"data.train_files={text}", f"data.val_files={held_out}"]
    runs = [("full", []), ("lora", ["lora.rank=4", "lora.alpha=8"])]
    losses = {}
    for run, extra in runs if name in LORA else runs[:1]:
        result = in_this_process([*base, *extra, f"run.dir={tmp_path / run}"])
        assert result.rc == 0, result.err
        losses[run] = result.losses()
        assert sorted(losses[run]) == [1, 2] and all(np.isfinite(list(losses[run].values())))
    if "lora" in losses:
        assert losses["lora"][1] == pytest.approx(losses["full"][1], rel=1e-6)
        assert losses["lora"][2] != losses["full"][2]
    argv = [str(result.dir), "--prompt", "To be", "--max-new-tokens", "8", "--temperature", "0"]
    assert generate_cli(argv) == 0
