"""Optimizers (AdamW, Adafactor, SGD with momentum) and frozen parameters.

The update rules are checked on a two-parameter tree against their formulas (and Adafactor
against ``optax.adafactor``); shardings, freezing and the trainable count on the tiny Llama (no
biases: their gradients are rounding noise that Adafactor's normalisation would amplify) on 8 fake
CPU devices, a few steps of random tokens each.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_runs import in_this_process
from jax.sharding import PartitionSpec as P

from sharding.mesh import make_mesh
from train.config.sections import ConfigError, MeshConfig, OptimizerConfig, load_config
from train.core.freeze import NOTHING, Freeze, frozen_paths, param_path
from train.core.optimizer import make_optimizer, schedule
from train.core.state import count_params, init_state, make_state_spec
from train.core.step import make_train_step, summed_loss
from train.data.tokenizer import ByteTokenizer
from train.run.loop import resolve_model

SPECS = {"w": P("embed", "mlp"), "b": P("mlp")}  # a matrix (decayed) and a vector (not decayed)
PLAIN = {"schedule": "constant", "warmup_steps": 0, "clip_norm": 0.0, "weight_decay": 0.0, "lr": 0.1}


def tree(rng: np.random.Generator, rows: int = 3, cols: int = 4) -> dict:
    return {"w": jnp.asarray(rng.normal(size=(rows, cols)), jnp.float32), "b": jnp.asarray(rng.normal(size=cols))}


def optimizer(params: dict, **overrides) -> optax.GradientTransformation:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx, trainable = make_optimizer(OptimizerConfig(**{**PLAIN, **overrides}), 10, abstract, SPECS, NOTHING)
    assert trainable == count_params(params)
    return tx


def updates(tx, params: dict, grads: list[dict]) -> list[dict]:
    """The updates of successive steps (parameters held fixed, so only the state carries over)."""
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        out.append(u)
    return out


# --- update rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_follows_heavy_ball_and_nesterov_rules(nesterov):
    rng = np.random.default_rng(0)
    params, g1, g2 = tree(rng), tree(rng), tree(rng)
    u1, u2 = updates(optimizer(params, name="sgd", momentum=0.9, nesterov=nesterov), params, [g1, g2])
    for k in params:
        buf1, buf2 = g1[k], g2[k] + 0.9 * g1[k]
        step1, step2 = (g1[k] + 0.9 * buf1, g2[k] + 0.9 * buf2) if nesterov else (buf1, buf2)
        np.testing.assert_allclose(u1[k], -0.1 * step1, rtol=1e-6)
        np.testing.assert_allclose(u2[k], -0.1 * step2, rtol=1e-6)


def test_sgd_without_momentum_is_plain_sgd_and_keeps_no_state():
    rng = np.random.default_rng(1)
    params, g = tree(rng), tree(rng)
    tx = optimizer(params, name="sgd", momentum=0.0)
    assert [x for x in jax.tree.leaves(tx.init(params)) if x.ndim] == []  # only the schedule's step count
    (u,) = updates(tx, params, [g])
    for k in params:
        np.testing.assert_allclose(u[k], -0.1 * g[k], rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_weight_decay_is_decoupled_and_only_shrinks_matrices(name):
    """With a zero gradient every optimizer's own step is zero: what is left is -lr * wd * w on matrices."""
    rng = np.random.default_rng(2)
    params = tree(rng)
    zero = jax.tree.map(jnp.zeros_like, params)
    (u,) = updates(optimizer(params, name=name, weight_decay=0.5), params, [zero])
    np.testing.assert_allclose(u["w"], -0.1 * 0.5 * params["w"], rtol=1e-6)
    np.testing.assert_array_equal(u["b"], np.zeros(4))


def test_adafactor_matches_optax_adafactor_and_factors_large_matrices():
    rng = np.random.default_rng(3)
    params = tree(rng, 160, 192)  # both axes >= min_dim_size_to_factor (128): factored
    grads = [tree(rng, 160, 192) for _ in range(3)]
    tx = optimizer(params, name="adafactor", lr=0.01)
    reference = optax.adafactor(0.01, decay_rate=0.8, clipping_threshold=1.0, min_dim_size_to_factor=128)
    for ours, theirs in zip(updates(tx, params, grads), updates(reference, params, grads)):
        for k in params:
            np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-9)
    moments = {
        (jax.tree_util.keystr(path), leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tx.init(params))
        if leaf.ndim
    }  # v_row: the second largest axis kept (160,), v_col: the largest (192,); full v only for the vector
    assert moments == {
        ("[0].v_row['w']", (160,)),
        ("[0].v_col['w']", (192,)),
        ("[0].v['b']", (192,)),
        ("[0].v_row['b']", (1,)),
        ("[0].v_col['b']", (1,)),
        ("[0].v['w']", (1,)),
    }


def test_rsqrt_schedule_warms_up_then_decays_as_t5():
    lr = schedule(OptimizerConfig(lr=0.01, schedule="rsqrt", warmup_steps=10_000), 100_000)
    assert float(lr(5_000)) == pytest.approx(0.005)
    for step in (10_000, 40_000, 90_000):  # T5: 1 / sqrt(max(step, 10k))
        assert float(lr(step)) == pytest.approx(1 / np.sqrt(step), rel=1e-6)


def test_unknown_optimizer_name_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"optimizer.name='adam' is not one of 'adamw', 'adafactor', 'sgd'"):
        load_config(None, ["optimizer.name=adam"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.momentum=1.5", "optimizer.momentum must be in [0, 1)"),
        ("optimizer.decay_rate=0", "optimizer.decay_rate must be > 0"),
        ("train.freeze=(", "train.freeze='(' is not a regular expression"),
        ("train.freeze_layers=-1", "train.freeze_layers must be >= 0"),
    ],
)
def test_impossible_optimizer_and_freeze_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


# --- the tiny Llama on a mesh ---------------------------------------------------------------

STEPS = 2


@pytest.fixture(scope="module")
def model_cfg():
    return resolve_model(load_config("configs/tiny-llama.yaml").model, ByteTokenizer.vocab_size)


def batches() -> list[dict]:
    tokens = np.random.default_rng(0).integers(0, 256, size=(STEPS, 16, 33), dtype=np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def spec_for(model_cfg, mesh_sizes, freeze: Freeze = NOTHING, **opt):
    data, fsdp, tensor = mesh_sizes
    devices = jax.devices()[: data * fsdp * tensor]
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices)
    cfg = OptimizerConfig(**{"schedule": "constant", "warmup_steps": 0, **opt})
    return make_state_spec(model_cfg, cfg, 10, mesh, freeze=freeze), mesh


def train(spec, mesh, model_cfg) -> tuple[list[float], object, object]:
    """(losses, initial host state, final host state) after STEPS steps."""
    state = init_state(spec, model_cfg, seed=0)
    initial = jax.device_get(state)
    step, losses = make_train_step(spec, mesh, 1), []
    for batch in batches():
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, initial, jax.device_get(state)


def by_path(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def trim(spec: P) -> P:
    """``spec`` without trailing None entries (P(None) and P() say the same)."""
    axes = list(spec)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def state_path(path) -> str:
    """An optimizer state leaf's path without the chain's indices: 'v_row/stack/blocks/mlp/wi/kernel'."""
    return re.sub(r"^(\d+/)+", "", param_path(path))


ADAFACTOR = {"name": "adafactor", "lr": 0.05, "min_dim_size_to_factor": 32}  # factor the 64-wide matrices


def test_adafactor_factored_moments_are_sharded_like_their_parameter_without_the_reduced_axis(model_cfg):
    spec, _ = spec_for(model_cfg, (1, 4, 2), **ADAFACTOR)
    shardings = {state_path(p): trim(s.spec) for p, s in jax.tree_util.tree_leaves_with_path(spec.shardings.opt_state)}
    shapes = {state_path(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(spec.abstract.opt_state)}
    # ('layers', 'embed', 'mlp') [2, 64, 192] -> P(None, 'fsdp', 'tensor'): v_row drops the mlp axis, v_col the embed axis
    assert shapes["v_row/stack/blocks/mlp/wi/kernel"] == (2, 64)
    assert shardings["v_row/stack/blocks/mlp/wi/kernel"] == P(None, "fsdp")
    assert shapes["v_col/stack/blocks/mlp/wi/kernel"] == (2, 192)
    assert shardings["v_col/stack/blocks/mlp/wi/kernel"] == P(None, "tensor")
    # a square [2, 64, 64] ('layers', 'embed', 'heads'): optax reduces the last axis for v_row, the middle one for v_col
    assert shardings["v_row/stack/blocks/attn/q/kernel"] == P(None, "fsdp")
    assert shardings["v_col/stack/blocks/attn/q/kernel"] == P(None, "tensor")
    # ('vocab', 'embed') [384, 64]: v_row keeps embed, v_col keeps vocab
    assert (shapes["v_row/embed/embedding"], shardings["v_row/embed/embedding"]) == ((64,), P("fsdp"))
    assert (shapes["v_col/embed/embedding"], shardings["v_col/embed/embedding"]) == ((384,), P("tensor"))
    # ('embed', 'vocab') [64, 384]: v_row keeps embed, v_col keeps vocab
    assert (shapes["v_row/head"], shardings["v_row/head"]) == ((64,), P("fsdp"))
    assert (shapes["v_col/head"], shardings["v_col/head"]) == ((384,), P("tensor"))
    # unfactored vectors hold a full moment sharded like the parameter; placeholders are replicated
    assert (shapes["v/stack/blocks/attn_norm/scale"], shardings["v/stack/blocks/attn_norm/scale"]) == ((2, 64), P())
    assert (shapes["v/stack/blocks/mlp/wi/kernel"], shardings["v/stack/blocks/mlp/wi/kernel"]) == ((1,), P())


def test_adafactor_on_fsdp_and_tensor_gives_the_single_device_losses_and_state(model_cfg):
    one_spec, one_mesh = spec_for(model_cfg, (1, 1, 1), **ADAFACTOR)
    spec, mesh = spec_for(model_cfg, (1, 4, 2), **ADAFACTOR)
    losses, initial, final = train(spec, mesh, model_cfg)
    ref_losses, _, ref_final = train(one_spec, one_mesh, model_cfg)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), final.params, initial.params)
    assert min(jax.tree.leaves(moved)) > 0
    ref = by_path(ref_final)
    for path, value in by_path(final).items():
        np.testing.assert_allclose(value, ref[path], rtol=1e-4, atol=1e-6, err_msg=path)


# --- freezing -------------------------------------------------------------------------------

FREEZE = Freeze("embed|final_norm", layers=1)


@pytest.fixture(scope="module")
def frozen(model_cfg):
    """AdamW with weight decay, the embeddings and the lower of the two layers frozen, on data x fsdp x tensor."""
    spec, mesh = spec_for(model_cfg, (2, 2, 2), FREEZE, lr=0.01, weight_decay=0.1)
    return spec, *train(spec, mesh, model_cfg)


def test_frozen_parameters_and_layers_stay_bitwise_while_the_rest_trains(frozen):
    _, losses, initial, final = frozen
    before, after = by_path(initial.params), by_path(final.params)
    assert losses[-1] < losses[0]
    for path, value in after.items():
        if path.startswith(("['embed']", "['final_norm']")):
            np.testing.assert_array_equal(value, before[path], err_msg=path)
        elif path.startswith("['stack']"):
            np.testing.assert_array_equal(value[0], before[path][0], err_msg=path)  # layer 0: frozen
            assert np.abs(value[1] - before[path][1]).max() > 0, path  # layer 1 trains
        else:
            assert np.abs(value - before[path]).max() > 0, path


def test_frozen_parameters_hold_no_optimizer_state(frozen, model_cfg):
    spec, *_ = frozen
    frozen_bytes = sum(
        x.size * 4 for p, x in by_path(spec.abstract.params).items() if p.startswith(("['embed']", "['final_norm']"))
    )
    params_bytes = count_params(spec.abstract.params) * 4
    moments = [x for x in jax.tree.leaves(spec.abstract.opt_state) if x.ndim]
    assert sum(x.size * x.dtype.itemsize for x in moments) == 2 * (params_bytes - frozen_bytes)  # mu and nu
    unfrozen_spec, _ = spec_for(model_cfg, (2, 2, 2), lr=0.01, weight_decay=0.1)
    assert unfrozen_spec.trainable_params == count_params(spec.abstract.params)
    moments = [x for x in jax.tree.leaves(unfrozen_spec.abstract.opt_state) if x.ndim]
    assert sum(x.size * x.dtype.itemsize for x in moments) == 2 * params_bytes


def test_trainable_params_are_all_but_the_frozen_parameters_and_layer_rows(frozen):
    spec, *_ = frozen
    sizes = {param_path(p): x.size for p, x in jax.tree_util.tree_leaves_with_path(spec.abstract.params)}
    stacked = sum(size for path, size in sizes.items() if path.startswith("stack/"))
    frozen = sizes["embed/embedding"] + sizes["final_norm/scale"]
    assert spec.trainable_params == sum(sizes.values()) - frozen - stacked // 2


def test_freeze_matches_whole_paths_or_their_leading_parts(frozen):
    specs = frozen[0].logical_specs
    assert frozen_paths(specs, "embed") == {"embed/embedding"}
    assert frozen_paths(specs, "stack/blocks/attn") == {f"stack/blocks/attn/{w}/kernel" for w in "qkvo"}
    assert frozen_paths(specs, "stack/blocks/attn_") == set()  # a leading part ends at a '/'
    assert frozen_paths(specs, ".*norm") == {
        "final_norm/scale",
        "stack/blocks/attn_norm/scale",
        "stack/blocks/mlp_norm/scale",
    }


@pytest.mark.parametrize(
    ("freeze", "message"),
    [
        (Freeze("encoder"), "train.freeze='encoder' matches no parameter path; paths look like 'embed/embedding'"),
        (Freeze(layers=3), "train.freeze_layers=3 is more than the 2 layers of stack/blocks/"),
        (Freeze(".*"), "freeze every parameter"),
        (Freeze("embed|head|final_norm", layers=2), "freeze every parameter"),
    ],
)
def test_a_freeze_that_matches_nothing_or_everything_is_refused(model_cfg, freeze, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec_for(model_cfg, (1, 1, 1), freeze)


@pytest.mark.slow
def test_the_cli_reports_a_freeze_that_matches_nothing_as_one_error_line(tmp_path):
    run = in_this_process(["configs/tiny-gpt2.yaml", f"run.dir={tmp_path / 'run'}", "train.freeze=layers/.*"])
    assert run.rc == 2
    expected = (
        "error: train.freeze='layers/.*' matches no parameter path; paths look like 'embed/embedding', "
        "'final_norm/bias', 'final_norm/scale'"
    )
    assert run.err.strip().splitlines() == [expected]
    assert not (tmp_path / "run").exists()


def test_grad_norm_is_the_norm_clipping_uses_over_the_trainable_gradients(model_cfg):
    """Plain SGD at lr 1, clipped to 0.01, with FREEZE: the logged grad_norm is the global norm of the
    gradients of the trainable values only (not of the frozen embeddings, final norm and lower layer),
    and the step moved the parameters by exactly those gradients times clip_norm / grad_norm."""
    sgd = {"name": "sgd", "momentum": 0.0, "lr": 1.0, "clip_norm": 0.01, "weight_decay": 0.0}
    spec, mesh = spec_for(model_cfg, (2, 2, 2), FREEZE, **sgd)
    state = init_state(spec, model_cfg, seed=0)
    batch = batches()[0]
    flat = lambda params: {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    before = jax.device_get(state.params)
    every = flat(jax.grad(lambda p: summed_loss(spec.graphdef, p, batch)[0] / batch["targets"].size)(before))
    trainable = {
        path: np.concatenate([np.zeros_like(g[:1]), g[1:]]) if path.startswith("stack/") else g  # layer 0 frozen
        for path, g in every.items()
        if not path.startswith(("embed/", "final_norm/"))
    }
    state, metrics = make_train_step(spec, mesh, 1)(state, batch)
    norm = float(metrics["grad_norm"])
    np.testing.assert_allclose(norm, float(optax.tree.norm(trainable)), rtol=1e-5)
    assert float(optax.tree.norm(every)) > 1.05 * norm  # the frozen gradients are left out
    after = flat(jax.device_get(state.params))
    for path, value in flat(before).items():  # float32 rounding of the parameters: ~6e-8
        expected = -trainable[path] * 0.01 / norm if path in trainable else np.zeros_like(value)
        np.testing.assert_allclose(after[path] - value, expected, rtol=1e-3, atol=2e-7, err_msg=path)
