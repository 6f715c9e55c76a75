"""Quantisation-aware training (model.quant=qat, models/quant.py) and int8 untied LM heads: the
straight-through gradient, QAT forward == int8 export forward for every family, shardings, a tiny
QAT run of tiny-llama (untied head) whose loss falls and whose int8 export scores as it did."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import REPO
from flax import nnx, traverse_util

from models import abstract_model, build_model
from models.config import ConfigError, ModelConfig
from models.quant import FakeQuant, dequantize, fake_quantize, float_weights, quantize, quantize_model
from sharding.mesh import MeshConfig, make_mesh
from train import evaluate
from train import quantize as quantize_cli
from train.__main__ import main as train_main
from train.checkpoints.sources import load_source, shardings_for
from train.checkpoints.store import config_mismatch

PLAYS = REPO / "data" / "shakespeare"
TINY = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=256, max_seq_len=32, compute_dtype="float32")
LLAMA = dataclasses.replace(
    TINY, n_kv_heads=2, position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False
)
BERT = dataclasses.replace(TINY, family="encoder", post_norm=True, mlp="gelu_exact", tie_embeddings=False)
CLASSIFIER = dataclasses.replace(TINY, family="encoder", post_norm=True, head="classification", num_labels=3)
T5 = dataclasses.replace(
    TINY, family="encoder_decoder", position="relative", norm="rmsnorm", use_bias=False, mlp="gated_gelu",
    tie_embeddings=False, scan_layers=False,
)  # fmt: skip


def test_fake_quantize_is_the_int8_round_trip_with_an_identity_gradient():
    w = jax.random.normal(jax.random.key(0), (3, 48, 40)) * jnp.linspace(0.01, 5.0, 40)  # [layers, in, out]
    np.testing.assert_array_equal(fake_quantize(w), dequantize(*quantize(w)))
    table = w[0].T  # [vocab, embed]: one scale per row
    np.testing.assert_array_equal(fake_quantize(table, -1), dequantize(*quantize(table.T)).T)
    assert not np.array_equal(fake_quantize(w), w)
    cotangent = jax.random.normal(jax.random.key(1), w.shape)
    np.testing.assert_array_equal(jax.grad(lambda w: jnp.sum(fake_quantize(w) * cotangent))(w), cotangent)


def _logits(model: nnx.Module, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    if cfg.family == "encoder_decoder":
        return model.forward({"encoder_inputs": tokens, "decoder_inputs": tokens[:, ::-1]})
    return model.forward({"inputs": tokens})


def test_qat_gradient_is_the_float_gradient_at_the_fake_quantised_weights():
    cfg = dataclasses.replace(LLAMA, quant="qat", quant_embeddings=True)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    qat = build_model(cfg, seed=0)
    graphdef, params = nnx.split(qat, nnx.Param)

    def loss(graphdef, params):
        return jnp.mean(jax.nn.log_softmax(_logits(nnx.merge(graphdef, params), cfg, tokens))[..., 0])

    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    grads = grad(graphdef, params)
    rounded = traverse_util.unflatten_dict({path: v[...] for path, v in nnx.to_flat_state(params)})
    float_weights(qat)  # the same model in float, its selected weights replaced by their int8 round trips
    float_def, float_params = nnx.split(qat, nnx.Param)
    nnx.replace_by_pure_dict(float_params, rounded)
    reference = grad(float_def, float_params)
    flat, ref = nnx.to_flat_state(grads), dict(nnx.to_flat_state(reference))
    assert len(flat) == len(ref) == 12 and sum(isinstance(v, FakeQuant) for _, v in nnx.to_flat_state(params)) == 9
    for path, g in flat:
        # get_value: a FakeQuant-typed gradient would read rounded through [...]
        np.testing.assert_allclose(g.get_value(), ref[path].get_value(), rtol=1e-5, atol=1e-7, err_msg=str(path))


@pytest.mark.parametrize(
    "cfg, skip, embeddings",
    [(TINY, "", False), (LLAMA, "", True), (BERT, "mlm/dense", True), (CLASSIFIER, "classifier", False),
     (T5, "", True)],
    ids=["gpt2", "llama", "bert-mlm", "bert-classifier", "t5"],
)  # fmt: skip
def test_qat_forward_equals_the_int8_export_forward(cfg, skip, embeddings):
    cfg = dataclasses.replace(cfg, quant="qat", quant_skip=skip, quant_embeddings=embeddings)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    model = build_model(cfg, seed=0)
    qat = _logits(model, cfg, tokens)
    float_weights(model)
    assert not np.allclose(_logits(model, cfg, tokens), qat, rtol=1e-4, atol=1e-5)  # the rounding shows
    done = quantize_model(model, skip, embeddings)  # what python -m train.quantize does with a QAT run
    assert bool(embeddings) == any(name in done for name in ("embed", "head", "mlm/decoder"))
    np.testing.assert_allclose(_logits(model, cfg, tokens), qat, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cfg, heads", [(LLAMA, ["head"]), (BERT, ["mlm/decoder"]), (T5, ["head"])])
def test_untied_lm_heads_are_int8_under_embeddings_with_a_scale_per_vocab_entry(cfg, heads):
    model = build_model(cfg, seed=0)
    assert not any(name in heads for name in quantize_model(build_model(cfg, seed=0)))  # not by default
    done = quantize_model(model, embeddings=True)
    assert [d for d in done if d in heads] == heads
    head = model.head if heads == ["head"] else model.mlm.decoder
    assert head.kernel[...].dtype == jnp.int8 and head.scale[...].shape == (cfg.vocab_size,)
    assert quantize_model(build_model(cfg, seed=0), skip="head|decoder$", embeddings=True).count("embed") == 1


def test_qat_and_int8_heads_shard_as_the_float_model():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices("cpu"))
    floats = dict(nnx.to_flat_state(shardings_for(abstract_model(LLAMA)[1], mesh)))
    qat = dict(nnx.to_flat_state(shardings_for(abstract_model(dataclasses.replace(LLAMA, quant="qat"))[1], mesh)))
    assert {k: v.spec for k, v in qat.items()} == {k: v.spec for k, v in floats.items()}
    int8 = dataclasses.replace(LLAMA, quant="int8", quant_embeddings=True)
    quants = dict(nnx.to_flat_state(shardings_for(abstract_model(int8)[1], mesh)))
    head = floats[("head",)].spec
    assert head[1] is not None  # the vocab axis is sharded, so the scales must follow it
    assert quants[("head", "kernel")].spec == head and tuple(quants[("head", "scale")].spec) == (head[1],)


def test_quant_fields_need_int8_to_block_a_restore():
    qat = {"quant": "qat", "quant_skip": "mlp/wo", "quant_embeddings": True}
    assert config_mismatch({"quant": "none", "quant_skip": "", "quant_embeddings": False}, qat) == []
    assert config_mismatch({"quant": "int8"}, qat) == ["quant: 'int8' -> 'qat'"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [(["model.quant=qat", "lora.rank=4"], "use one of model.quant=qat and a PEFT method"),
     (["model.quant_embeddings=true"], "set model.quant=qat"),
     (["model.quant=int8"], "fine-tune for int8 with model.quant=qat")],
)  # fmt: skip
def test_qat_config_mistakes_are_one_error_line(tmp_path, capsys, overrides, message):
    assert train_main([str(REPO / "configs/tiny-llama.yaml"), f"run.dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("qat")
    argv = [
        str(REPO / "configs/tiny-llama.yaml"), f"run.dir={root / 'run'}", f"data.train_files={PLAYS / 'tempest.txt'}",
        f"data.val_files={PLAYS / 'hamlet.txt'}", "train.steps=20", "train.seq_len=32", "train.batch_size=8",
        "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "train.log_every=1",
        "model.quant=qat", "model.quant_embeddings=true", "model.quant_skip=attn/o",
    ]  # fmt: skip
    assert train_main(argv) == 0
    return root / "run"


@pytest.mark.slow
def test_a_qat_run_learns_and_its_int8_export_scores_what_it_scored(qat_run, tmp_path, capsys):
    losses = [r["loss"] for r in map(json.loads, (qat_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 20 and np.mean(losses[-3:]) < losses[0] - 1.0  # byte-level: ~5.5 nats at the start
    text = tmp_path / "lines.txt"
    text.write_text((PLAYS / "hamlet.txt").read_text()[:4096])
    assert quantize_cli.main([str(qat_run), str(tmp_path / "int8")]) == 0
    assert "quantised 8 layers" in capsys.readouterr().out  # q k v wi wg wo (attn/o skipped), embed, head
    int8 = load_source(tmp_path / "int8")
    assert int8.config.quant == "int8" and int8.config.quant_skip == "attn/o" and int8.config.quant_embeddings
    assert (
        int8.model.head.kernel[...].dtype == jnp.int8
        and int8.model.stack.blocks.attn.o.kernel[...].dtype == jnp.float32
    )
    argv = ["--files", str(text), "--tokenizer", "byte", "--seq-len", "32", "--batch", "8"]
    scores = {}
    for name, source in (("qat", qat_run), ("int8", tmp_path / "int8")):
        assert evaluate.main([str(source), *argv]) == 0
        scores[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["int8"]["eval_bpb"] == pytest.approx(scores["qat"]["eval_bpb"], rel=1e-5)


@pytest.mark.slow
def test_a_qat_run_is_exported_with_its_own_selection(qat_run, tmp_path, capsys):
    assert quantize_cli.main([str(qat_run), str(tmp_path / "out"), "--skip", "mlp/wo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "quant_skip='attn/o'" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="matches every layer"):
        build_model(dataclasses.replace(TINY, quant="qat", quant_skip="."), seed=0)
