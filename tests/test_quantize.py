"""Post-training int8 (models/quant.py, python -m train.quantize): the per-channel error bound, the
logits of a quantised tiny GPT, int8 in memory and on disk, shardings on 8 fake devices, and the
CLI from a tiny run to train.evaluate."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import REPO
from flax import nnx

from models import abstract_model, build_model
from models.config import ModelConfig
from models.quant import dequantize, quantize, quantize_model
from sharding.mesh import MeshConfig, make_mesh
from train import evaluate
from train import quantize as quantize_cli
from train.__main__ import main as train_main
from train.checkpoints.sources import load_export, load_source, shardings_for

PLAYS = REPO / "data" / "shakespeare"
TINY = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=256, max_seq_len=32, compute_dtype="float32")
LLAMA = dataclasses.replace(
    TINY, n_kv_heads=2, position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False
)
DENSE = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/wi", "mlp/wo")


def test_round_trip_error_is_at_most_half_a_step_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (3, 48, 40)) * jnp.linspace(0.01, 5.0, 40)  # [layers, in, out]
    w = w.at[1, :, 7].set(0.0)  # an all-zero channel
    q, scale = quantize(w)
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (3, 40)
    error = jnp.abs(w - dequantize(q, scale))
    assert bool(jnp.all(error <= scale[:, None, :] / 2 * (1 + 1e-6)))
    np.testing.assert_allclose(scale, jnp.max(jnp.abs(w), axis=1) / 127 + (w.max(1) == 0) * 1.0, rtol=1e-6)
    assert int(jnp.max(jnp.abs(q))) == 127 and bool(jnp.all(q[1, :, 7] == 0))


@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_quantised_logits_stay_close_to_float(cfg):
    model = build_model(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    reference = model(tokens)
    done = quantize_model(model)
    assert sorted(done) == sorted(f"stack/blocks/{d}" for d in DENSE + (("mlp/wg",) if cfg.mlp == "swiglu" else ()))
    logits = model(tokens)
    # int8 keeps ~7 bits per weight: the logits (|logits| ~ 1 at init) move by well under 1%
    assert float(jnp.max(jnp.abs(logits - reference))) < 0.01 * float(jnp.max(jnp.abs(reference)))
    probs, reference_probs = jax.nn.softmax(logits), jax.nn.softmax(reference)
    assert float(jnp.max(jnp.abs(probs - reference_probs))) < 1e-4


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, family="encoder")], ids=["gpt2", "bert"])
def test_int8_token_tables_feed_the_inputs_and_the_tied_head(cfg):
    model = build_model(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    reference = model(tokens)
    assert "embed" in quantize_model(model, embeddings=True)
    assert model.embed.table[...].dtype == jnp.int8 and model.embed.scale[...].shape == (cfg.vocab_size,)
    logits = model(tokens)
    assert float(jnp.max(jnp.abs(logits - reference))) < 0.01 * float(jnp.max(jnp.abs(reference)))


def test_skip_keeps_matching_layers_in_float():
    model = build_model(TINY, seed=0)
    done = quantize_model(model, skip="mlp/wo|attn/[qk]$")
    assert sorted(done) == ["stack/blocks/attn/o", "stack/blocks/attn/v", "stack/blocks/mlp/wi"]
    assert model.stack.blocks.mlp.wo.kernel[...].dtype == jnp.float32
    assert model.stack.blocks.mlp.wi.kernel[...].dtype == jnp.int8


def test_a_quantised_config_builds_int8_kernels_and_float_scales_embeddings_and_norms():
    _, state = abstract_model(dataclasses.replace(TINY, quant="int8"))
    dtypes = {"/".join(map(str, k)): v.dtype for k, v in nnx.to_flat_state(state)}
    for name in DENSE:
        assert dtypes[f"stack/blocks/{name}/kernel"] == jnp.int8
        assert dtypes[f"stack/blocks/{name}/scale"] == jnp.float32
    assert dtypes["embed/embedding"] == dtypes["final_norm/scale"] == dtypes["stack/blocks/attn/q/bias"] == jnp.float32


@pytest.mark.parametrize("sizes", [(1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_quantised_weights_and_scales_shard_as_the_float_kernels(sizes):
    mesh = make_mesh(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]), jax.devices("cpu"))
    for cfg in (TINY, LLAMA):
        floats = shardings_for(abstract_model(cfg)[1], mesh)
        quants = shardings_for(abstract_model(dataclasses.replace(cfg, quant="int8"))[1], mesh)
        layers = quants["stack"]["blocks"]
        for name in DENSE:
            block, dense = name.split("/")
            kernel = floats["stack"]["blocks"][block][dense]["kernel"].spec
            assert layers[block][dense]["kernel"].spec == kernel
            spec = tuple(kernel) + (None,) * (3 - len(kernel))  # [layers, in, out] -> [layers, out]
            assert tuple(layers[block][dense]["scale"].spec) + (None,) * (
                2 - len(layers[block][dense]["scale"].spec)
            ) == (
                spec[0],
                spec[2],
            )
        assert any(
            layers[b][d]["kernel"].spec != jax.sharding.PartitionSpec() for b, d in (n.split("/") for n in DENSE)
        )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("quant")
    argv = [
        str(REPO / "configs/tiny-gpt2.yaml"), f"run.dir={root / 'run'}", f"data.train_files={PLAYS / 'tempest.txt'}",
        f"data.val_files={PLAYS / 'hamlet.txt'}", "train.steps=5", "train.seq_len=32", "train.batch_size=8",
        "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0",
    ]  # fmt: skip
    assert train_main(argv) == 0
    return root / "run"


def scores(capsys, source: pathlib.Path, text: pathlib.Path) -> dict:
    argv = [str(source), "--files", str(text), "--tokenizer", "byte", "--seq-len", "32", "--batch", "8"]
    assert evaluate.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_writes_an_int8_export_that_evaluates_like_the_float_run(tiny_run, tmp_path, capsys):
    from train.checkpoints.exporting import export

    text = tmp_path / "lines.txt"
    text.write_text((PLAYS / "hamlet.txt").read_text()[:4096])
    assert quantize_cli.main([str(tiny_run), str(tmp_path / "int8")]) == 0
    assert "quantised 6 layers" in capsys.readouterr().out
    export(tiny_run, tmp_path / "fp32")
    cfg, params = load_export(tmp_path / "int8")
    assert cfg.quant == "int8" and params["stack"]["blocks"]["mlp"]["wi"]["kernel"][...].dtype == jnp.int8
    source = load_source(tmp_path / "int8")
    assert source.model.stack.blocks.attn.q.kernel[...].dtype == jnp.int8
    _, floats = load_export(tmp_path / "fp32")
    nbytes = {k: sum(x.nbytes for x in jax.tree.leaves(p)) for k, p in (("fp32", floats), ("int8", params))}
    # the 2 x 49152 matrix weights shrink 4x (plus a float32 scale per output channel), all else stays float32
    matrices, channels = 2 * (4 * 64 * 64 + 2 * 64 * 256), 2 * (4 * 64 + 256 + 64)
    assert nbytes["fp32"] - nbytes["int8"] == 3 * matrices - 4 * channels
    size = {name: sum(f.stat().st_size for f in (tmp_path / name / "params").rglob("*")) for name in ("fp32", "int8")}
    saved = (
        size["fp32"] - size["int8"]
    )  # on disk as in memory, less Orbax's metadata for the 6 more arrays (~5 KB each)
    assert nbytes["fp32"] - nbytes["int8"] - 64_000 < saved <= nbytes["fp32"] - nbytes["int8"] + 4_000
    fp32, int8 = scores(capsys, tmp_path / "fp32", text), scores(capsys, tmp_path / "int8", text)
    assert int8["tokens"] == fp32["tokens"]
    assert int8["eval_bpb"] == pytest.approx(fp32["eval_bpb"], rel=0.005)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [(["--bits", "4"], "only --bits 8"), (["--skip", "("], "is not a regex"), (["--skip", "."], "matches every layer")],
)
def test_cli_mistakes_are_one_error_line(tiny_run, tmp_path, capsys, argv, message):
    assert quantize_cli.main([str(tiny_run), str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_quantised_export_is_not_quantised_again(tiny_run, tmp_path, capsys):
    assert quantize_cli.main([str(tiny_run), str(tmp_path / "a")]) == 0
    assert quantize_cli.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "already quantised" in capsys.readouterr().err


@pytest.mark.slow
def test_a_quantised_model_is_not_trained(tmp_path, capsys):
    argv = [str(REPO / "configs/tiny-gpt2.yaml"), f"run.dir={tmp_path / 'run'}", "model.quant=int8"]
    assert train_main(argv) == 2
    assert "cannot be trained" in capsys.readouterr().err and not (tmp_path / "run").exists()
