"""LoRA: adapters beside the targeted kernels (logical axes, the scanned stack), only they train,
``--merge-lora`` folds them into the base, and a LoRA run resumes exactly; 8 fake CPU devices."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import in_this_process
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import build_model, hf, lora
from models.config import ConfigError, ModelConfig
from sharding.mesh import make_mesh
from train import export
from train.checkpoints import exporting, sources
from train.config.sections import MeshConfig, OptimizerConfig
from train.core.freeze import Freeze, param_path
from train.core.state import count_params, make_state_spec
from train.core.step import make_train_step

R = 4
ATTN_AND_MLP = "(.*/)?(attn/(q|k|v|o)|mlp/(wi|wo))"
MODEL = ModelConfig(
    vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=32, compute_dtype="float32",
    lora_rank=R, lora_alpha=8.0, lora_targets=ATTN_AND_MLP,
)  # fmt: skip
# sum over targets of r * (in + out), times 2 layers: q, k, v, o 64 -> 64; wi 64 -> 256; wo 256 -> 64
EXPECTED_TRAINABLE = 2 * (4 * R * (64 + 64) + 2 * R * (64 + 256))


def spec_for(model_cfg: ModelConfig, mesh_sizes=(2, 2, 2)):
    data, fsdp, tensor = mesh_sizes
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[: data * fsdp * tensor])
    opt = OptimizerConfig(schedule="constant", warmup_steps=0, lr=0.02, weight_decay=0.1)
    return make_state_spec(model_cfg, opt, 10, mesh, freeze=Freeze(adapters_only=True)), mesh


def by_path(tree) -> dict:
    return {param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def spec():
    return spec_for(MODEL)[0]


def test_adapters_sit_beside_the_targets_stacked_with_logical_axes(spec):
    specs, shapes = by_path(spec.logical_specs), {k: v.shape for k, v in by_path(spec.abstract.params).items()}
    assert shapes["stack/blocks/attn/q/lora_a"] == (2, 64, R)
    assert specs["stack/blocks/attn/q/lora_a"] == P("layers", "embed", None)
    assert shapes["stack/blocks/attn/k/lora_b"] == (2, R, 64)
    assert specs["stack/blocks/attn/k/lora_b"] == P("layers", None, "kv_heads")
    assert specs["stack/blocks/mlp/wo/lora_a"] == P("layers", "mlp", None)
    adapters = sorted(p.rsplit("/", 2)[1] for p in specs if p.endswith("lora_a"))
    assert adapters == ["k", "o", "q", "v", "wi", "wo"]
    # the mesh shards them like their kernels: fsdp over embed, tensor over heads
    q_b = by_path(spec.shardings.params)["stack/blocks/attn/q/lora_b"].spec
    assert tuple(q_b)[:3] == (None, None, "tensor")


def test_only_the_adapters_count_as_trainable_and_hold_optimizer_state(spec):
    assert spec.trainable_params == EXPECTED_TRAINABLE
    assert EXPECTED_TRAINABLE < 0.1 * count_params(spec.abstract.params)
    moments = sum(x.size for x in jax.tree.leaves(spec.abstract.opt_state) if x.ndim)
    assert moments == 2 * EXPECTED_TRAINABLE  # AdamW mu and nu of the adapters only


def test_a_lora_classifier_also_trains_its_fresh_head():
    classifier = ModelConfig(
        **{**MODEL.__dict__, "family": "encoder", "head": "classification", "num_labels": 3, "type_vocab_size": 2}
    )
    head = (64 * 64 + 64) + (64 * 3 + 3)  # pooler and classifier kernels and biases
    assert spec_for(classifier, (1, 1, 1))[0].trainable_params == EXPECTED_TRAINABLE + head


def test_a_fresh_lora_model_equals_its_base_and_the_default_targets_are_attention():
    tokens = np.random.default_rng(1).integers(0, 256, size=(2, 16), dtype=np.int32)
    base = jax.jit(lambda t: build_model(lora.base_config(MODEL), seed=0)(t))(tokens)
    with_adapters = jax.jit(lambda t: build_model(MODEL, seed=0)(t))(tokens)
    np.testing.assert_array_equal(np.asarray(with_adapters), np.asarray(base))  # B starts at zero
    default = ModelConfig(**{**MODEL.__dict__, "lora_targets": ModelConfig.lora_targets})
    paths = by_path(nnx.state(nnx.eval_shape(lambda: build_model(default, 0)), nnx.Param))
    assert sorted(p for p in paths if "lora" in p)[:2] == ["stack/blocks/attn/k/lora_a", "stack/blocks/attn/k/lora_b"]
    assert not any("mlp" in p and "lora" in p for p in paths)


def test_targets_that_match_no_kernel_are_refused():
    bad = ModelConfig(**{**MODEL.__dict__, "lora_targets": "stack/blocks/attn/qq"})
    with pytest.raises(ConfigError, match="lora.targets='stack/blocks/attn/qq' matches no Dense kernel"):
        build_model(bad, 0)


# --- the CLI: a LoRA run from the lora: section, its exact resume and its merged export -----------

FAST = [
    "configs/tiny-gpt2.yaml",
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=0",
    "optimizer.lr=0.01",
    "train.seq_len=32",
    "train.batch_size=16",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "checkpoint.every=2",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]
LORA = [
    *FAST,
    f"lora.rank={R}",
    "lora.alpha=8",
    f"lora.targets={ATTN_AND_MLP}",
    "lora.dropout=0.1",  # so the exact resume also covers the adapters' dropout masks
]


def dot_shapes(spec, mesh) -> list[tuple[int, ...]]:
    """The result shape of every dot_general in the train step of ``spec``, lowered (before XLA removes
    unused values) for an [8, 16] token batch."""
    batch = {k: jax.ShapeDtypeStruct((8, 16), jnp.int32) for k in ("inputs", "targets")}
    text = make_train_step(spec, mesh, 1).lower(spec.abstract, batch).as_text()
    found = re.findall(r"stablehlo\.dot_general .*-> tensor<([\dx]+)x\w+>", text)
    return [tuple(map(int, shape.split("x"))) for shape in found]


def test_a_lora_step_computes_no_weight_gradient_of_its_frozen_base():
    """No dot_general of the LoRA step has the shape of a base matrix, one layer's [d_in, d_out] either
    way round (a weight gradient contracts batch and length away); full fine-tuning has one per matrix."""
    spec, mesh = spec_for(MODEL)
    shapes = {param_path(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(spec.abstract.params)}
    base = {tuple(sorted(s[-2:])) for p, s in shapes.items() if p.endswith(("kernel", "embedding"))}
    assert base == {(64, 64), (64, 256)}  # q, k, v, o; wi, wo and the tied embedding [256, 64]
    full = make_state_spec(dataclasses.replace(MODEL, lora_rank=0), OptimizerConfig(), 10, mesh)
    weight_gradients = lambda spec: [s for s in dot_shapes(spec, mesh) if tuple(sorted(s)) in base]
    assert weight_gradients(spec) == []
    assert len(weight_gradients(full)) >= 7  # q, k, v, o, wi, wo of the scanned layer, and the embedding


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A plain base run (2 steps), LoRA runs started from it (init_from), and exports."""
    root = tmp_path_factory.mktemp("lora-runs")
    lora_run = [*LORA, f"checkpoint.init_from={root / 'base'}"]
    out = {"lora_run": lora_run}
    out |= {
        "root": root,
        "base": in_this_process([*FAST, f"run.dir={root / 'base'}", "train.steps=2"]),
        "ref": in_this_process([*lora_run, f"run.dir={root / 'ref'}", "train.steps=6"]),
        "stopped": in_this_process([*lora_run, f"run.dir={root / 'resumed'}", "train.steps=3"]),
        "resumed": in_this_process([*lora_run, f"run.dir={root / 'resumed'}", "train.steps=6"]),
    }
    for src, name, flags in [("ref", "merged", ["--merge-lora"]), ("ref", "adapters", []), ("base", "base-export", [])]:
        assert export.main([str(root / src), str(root / name), *flags]) == 0
        out[name] = sources.load_export(root / name)
    assert export.main([str(root / "ref"), str(root / "hf"), "--merge-lora", "--format=hf"]) == 0
    out["hf"] = hf.load(root / "hf", compute_dtype="float32")
    with pytest.raises(ConfigError, match="has LoRA adapters, which the Hugging Face layout lacks; add --merge-lora"):
        exporting.export(root / "ref", root / "hf-unmerged", "hf")
    with pytest.raises(ConfigError, match="has no LoRA adapters"):
        exporting.export(root / "base", root / "base-merged", merge_lora=True)
    return out


@pytest.mark.slow
def test_a_lora_run_trains_only_the_adapters_and_resumes_exactly(runs):
    assert [runs[k].rc for k in ("base", "ref", "stopped", "resumed")] == [0, 0, 0, 0], runs["ref"].err
    assert "restored 20 parameters; initialised fresh: stack.blocks.attn.k.lora_a, " in runs["ref"].out  # all the base
    first = next(r for r in runs["ref"].metrics if "loss" in r)
    assert first["trainable_params"] == EXPECTED_TRAINABLE
    ref = runs["ref"].losses()
    assert ref[6] < ref[1] - 0.05
    assert {**runs["stopped"].losses(), **runs["resumed"].losses()} == ref  # bitwise: same mesh, same steps


@pytest.mark.slow
def test_merge_lora_exports_a_plain_model_equal_to_the_adapter_model(runs):
    adapter_cfg, adapter_params = runs["adapters"]
    merged_cfg, merged_params = runs["merged"]
    assert adapter_cfg.lora_rank == R and merged_cfg.lora_rank == 0
    assert not any("lora" in p for p in by_path(merged_params))
    # the base weights the LoRA run saved are those of the run it started from, bitwise
    base_cfg, base_params = runs["base-export"]
    assert merged_cfg == base_cfg == lora.base_config(adapter_cfg)
    initial = by_path(base_params)
    for path, value in by_path(adapter_params).items():
        if not path.endswith(("lora_a", "lora_b")):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(initial[path]), err_msg=path)
    tokens = np.random.default_rng(3).integers(0, 200, size=(2, 32), dtype=np.int32)

    def logits(cfg, params):
        return np.asarray(nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg, 0))), params)(tokens))

    expected = logits(adapter_cfg, adapter_params)
    assert np.abs(expected - logits(base_cfg, base_params)).max() > 1e-3  # trained
    np.testing.assert_allclose(logits(merged_cfg, merged_params), expected, rtol=1e-5, atol=1e-5)
    hf_model, _ = runs["hf"]  # the merged model in the Hugging Face layout, read back
    np.testing.assert_allclose(np.asarray(hf_model(tokens)), expected, rtol=1e-5, atol=1e-5)


def test_adapter_dropout_is_off_without_a_key_and_a_zero_rate_changes_nothing():
    """lora.dropout acts on the adapter path only: rate 0 with a key, or any rate without one (eval),
    gives the model without dropout bitwise; with a key and a rate the output changes, the same per key."""
    tokens = np.random.default_rng(2).integers(0, 256, size=(2, 16), dtype=np.int32)

    def forward(cfg, rng=None):
        graphdef, params = nnx.split(build_model(cfg, seed=0))
        b = {p: x for p, x in by_path(params).items() if p.endswith("lora_b")}
        params = jax.tree_util.tree_map_with_path(  # nonzero B, so the adapters contribute
            lambda p, x: x + 0.05 if param_path(p) in b else x, params
        )
        run = jax.jit(lambda p, t, r: nnx.merge(graphdef, p).forward({"inputs": t}, rng=r))
        return np.asarray(run(params, tokens, rng))

    key = jax.random.key(5)
    dropping = ModelConfig(**{**MODEL.__dict__, "lora_dropout": 0.5})
    plain = forward(MODEL)
    np.testing.assert_array_equal(forward(MODEL, key), plain)
    np.testing.assert_array_equal(forward(dropping), plain)
    dropped = forward(dropping, key)
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(forward(dropping, key), dropped)


@pytest.mark.slow
def test_a_lora_checkpoint_holds_the_adapters_and_a_reference_to_its_base(runs):
    root = runs["root"]

    def disk(step: pathlib.Path) -> int:
        return sum(f.stat().st_size for f in step.rglob("*") if f.is_file())

    def array_bytes(step: pathlib.Path) -> int:  # what the arrays the manifest lists hold
        arrays = json.loads((step / "manifest" / "metadata").read_text())["arrays"].values()
        return sum(4 * int(np.prod(json.loads(a.split("[", 1)[1].split("]")[0].join("[]")))) for a in arrays)

    full, adapters = root / "base" / "checkpoints" / "2", root / "ref" / "checkpoints" / "6"
    assert array_bytes(adapters) < 0.1 * array_bytes(full), (array_bytes(adapters), array_bytes(full))
    # On disk Orbax adds about 2 KB of metadata per array, and OCDBT stores the sub-KB shards of this tiny
    # model's adapters inline in its B-tree nodes, more than once (train/checkpoints/store.py), which weighs on
    # them: one device and the default GPT give 2.5% (README.md, benchmarks/lora_checkpoint_size.py).
    assert disk(adapters) < 0.35 * disk(full), (disk(adapters), disk(full))
    ref = json.loads((root / "ref" / "checkpoints" / "6" / "base" / "metadata").read_text())
    first = next(r for r in runs["ref"].metrics if "loss" in r)
    assert ref["init_from"] == str(root / "base") and ref["seed"] == 0
    assert ref["params"] == first["params"] - EXPECTED_TRAINABLE and len(ref["fingerprint"]) == 64


@pytest.mark.slow
def test_a_moved_or_changed_base_is_named_and_nothing_is_lost(runs, tmp_path, capsys):
    root = runs["root"]
    base, aside = root / "base", root / "base.aside"
    steps = sorted(p.name for p in (root / "resumed" / "checkpoints").iterdir())
    base.rename(aside)
    try:
        assert export.main([str(root / "ref"), str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: the checkpoint ")
        assert f"holds only LoRA adapters; its base model '{base}'" in err[0] and "is missing; put the base" in err[0]
        resume = in_this_process([*runs["lora_run"], f"run.dir={root / 'resumed'}", "train.steps=8"])
        assert resume.rc == 2 and "is missing; put the base back at that path" in resume.err
        shutil.copytree(root / "merged", base)  # another model there: the base with the trained adapters folded in
        with pytest.raises(ConfigError, match=f"its base model '{base}' .* has changed since the run saved it"):
            exporting.export(root / "ref", tmp_path / "b")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        aside.rename(base)
    assert sorted(p.name for p in (root / "resumed" / "checkpoints").iterdir()) == steps


@pytest.mark.slow
def test_resuming_with_other_optimizer_or_freeze_settings_names_them(runs):
    root = runs["root"]
    sgd = in_this_process([*runs["lora_run"], f"run.dir={root / 'resumed'}", "train.steps=8", "optimizer.name=sgd"])
    frozen = in_this_process([*FAST, f"run.dir={root / 'base'}", "train.steps=4", "train.freeze=embed"])
    for run, setting in [(sgd, "optimizer.name: 'adamw' -> 'sgd'"), (frozen, "train.freeze: '' -> 'embed'")]:
        lines = run.err.strip().splitlines()
        assert run.rc == 2 and len(lines) == 1 and lines[0].startswith("error: checkpoint "), run.err
        assert f"holds a train state of other settings ({setting}" in lines[0]
        assert f"or start a new run.dir with checkpoint.init_from={run.dir} to continue" in lines[0]
