"""LoRA adapters in the PEFT layout: ours load in ``PeftModel`` with our logits, PEFT's load into our
LoRA models (``checkpoint.init_from`` / ``lora.init_from``) with its logits, options we do not
compute are refused, and a LoRA run exports with ``--format peft`` and starts a new run from it."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

from flax import nnx, traverse_util

from models import abstract_model, build_model, hf
from models.config import ConfigError
from models.hf import peft
from train.checkpoints.sources import warm_start
from train.checkpoints.store import restore_target
from train.checkpoints.warm_start import load_adapters

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 12))
QWEN2 = {
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 0,
}  # fmt: skip
ALL = "stack/blocks/(attn/(q|k|v|o)|mlp/(wi|wg|wo))"


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    """A tiny Qwen2 (q/k/v biases) with random weights, saved as Hugging Face saves it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2")
    perturbed(transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**QWEN2))).save_pretrained(path)
    return path


def lora_model(base: pathlib.Path, rank: int, alpha: float, targets: str, seed: int = 0):
    """Our fp32 LoRA model of ``base``: its weights, random A and B (so the adapters change the logits)."""
    cfg = dataclasses.replace(
        hf.load_config(base, compute_dtype="float32"), lora_rank=rank, lora_alpha=alpha, lora_targets=targets
    )
    model = build_model(cfg, seed)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    flat |= {p: jax.numpy.asarray(a) for p, a in hf.read_params(base)[1]}
    rng = np.random.default_rng(seed)
    flat |= {
        p: jax.numpy.asarray(rng.normal(0, 0.2, x.shape), np.float32) for p, x in flat.items() if p[-1] == "lora_b"
    }
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    nnx.update(model, state)
    return model, cfg


def peft_logits(base: pathlib.Path, adapters: pathlib.Path) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model = peft_lib.PeftModel.from_pretrained(model, adapters).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def fresh(cfg, seed: int = 1):
    """(fresh parameters of ``cfg``, their restore target) on one device, as a run starts."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return nnx.state(build_model(cfg, seed), nnx.Param), restore_target(abstract_model(cfg)[1], device)


def logits_of(cfg, params) -> np.ndarray:
    graphdef, _ = abstract_model(cfg)
    return np.asarray(nnx.merge(graphdef, params)(TOKENS))


def test_our_adapters_load_in_peft_model_with_our_logits(base, tmp_path):
    model, cfg = lora_model(base, rank=4, alpha=8.0, targets=ALL)
    peft.write(hf.params_to_numpy(model), cfg, tmp_path, str(base))
    config = json.loads((tmp_path / peft.CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8.0, "CAUSAL_LM")
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    ours = np.asarray(model(TOKENS))
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(base)(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(ours - plain).max() > 100 * TOL  # the adapters matter here
    np.testing.assert_allclose(peft_logits(base, tmp_path), ours, atol=TOL, rtol=0)


def test_peft_adapters_start_our_lora_model_with_peft_logits_both_ways(base, tmp_path):
    torch.manual_seed(1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(base)
    lora = peft_lib.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    theirs = peft_lib.get_peft_model(theirs, lora)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "adapters")
    expected = peft_logits(base, tmp_path / "adapters")
    _, fields, _ = peft.read(tmp_path / "adapters", hf.load_config(base))
    assert fields == {
        "lora_rank": 2,
        "lora_alpha": 6.0,
        "lora_targets": "stack/blocks/attn/q|stack/blocks/attn/v|stack/blocks/mlp/wo",
    }
    cfg = dataclasses.replace(hf.load_config(base, compute_dtype="float32"), **fields)
    # checkpoint.init_from=ADAPTERS: the base from base_model_name_or_path, the adapters over it
    params = warm_start(str(tmp_path / "adapters"), *fresh(cfg), cfg, verbose=False)
    np.testing.assert_allclose(logits_of(cfg, params), expected, atol=TOL, rtol=0)
    # lora.init_from=ADAPTERS over a base from checkpoint.init_from=BASE
    params = load_adapters(
        str(tmp_path / "adapters"), warm_start(str(base), *fresh(cfg), cfg, verbose=False), fresh(cfg)[1], cfg
    )
    np.testing.assert_allclose(logits_of(cfg, params), expected, atol=TOL, rtol=0)
    other = dataclasses.replace(cfg, lora_rank=4)
    with pytest.raises(ConfigError, match=r"rank 2, alpha 6 on .*; set lora.rank=2 lora.alpha=6 lora.targets="):
        warm_start(str(tmp_path / "adapters"), *fresh(other), other, verbose=False)


@pytest.mark.parametrize(("option", "value"), [("use_dora", True), ("use_rslora", True), ("bias", "all")])
def test_peft_options_we_do_not_compute_are_refused_naming_them(base, tmp_path, option, value):
    model, cfg = lora_model(base, rank=2, alpha=4.0, targets="stack/blocks/attn/q")
    peft.write(hf.params_to_numpy(model), cfg, tmp_path, str(base))
    config = json.loads((tmp_path / peft.CONFIG).read_text()) | {option: value}
    (tmp_path / peft.CONFIG).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"{option}={value!r} is not supported"):
        warm_start(str(tmp_path), *fresh(cfg), cfg, verbose=False)


def test_gpt2_adapters_are_refused_for_the_peft_layout(tmp_path):
    from models.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, lora_rank=2)
    with pytest.raises(hf.ConversionError, match="Llama-style decoders"):
        peft.write({}, cfg, tmp_path, "")


@pytest.mark.slow
def test_a_lora_run_exports_as_peft_and_new_runs_start_from_that(base, tmp_path):
    from cli_runs import in_this_process

    from train.checkpoints.sources import read_params
    from train.export import main as export_cli

    config = transformers.Qwen2Config(**(QWEN2 | {"vocab_size": 264}))  # the byte tokenizer's 257 ids
    perturbed(transformers.AutoModelForCausalLM.from_config(config)).save_pretrained(tmp_path / "hf")
    assert export_cli([str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--format", "checkpoint"]) == 0
    text, held_out = tmp_path / "train.txt", tmp_path / "val.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    held_out.write_text("Whether 'tis nobler in the mind to suffer.\n" * 20)
    run = [str(tmp_path / "ckpt" / "config.yaml"), "data.tokenizer=byte", f"data.train_files={text}"]
    run += [
        f"data.val_files={held_out}",
        "train.steps=2",
        "train.batch_size=4",
        "train.seq_len=16",
        "train.eval_batches=1",
    ]
    run += ["train.eval_every=0", "train.sample_tokens=0", "optimizer.warmup_steps=0", "optimizer.lr=0.05"]
    run += ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "lora.rank=4", "lora.alpha=8"]
    assert in_this_process([*run, f"run.dir={tmp_path / 'lora'}"]).rc == 0
    assert export_cli([str(tmp_path / "lora"), str(tmp_path / "peft"), "--format", "peft"]) == 0
    # the run started from our checkpoint export, not an HF directory: the base is written beside the adapters
    assert json.loads((tmp_path / "peft" / peft.CONFIG).read_text())["base_model_name_or_path"] == str(
        tmp_path / "peft" / "base"
    )
    found = read_params(tmp_path / "lora")
    cfg, params = found.config, found.params
    ours = logits_of(dataclasses.replace(cfg, compute_dtype="float32"), params)
    np.testing.assert_allclose(peft_logits(tmp_path / "peft" / "base", tmp_path / "peft"), ours, atol=TOL, rtol=0)
    again = in_this_process([*run, f"checkpoint.init_from={tmp_path / 'peft'}", f"run.dir={tmp_path / 'again'}"])
    assert again.rc == 0 and "restored" in again.out and "initialised fresh: none" in again.out
    adapters_only = in_this_process([*run, f"lora.init_from={tmp_path / 'peft'}", f"run.dir={tmp_path / 'adapters'}"])
    assert adapters_only.rc == 0 and "restored 8 adapter parameters" in adapters_only.out
