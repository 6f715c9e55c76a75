"""Bottleneck adapters, prefix tuning and prompt tuning (models/peft.py): every method starts exactly at
its base on every family and moves once its parameters do, decodes from a KV cache as the full forward
does, trains only its parameters (optimizer state 2 x them), resumes bitwise from adapter-only
checkpoints and exports (the prefix MLP folded; the base in Hugging Face layout with them beside it)."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from cli_runs import in_this_process
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec as P

from models import abstract_model, build_model, peft
from models.cache import init_cache
from models.config import ConfigError, ModelConfig
from sharding.mesh import make_mesh
from train.checkpoints import exporting, sources
from train.checkpoints.store import Checkpoints
from train.config.sections import CheckpointConfig, MeshConfig, OptimizerConfig, load_config
from train.core.freeze import Freeze, param_path
from train.core.state import make_state_spec

TINY = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_seq_len": 16}
FAMILIES = {
    "decoder": ModelConfig(
        **TINY, n_kv_heads=2, position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False,
        compute_dtype="float32",
    ),
    "classifier": ModelConfig(
        **TINY, family="encoder", post_norm=True, head="classification", num_labels=3, type_vocab_size=2,
        compute_dtype="float32",
    ),
    "tagger": ModelConfig(
        **TINY, family="encoder", post_norm=True, head="token_classification", num_labels=3, compute_dtype="float32"
    ),
    "t5": ModelConfig(
        **TINY, family="encoder_decoder", position="relative", norm="rmsnorm", use_bias=False, scale_attention=False,
        mlp="relu", compute_dtype="float32",
    ),
}  # fmt: skip
METHODS = {
    "adapter": {"adapter_size": 4},
    "prefix": {"prefix_length": 3},
    "prefix-mlp": {"prefix_length": 3, "prefix_hidden": 8},
    "prompt": {"prompt_length": 3},
}
TOKENS = np.random.default_rng(0).integers(1, 64, (2, 8)).astype(np.int32)
BATCH = {"inputs": TOKENS, "targets": TOKENS, "encoder_inputs": TOKENS, "decoder_inputs": TOKENS}
BATCH["attention_mask"] = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)  # padding in the encoder rows


def opened(params: nnx.State, seed: int = 1) -> nnx.State:
    """``params`` with every PEFT parameter (gates, zero up-projections too) set to random values."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        return jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype) if peft.is_peft_path(param_path(path)) else x

    return jax.tree_util.tree_map_with_path(one, params)


@functools.cache
def built(family: str, method: str = "") -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """The config, graph and seed-0 parameters of ``family`` with ``method`` (none: the base), built once for
    the tests; the same seed gives every method the same base weights. (Eager init and a jitted forward: 2.3x
    faster here than one jitted program of init and forwards.)"""
    cfg = dataclasses.replace(FAMILIES[family], **METHODS.get(method, {}))
    return cfg, *nnx.split(build_model(cfg, 0))


@functools.cache
def forward(cfg: ModelConfig):
    graphdef, _ = abstract_model(cfg)
    return jax.jit(lambda params, batch: nnx.merge(graphdef, params).forward(batch))


def compiled(model: nnx.Module, method: str = "__call__"):
    """``model.<method>`` jitted, its state an argument: a decoding step compiles once instead of op by op."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, *args, **kwargs: getattr(nnx.merge(graphdef, state), method)(*args, **kwargs))
    return functools.partial(run, state)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_starts_exactly_at_its_base_and_moves_with_its_parameters(family):
    base_cfg, _, base_params = built(family)
    base = np.asarray(forward(base_cfg)(base_params, BATCH))
    for method in METHODS:
        if method == "prefix-mlp" and family != "decoder":
            continue  # the reparameterisation changes nothing family-specific
        cfg, _, params = built(family, method)
        run = forward(cfg)
        # equal up to XLA fusing the extra zero term differently (a few 1e-9 on logits of 1e-2)
        np.testing.assert_allclose(np.asarray(run(params, BATCH)), base, rtol=0, atol=1e-7, err_msg=method)
        moved = np.abs(np.asarray(run(opened(params), BATCH)) - base).max()
        assert moved > 1e-5, (family, method)


@pytest.mark.parametrize("method", ["adapter", "prefix", "prompt"])
def test_decoding_from_a_kv_cache_gives_the_full_forward_logits(method):
    cfg, graphdef, params = built("decoder", method)
    model = nnx.merge(graphdef, opened(params))
    full, step = model(TOKENS), compiled(model)
    cache = init_cache(cfg, cfg.n_layers, 2, 16)
    first, cache = step(TOKENS[:, :5], cache=cache)  # prefill, then one token at a time
    steps = [first]
    for t in range(5, 8):
        logits, cache = step(TOKENS[:, t : t + 1], positions=jnp.full((2, 1), t), cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)


def test_t5_decoding_from_a_cache_with_a_prompted_encoder_and_prefixed_decoder():
    for method in ("prefix", "prompt"):
        _, graphdef, params = built("t5", method)
        model = nnx.merge(graphdef, opened(params))
        encoded = model.encode(TOKENS)
        full = model.decode(TOKENS, encoded)
        cache, decode = model.init_cache(encoded, None, 16), compiled(model, "decode")
        steps = []
        for t in range(8):
            logits, cache = decode(TOKENS[:, t : t + 1], cache=cache)
            steps.append(logits)
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, err_msg=method)


def test_only_the_method_trains_sharded_by_its_logical_axes_and_holds_optimizer_state():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
    opt = OptimizerConfig(schedule="constant", warmup_steps=0)
    d, layers, heads, kv = 32, 2, 4, 2 * 8
    expected = {  # per stack; the decoder family has one
        "adapter": 2 * layers * (d * 4 + 4 + 4 * d + d),  # attention and MLP bottlenecks
        "prefix": layers * (2 * 3 * kv + heads),  # keys, values, gates
        "prefix-mlp": layers * (3 * d + d * 8 + 8 + 2 * (8 * kv + kv) + heads),
        "prompt": 3 * d + layers * heads,  # the prompt, the gates
    }
    for method, fields in METHODS.items():
        cfg = dataclasses.replace(FAMILIES["decoder"], **fields)
        spec = make_state_spec(cfg, opt, 10, mesh, freeze=Freeze(adapters_only=True))
        assert spec.trainable_params == expected[method], method
        moments = sum(x.size for x in jax.tree.leaves(spec.abstract.opt_state) if x.ndim)
        assert moments == 2 * expected[method]  # AdamW mu and nu of the method's parameters only
        trainable = {param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(spec.abstract.params)}
        assert trainable - spec.frozen == {p for p in trainable if peft.is_peft_path(p)}
    specs = {param_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(spec.logical_specs, is_leaf=_spec)}
    assert specs["stack/blocks/attn/prefix_gate"] == P("layers", "heads")
    assert specs["stack/prompt"] == P(None, "embed")
    prefix = dataclasses.replace(FAMILIES["decoder"], prefix_length=3)
    shardings = make_state_spec(prefix, opt, 10, mesh, freeze=Freeze(adapters_only=True)).shardings.params
    k = {param_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}["stack/blocks/attn/prefix/k"]
    assert tuple(k.spec) == (None, None, "tensor")  # kv_heads over tensor, as the k projection's output


def flat(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        p: np.asarray(x)
        for p, x in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), sep="/").items()
    }


def _spec(x) -> bool:
    return isinstance(x, P)


def test_the_peft_section_sets_the_model_and_bad_values_are_one_error():
    tiny = ["train.steps=2", "train.seq_len=32"]
    cfg = load_config(
        "configs/tiny-gpt2.yaml", [*tiny, "peft.method=prefix", "peft.prefix.length=5", "peft.prefix.hidden=7"]
    )
    assert (cfg.model.prefix_length, cfg.model.prefix_hidden, cfg.model.peft_method) == (5, 7, "prefix")
    assert load_config("configs/tiny-gpt2.yaml", [*tiny, "lora.rank=4"]).model.peft_method == "lora"  # old spelling
    bad = {
        "peft.method=lora": "peft.method=lora needs lora.rank > 0",
        "peft.method=prompt lora.rank=4": "lora.rank and peft.prompt.length are set; a model trains one PEFT method",
        "peft.method=adapter peft.adapter.size=0": "peft.adapter.size=0 must be > 0 for peft.method=adapter",
        "peft.method=prefix peft.prefix.hidden=-1": "peft.prefix.hidden=-1",
        "peft.method=ia3": "peft.method='ia3' is not one of",
    }
    for overrides, message in bad.items():
        with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
            load_config("configs/tiny-gpt2.yaml", [*tiny, *overrides.split()])


# --- exports: written next to the base, read back as a model source with the same logits ----------


@pytest.mark.parametrize("family, method", [("classifier", "adapter"), ("decoder", "prefix-mlp"), ("t5", "prompt")])
def test_an_export_writes_the_method_beside_its_base_and_reads_back_with_the_same_logits(tmp_path, family, method):
    cfg, _, params = built(family, method)
    params = opened(params)
    want = forward(cfg)(params, BATCH)
    exporting.write_params(params, cfg, tmp_path / "src")
    with pytest.raises(ConfigError, match=f"has {cfg.peft_method} parameters, which no base weight can absorb"):
        exporting.export(tmp_path / "src", tmp_path / "hf", "hf")
    loaded = {}
    for format in ("peft", "params"):
        exporting.export(tmp_path / "src", tmp_path / format, format)
        source = loaded[format] = sources.load_source(tmp_path / format)
        assert source.config == peft.folded_config(cfg)  # a prefix's MLP is folded into keys and values
        np.testing.assert_allclose(source.model.forward(BATCH), want, atol=1e-5, err_msg=format)
    meta = json.loads((tmp_path / "peft" / "peft.json").read_text())
    assert meta["method"] == cfg.peft_method and (tmp_path / "peft" / "base" / "config.json").is_file()
    written = safetensors.numpy.load_file(tmp_path / "peft" / "peft.safetensors")
    folded = peft.peft_params(nnx.state(loaded["peft"].model, nnx.Param))
    assert sorted(written) == sorted(folded) and all(peft.is_peft_path(p) for p in written)
    assert method != "prefix-mlp" or {p.rsplit("/", 1)[-1] for p in written if "/prefix/" in p} == {"k", "v"}


# --- a prefix run: adapter-only checkpoints, exact resume, frozen base ----------------------------

RUN = [
    "configs/tiny-gpt2.yaml", "optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.lr=0.01",
    "train.seq_len=32", "train.batch_size=16", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
    "train.sample_tokens=0", "checkpoint.every=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
    "peft.method=prefix", "peft.prefix.length=4", "peft.prefix.hidden=16",
]  # fmt: skip


@pytest.mark.slow
def test_a_prefix_run_saves_only_its_parameters_and_resumes_bitwise(tmp_path):
    ref = in_this_process([*RUN, f"run.dir={tmp_path / 'ref'}", "train.steps=4"])
    stopped = in_this_process([*RUN, f"run.dir={tmp_path / 'resumed'}", "train.steps=2"])
    resumed = in_this_process([*RUN, f"run.dir={tmp_path / 'resumed'}", "train.steps=4"])
    assert [r.rc for r in (ref, stopped, resumed)] == [0, 0, 0], ref.err
    assert {**stopped.losses(), **resumed.losses()} == ref.losses()  # bitwise: same mesh, same steps
    steps = Checkpoints(tmp_path / "ref" / "checkpoints", CheckpointConfig())
    saved = {n.removeprefix("params/") for n in steps.read_manifest(4)["arrays"] if n.startswith("params/")}
    steps.close()
    assert saved and all(peft.is_peft_path(p) for p in saved)  # the base is a reference, not arrays
    # reading it rebuilds the seeded base and checks its fingerprint; the zero-initialised gates have opened
    gates = flat(sources.load_source(tmp_path / "ref").model)["stack/blocks/attn/prefix_gate"]
    assert np.abs(gates).min() > 0
