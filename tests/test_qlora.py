"""QLoRA: LoRA adapters over an int8 base (a ``python -m train.quantize`` export) train while the int8
kernels stay bitwise unchanged, ``--merge-lora`` writes a float model, and ``checkpoint.init_from`` of an
int8 export into a float model dequantises it; 8 fake CPU devices."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from cli_runs import REPO, in_this_process
from flax import nnx, traverse_util
from test_lora import EXPECTED_TRAINABLE, FAST, LORA

from models import abstract_model, build_model
from models.quant import dequantize
from train import export
from train.checkpoints import sources
from train.checkpoints.exporting import write_params
from train.checkpoints.sources import warm_start
from train.checkpoints.store import restore_target
from train.compress import quantizing
from train.config.sections import ConfigError, load_config
from train.run.callbacks import Callback

VOCAB = 384  # a run's: the byte tokenizer's 257 ids rounded up to a multiple of 128


class KeepParams(Callback):
    """Keeps the run's final parameters (on the host) as {path tuple: array}."""

    def on_end(self, loop, result) -> None:
        self.params = traverse_util.flatten_dict(jax.device_get(nnx.to_pure_dict(loop.state.params)))


def flat(params) -> dict:
    return traverse_util.flatten_dict(jax.device_get(nnx.to_pure_dict(params)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The export of a fresh tiny GPT-2 (the model of ``FAST``), its int8 export, a QLoRA run from that
    export, and its exports."""
    root = tmp_path_factory.mktemp("qlora")
    cfg = dataclasses.replace(load_config(REPO / FAST[0], FAST[1:]).model, vocab_size=VOCAB)
    write_params(jax.jit(lambda: nnx.state(build_model(cfg, 0), nnx.Param))(), cfg, root / "base")
    quantizing.quantize_source(root / "base", root / "int8")
    kept = KeepParams()
    argv = [*LORA, "model.quant=int8", f"checkpoint.init_from={root / 'int8'}", f"run.dir={root / 'qlora'}"]
    qlora = in_this_process([*argv, "train.steps=6"], callbacks=(kept,))
    assert export.main([str(root / "qlora"), str(root / "merged"), "--merge-lora"]) == 0
    assert export.main([str(root / "qlora"), str(root / "adapters")]) == 0
    return {"root": root, "qlora": qlora, "final": kept.params}


@pytest.mark.slow
def test_qlora_trains_only_the_adapters_and_keeps_the_int8_base_bitwise(runs):
    assert runs["qlora"].rc == 0, runs["qlora"].err
    first = next(r for r in runs["qlora"].metrics if "loss" in r)
    assert first["trainable_params"] == EXPECTED_TRAINABLE
    losses = runs["qlora"].losses()
    assert losses[6] < losses[1] - 0.05
    _, int8 = sources.load_export(runs["root"] / "int8")
    saved = flat(int8)
    final = runs["final"]
    kernels = [p for p, x in saved.items() if x.dtype == np.int8]
    assert len(kernels) == 6  # q, k, v, o, wi, wo (stacked over the layers); the tied LM head stays float
    for path, value in saved.items():  # int8 kernels, scales, norms, embeddings: untouched by training
        assert final[path].dtype == value.dtype
        np.testing.assert_array_equal(final[path], np.asarray(value), err_msg=str(path))
    assert final[("stack", "blocks", "attn", "q", "lora_b")].std() > 0  # the adapters did train


@pytest.mark.slow
def test_merge_lora_of_a_qlora_run_writes_a_float_model_equal_to_the_adapter_model(runs):
    adapter_cfg, adapter_params = sources.load_export(runs["root"] / "adapters")
    merged_cfg, merged_params = sources.load_export(runs["root"] / "merged")
    assert adapter_cfg.quant == "int8" and merged_cfg.quant == "none" and merged_cfg.lora_rank == 0
    assert all(x.dtype == np.float32 for x in flat(merged_params).values())
    tokens = np.random.default_rng(4).integers(0, 200, size=(2, 32), dtype=np.int32)

    def logits(cfg, params):
        return np.asarray(nnx.merge(abstract_model(cfg)[0], params)(tokens))

    np.testing.assert_allclose(logits(merged_cfg, merged_params), logits(adapter_cfg, adapter_params), atol=2e-5)


@pytest.mark.slow
def test_init_from_an_int8_export_into_a_float_model_dequantises_it(runs):
    int8_cfg, int8 = sources.load_export(runs["root"] / "int8")
    cfg = dataclasses.replace(int8_cfg, quant="none")
    _, abstract = abstract_model(cfg)
    target = restore_target(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    params = flat(warm_start(str(runs["root"] / "int8"), nnx.state(build_model(cfg, 1)), target, cfg))
    saved = flat(int8)
    q, scale = saved[("stack", "blocks", "mlp", "wi", "kernel")], saved[("stack", "blocks", "mlp", "wi", "scale")]
    assert q.dtype == np.int8
    np.testing.assert_array_equal(params[("stack", "blocks", "mlp", "wi", "kernel")], np.asarray(dequantize(q, scale)))
    np.testing.assert_array_equal(params[("embed", "embedding")], saved[("embed", "embedding")])  # float: as is


def test_int8_training_without_lora_is_refused():
    with pytest.raises(ConfigError, match="model.quant=int8 holds int8 weights that cannot be trained; train LoRA"):
        load_config(REPO / "configs/tiny-gpt2.yaml", ["model.quant=int8"])
    assert load_config(REPO / "configs/tiny-gpt2.yaml", ["model.quant=int8", "lora.rank=4"]).model.lora_rank == 4
