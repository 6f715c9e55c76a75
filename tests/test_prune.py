"""Pruning: the cubic schedule, exact mask counts, masks across a resume, structured pruning's smaller
model against the masked original, and ``python -m train.prune``'s errors.

Structured pruning is checked on random weights (biases and norms too), so a kept head or neuron in
the wrong place shows up; the models are tiny and run in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_runs import in_this_process
from flax import nnx, traverse_util

from models import abstract_model, build_model
from models.config import ConfigError, ModelConfig
from train import prune as prune_cli
from train.checkpoints.exporting import write_params
from train.checkpoints.sources import load_source
from train.compress import pruning
from train.compress.magnitude import pruning_steps, sparsity_at
from train.compress.structured import shrink_heads, shrink_neurons
from train.config.sections import PruneConfig
from train.run.callbacks import Callback

GPT2 = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16, compute_dtype="float32")
LLAMA = dataclasses.replace(
    GPT2, n_kv_heads=2, position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False
)
BERT = dataclasses.replace(GPT2, family="encoder", mlp="gelu_exact", post_norm=True, type_vocab_size=2, norm_eps=1e-12)
T5 = dataclasses.replace(
    GPT2, family="encoder_decoder", position="relative", norm="rmsnorm", use_bias=False, mlp="gated_gelu",
    tie_embeddings=False, scale_attention=False,
)  # fmt: skip


def random_model(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
    """The model of ``cfg`` with every parameter (biases, norm scales too) drawn at random."""
    model = build_model(cfg, seed)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def flat_params(model) -> dict:
    return {
        k: np.array(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
    }


def model_from(flat: dict, cfg: ModelConfig) -> nnx.Module:
    graphdef, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def outputs(model, cfg: ModelConfig) -> np.ndarray:
    """The model's logits on fixed random tokens, in one compiled program."""
    tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, cfg.vocab_size)
    graphdef, state = nnx.split(model)

    def forward(state):
        model = nnx.merge(graphdef, state)
        if cfg.family == "encoder_decoder":
            return model.forward({"encoder_inputs": tokens, "decoder_inputs": tokens[:, :8]})
        return model(tokens)

    return np.asarray(jax.jit(forward)(state))


def removed(kept: np.ndarray, total: int) -> list[np.ndarray]:
    """Per layer, the indices not in ``kept`` [L, k]."""
    return [np.setdiff1d(np.arange(total), row) for row in kept]


# --- the schedule and the masks --------------------------------------------------------------


def test_cubic_schedule_rises_from_zero_to_the_target_at_end_step():
    cfg = PruneConfig(sparsity=0.8, start_step=10, end_step=40, every=10)
    values = [sparsity_at(t, cfg) for t in (0, 10, 20, 25, 30, 40, 100)]
    assert values == pytest.approx(
        [0.0, 0.0, 0.8 * (1 - (2 / 3) ** 3), 0.8 * (1 - 0.5**3), 0.8 * (1 - (1 / 3) ** 3), 0.8, 0.8]
    )
    assert pruning_steps(cfg) == [10, 20, 30, 40]
    assert pruning_steps(dataclasses.replace(cfg, every=12)) == [10, 22, 34, 40]
    one_shot = PruneConfig(sparsity=0.5, start_step=3, end_step=3)
    assert pruning_steps(one_shot) == [3] and sparsity_at(2, one_shot) == 0.0 and sparsity_at(3, one_shot) == 0.5


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_zeroes_exactly_round_s_n_of_the_smallest(scope):
    cfg = dataclasses.replace(GPT2, scan_layers=True)
    params = nnx.state(random_model(cfg), nnx.Param)
    pruned, masks, counts = pruning.magnitude(params, cfg, 0.3, scope, PruneConfig.targets)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(pruned), sep="/")
    masks = traverse_util.flatten_dict(masks, sep="/")
    assert sorted(masks) == sorted(p for p in flat if p.endswith("kernel") and "blocks" in p)  # q k v o wi wo
    total = sum(m.size for m in masks.values())
    if scope == "global":
        assert sum(counts.values()) == int(np.floor(0.3 * total + 0.5))
        small = max(float(np.abs(flat[p])[~np.asarray(m)].max()) for p, m in masks.items())
        large = min(float(np.abs(flat[p])[np.asarray(m)].min()) for p, m in masks.items())
        assert small <= large  # one ranking over all targeted matrices
    else:
        for path, mask in masks.items():  # each layer row of each stacked matrix on its own
            rows = np.asarray(mask).reshape(mask.shape[0], -1)
            assert (rows.shape[1] - rows.sum(1) == int(np.floor(0.3 * rows.shape[1] + 0.5))).all(), path
    for path, mask in masks.items():
        assert (flat[path][~np.asarray(mask)] == 0).all() and (flat[path][np.asarray(mask)] != 0).all()


def test_masks_are_sharded_like_their_parameters_on_the_stacked_layers():
    from sharding.mesh import MeshConfig, make_mesh
    from train.config.sections import OptimizerConfig
    from train.core.freeze import param_path
    from train.core.state import make_state_spec

    cfg = dataclasses.replace(LLAMA, scan_layers=True)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    spec = make_state_spec(cfg, OptimizerConfig(), 10, mesh, prune=PruneConfig(sparsity=0.5, scope="layer"))
    params = {param_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(spec.shardings.params)}
    masks = {param_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(spec.shardings.opt_state.masks)}
    kinds = {param_path(p): a.dtype for p, a in jax.tree_util.tree_leaves_with_path(spec.abstract.opt_state.masks)}
    assert sorted(masks) == sorted(p for p in params if p.startswith("stack/blocks/") and p.endswith("kernel"))
    assert all(masks[p].spec == params[p].spec for p in masks) and set(kinds.values()) == {jnp.dtype(bool)}
    assert masks["stack/blocks/mlp/wi/kernel"].spec[2] == "tensor"  # [layers, embed, mlp]: mlp over tensor


def frozen_pruned_spec(scope: str, freeze, targets: str = PruneConfig.targets):
    """A state spec of GPT2 on data x fsdp x tensor with AdamW (weight decay), ``freeze`` and one-shot
    pruning to 0.5 at step 0."""
    from sharding.mesh import MeshConfig, make_mesh
    from train.config.sections import OptimizerConfig
    from train.core.state import make_state_spec

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    optimizer = OptimizerConfig(schedule="constant", warmup_steps=0, weight_decay=0.1)
    prune = PruneConfig(sparsity=0.5, scope=scope, targets=targets)
    return make_state_spec(GPT2, optimizer, 10, mesh, freeze=freeze, prune=prune), mesh


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruning_keeps_frozen_weights_bitwise_and_prunes_only_trainable_ones(scope):
    """train.freeze (every mlp/wi) and train.freeze_layers=1 with prune: after two steps the frozen
    matrices and layer 0 of every stacked parameter are bitwise unchanged, and the trainable targets
    (layer 1 of q, k, v, o and mlp/wo) hold exactly the 0.5 share of zeros the sparsity asks for."""
    from train.core.freeze import Freeze, param_path
    from train.core.state import init_state
    from train.core.step import make_train_step

    spec, mesh = frozen_pruned_spec(scope, Freeze("stack/blocks/mlp/wi", layers=1))
    state = init_state(spec, GPT2, seed=0)
    flat = lambda s: {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(s.params)}
    before, step = flat(jax.device_get(state)), make_train_step(spec, mesh, 1)
    for tokens in np.random.default_rng(0).integers(0, 64, (2, 8, 17)).astype(np.int32):
        state, metrics = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    after = flat(jax.device_get(state))
    np.testing.assert_array_equal(after["stack/blocks/mlp/wi/kernel"], before["stack/blocks/mlp/wi/kernel"])
    for path in [p for p in after if p.startswith("stack/")]:
        np.testing.assert_array_equal(after[path][0], before[path][0], err_msg=path)  # layer 0: frozen
    pruned = [p for p in after if p.startswith("stack/blocks/") and p.endswith("kernel") and "mlp/wi" not in p]
    zeros = {p: int((after[p][1] == 0).sum()) for p in pruned}
    if scope == "layer":
        assert zeros == {p: after[p][1].size // 2 for p in pruned}
    else:
        assert sum(zeros.values()) == sum(after[p][1].size for p in pruned) // 2
    assert float(metrics["sparsity"]) == 0.5  # over the prunable values


def test_pruning_targets_that_are_all_frozen_are_refused():
    from train.core.freeze import Freeze

    with pytest.raises(ConfigError, match="prune.targets='mlp/' matches only frozen weights"):
        frozen_pruned_spec("global", Freeze("stack/blocks/mlp"), targets="mlp/")
    with pytest.raises(ConfigError, match="train.freeze_layers=2\\); target trainable matrices or freeze less"):
        frozen_pruned_spec("layer", Freeze(layers=2))


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, loop, step: int) -> None:
        if step == self.step:
            loop.request_stop("interrupted")


@pytest.mark.slow
def test_pruned_run_resumes_bitwise_and_masked_weights_stay_zero(tmp_path):
    """Gradual pruning (to 0.35 before step 2, then 0.48 and 0.5) with a checkpoint at step 2 in between,
    against an uninterrupted run."""
    argv = [
        "configs/tiny-gpt2.yaml", "optimizer.schedule=constant", "optimizer.warmup_steps=2", "train.steps=4",
        "train.seq_len=32", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
        "train.sample_tokens=0", "checkpoint.every=0", "mesh.fsdp=4", "mesh.tensor=2",
        "prune.sparsity=0.5", "prune.scope=layer", "prune.start_step=0", "prune.end_step=3", "prune.every=1",
    ]  # fmt: skip
    whole = in_this_process([*argv, f"run.dir={tmp_path / 'whole'}"])
    first = in_this_process([*argv, f"run.dir={tmp_path / 'parts'}"], callbacks=(StopAt(2),))
    rest = in_this_process([*argv, f"run.dir={tmp_path / 'parts'}"])
    assert whole.rc == first.rc == rest.rc == 0, whole.err + first.err + rest.err
    assert "resumed from" in rest.out
    losses = {r["step"]: (r["loss"], r["sparsity"]) for r in whole.metrics if "loss" in r}
    resumed = {r["step"]: (r["loss"], r["sparsity"]) for r in rest.metrics if "loss" in r}
    assert resumed == losses  # bitwise: same losses and measured sparsity at every step
    assert losses[1][1] == 0.0 and 0.3 < losses[2][1] < 0.4 and losses[4][1] == pytest.approx(0.5, abs=1e-3)
    a, b = flat_params(load_source(tmp_path / "whole").model), flat_params(load_source(tmp_path / "parts").model)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(path))
    for path in [p for p in a if p[-1] == "kernel" and "blocks" in p]:  # per layer row: exactly half zero
        rows = a[path].reshape(a[path].shape[0], -1)
        assert ((rows == 0).sum(1) == rows.shape[1] // 2).all()


# --- structured pruning ----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [GPT2, LLAMA, BERT], ids=["gpt2", "llama-gqa", "bert"])
def test_removing_heads_equals_zeroing_their_output_rows(cfg):
    model = random_model(cfg)
    flat = flat_params(model)
    small, small_cfg, kept = shrink_heads(flat, cfg, 0.5)
    hd = cfg.dim_per_head
    assert (small_cfg.n_heads, small_cfg.kv_heads, small_cfg.dim_per_head) == (2, 1 if cfg is LLAMA else 2, hd)
    masked = dict(flat)
    o = masked[("stack", "blocks", "attn", "o", "kernel")].copy()
    for layer, heads in enumerate(removed(kept["stack"], cfg.n_heads)):
        for h in heads:
            o[layer, h * hd : (h + 1) * hd] = 0
    masked[("stack", "blocks", "attn", "o", "kernel")] = o
    if cfg is LLAMA:  # whole groups: query heads 2g, 2g + 1 go with kv head g
        assert all(row[0] % 2 == 0 and row[1] == row[0] + 1 for row in kept["stack"])
    expect = outputs(model_from(masked, cfg), cfg)
    np.testing.assert_allclose(outputs(model_from(small, small_cfg), small_cfg), expect, atol=2e-5, rtol=1e-5)
    assert not np.allclose(outputs(model, cfg), expect, atol=1e-3)  # the heads did matter


@pytest.mark.parametrize("cfg", [GPT2, LLAMA, BERT, T5], ids=["gpt2", "llama", "bert", "t5"])
def test_removing_neurons_equals_zeroing_their_output_rows(cfg):
    model = random_model(cfg)
    flat = flat_params(model)
    small, small_cfg, kept = shrink_neurons(flat, cfg, 0.25)
    assert small_cfg.d_ff == 36 and set(kept) == ({"encoder", "decoder"} if cfg is T5 else {"stack"})
    masked = dict(flat)
    for stack, index in kept.items():
        path = (*stack.split("/"), "blocks", "mlp", "wo", "kernel")
        wo = masked[path].copy()
        for layer, neurons in enumerate(removed(index, cfg.d_ff)):
            wo[layer, neurons] = 0
        masked[path] = wo
    expect = outputs(model_from(masked, cfg), cfg)
    np.testing.assert_allclose(outputs(model_from(small, small_cfg), small_cfg), expect, atol=2e-5, rtol=1e-5)


def test_neurons_of_least_weight_norm_go_first():
    flat = flat_params(random_model(GPT2))
    wo = flat[("stack", "blocks", "mlp", "wo", "kernel")]
    wo[:, 5] *= 1e-3  # neuron 5 of every layer writes almost nothing
    _, _, kept = shrink_neurons(flat, GPT2, 1 / 48)
    assert all(5 not in row for row in kept["stack"]) and kept["stack"].shape == (2, 47)


def test_taylor_importance_keeps_the_units_with_the_largest_loss_estimates():
    flat = flat_params(random_model(LLAMA))
    wo = np.zeros((2, LLAMA.d_ff))
    wo[:, [3, 17, 40]] = [1.0, 2.0, 3.0]  # three neurons matter, in both layers
    o = np.zeros((2, LLAMA.n_heads * LLAMA.dim_per_head))
    o[0, -1], o[1, 0] = 1.0, 1.0  # layer 0: a row of head 3 (group 1); layer 1: of head 0 (group 0)
    contributions = {("stack", "blocks", "mlp", "wo", "kernel"): wo, ("stack", "blocks", "attn", "o", "kernel"): o}
    _, _, neurons = shrink_neurons(flat, LLAMA, 45 / 48, contributions)
    _, _, heads = shrink_heads(flat, LLAMA, 0.5, contributions)
    assert neurons["stack"].tolist() == [[3, 17, 40]] * 2
    assert heads["stack"].tolist() == [[2, 3], [0, 1]]


# --- the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name, cfg in (("gpt2", GPT2), ("t5", T5)):
        write_params(nnx.state(random_model(cfg), nnx.Param), cfg, root / name)
        out[name] = root / name
    return out


@pytest.mark.slow
def test_prune_cli_writes_a_smaller_export_that_loads_and_warm_starts(exports, tmp_path, capsys):
    from train.checkpoints.sources import warm_start
    from train.checkpoints.store import restore_target

    out = tmp_path / "neurons"
    assert prune_cli.main([str(exports["gpt2"]), str(out), "--method", "neurons", "--sparsity", "0.5"]) == 0
    assert "model.d_ff=24" in capsys.readouterr().out
    record = json.loads((out / "prune.json").read_text())
    assert (record["d_ff"], record["params_after"] < record["params_before"]) == (24, True)
    source = load_source(out)
    assert source.config.d_ff == 24 and source.kind == "export"
    cfg = dataclasses.replace(GPT2, d_ff=24)
    abstract = abstract_model(cfg)[1]
    fresh = nnx.state(build_model(cfg, 3), nnx.Param)
    target = restore_target(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    started = warm_start(str(out), fresh, target, cfg)
    want, got = flat_params(source.model), traverse_util.flatten_dict(nnx.to_pure_dict(started))
    assert all(np.array_equal(want[p], np.asarray(got[p])) for p in want)


@pytest.mark.slow
def test_prune_cli_magnitude_keeps_shapes_and_writes_masks(exports, tmp_path):
    out = tmp_path / "magnitude"
    assert prune_cli.main([str(exports["gpt2"]), str(out), "--method", "magnitude", "--sparsity", "0.5"]) == 0
    record = json.loads((out / "prune.json").read_text())
    assert record["zeros"] == record["targeted"] // 2 and record["params_after"] == record["params_before"]
    assert (out / "masks").is_dir() and load_source(out).config == GPT2


@pytest.mark.slow
@pytest.mark.parametrize(
    "source, args, message",
    [
        ("gpt2", ["--method", "neurons", "--sparsity", "1.0"], "--sparsity 1.0 must be in [0, 1)"),
        ("gpt2", ["--method", "heads", "--sparsity", "0.9"], "would remove all 4 heads"),
        ("gpt2", ["--method", "heads", "--sparsity", "0.1"], "removes none of the 4 heads"),
        (
            "gpt2",
            ["--method", "neurons", "--sparsity", "0.5", "--scope", "layer"],
            "--scope applies to --method magnitude",
        ),
        ("gpt2", ["--method", "channels", "--sparsity", "0.5"], "--method channels is not one of"),
        ("t5", ["--method", "heads", "--sparsity", "0.5"], "does not apply to family encoder_decoder"),
        ("gpt2", ["--method", "neurons", "--sparsity", "0.5", "--importance", "taylor"], "needs a run directory"),
    ],
)
def test_prune_cli_refuses_bad_requests_with_one_error_line(exports, tmp_path, capsys, source, args, message):
    assert prune_cli.main([str(exports[source]), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_prune_cli_checks_the_targets_regex_before_loading_the_model(tmp_path, capsys):
    args = ["--method", "magnitude", "--sparsity", "0.5", "--targets", "("]
    assert prune_cli.main([str(tmp_path / "no-model"), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --targets '(' is not a regex (missing ), unterminated subpattern"), err
    assert err.count("\n") == 1


def test_prune_config_errors_name_the_key():
    from train.config.sections import load_config

    with pytest.raises(ConfigError, match=r"prune.sparsity=1.5 must be in \[0, 1\)"):
        load_config(None, ["prune.sparsity=1.5"])
    with pytest.raises(ConfigError, match="end_step < train.steps=1400"):
        load_config(None, ["prune.sparsity=0.5", "prune.end_step=1400"])
