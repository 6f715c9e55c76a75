"""Adversarial training (train.adversarial: fgm | pgd) in the real jitted step, on tiny models of
every family, random token batches and the 8 fake CPU devices of tests/conftest.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from cli_runs import REPO, in_this_process
from flax import nnx

from models import build_model
from sharding.mesh import make_mesh
from train.config.sections import AdversarialConfig, ConfigError, MeshConfig, build_config, load_config
from train.core.adversarial import perturbation
from train.core.state import init_state, make_state_spec
from train.core.step import make_train_step
from train.data.tokenizer import ByteTokenizer
from train.run.loop import resolve_model

FGM = AdversarialConfig(method="fgm", epsilon=0.5)
PGD = AdversarialConfig(method="pgd", epsilon=0.5, steps=3, alpha=0.3)
ONE = (1, 1, 1)  # (data, fsdp, tensor)
B, T, LABELS = 8, 16, 3


def mesh_of(sizes):
    data, fsdp, tensor = sizes
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices("cpu")[: data * fsdp * tensor])


def tiny(preset: str, **model):
    """The preset's config and model (fields replaced by ``model``), unchecked (no data is read)."""
    config = build_config(yaml.safe_load((REPO / "configs" / preset).read_text()))
    return config, resolve_model(dataclasses.replace(config.model, **model), ByteTokenizer.vocab_size)


def batch_for(family: str) -> dict:
    rng = np.random.default_rng(0)
    tokens = lambda *shape: rng.integers(1, 300, shape, dtype=np.int32)
    if family == "encoder":  # classification, the last 4 tokens of every other row padding
        mask = np.ones((B, T), np.int32)
        mask[::2, -4:] = 0
        return {"inputs": tokens(B, T) * mask, "attention_mask": mask, "targets": tokens(B) % LABELS}
    if family == "encoder_decoder":
        return {"encoder_inputs": tokens(B, T), "decoder_inputs": tokens(B, T // 2), "targets": tokens(B, T // 2)}
    return {"inputs": tokens(B, T), "targets": tokens(B, T)}


ENCODER = ("tiny-bert.yaml", {"head": "classification", "num_labels": LABELS})
FAMILIES = {"encoder": ENCODER, "decoder": ("tiny-llama.yaml", {}), "encoder_decoder": ("tiny-t5.yaml", {})}


def run_steps(family, adversarial, sizes=ONE, grad_accum=1, steps=2):
    """(per-step metrics, host state) of ``steps`` steps from the seed-0 init on one batch."""
    preset, model = FAMILIES[family]
    config, model_cfg = tiny(preset, **model)
    mesh = mesh_of(sizes)
    spec = make_state_spec(model_cfg, config.optimizer, 10, mesh)
    state = init_state(spec, model_cfg, 0)
    step = make_train_step(spec, mesh, grad_accum, adversarial=adversarial)
    out = []
    for _ in range(steps):
        state, metrics = step(state, batch_for(family))
        out.append(jax.device_get(metrics))
    return out, jax.device_get(state)


@pytest.fixture(scope="module")
def encoder():
    """The seed-0 tiny BERT classifier's (graphdef, params) and its batch."""
    _, model_cfg = tiny(*ENCODER[:1], **ENCODER[1])
    spec = make_state_spec(model_cfg, tiny(ENCODER[0])[0].optimizer, 10, mesh_of(ONE))
    params = init_state(spec, model_cfg, 0).params
    return spec.graphdef, params, batch_for("encoder")


def mean_loss(graphdef, params, batch, delta):
    logits = nnx.merge(graphdef, params).forward(batch, embed_delta=delta)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


# the loss and its gradients with respect to the parameters and the perturbation: one program for both tests
loss_and_grads = jax.jit(jax.value_and_grad(mean_loss, argnums=(1, 3)), static_argnums=0)


def fgm_delta(g_delta: jax.Array) -> jax.Array:
    """FGM's perturbation by hand: ``epsilon`` times the gradient normalised per row."""
    return FGM.epsilon * g_delta / jnp.sqrt(jnp.sum(g_delta**2, axis=(1, 2), keepdims=True))


def test_fgm_step_is_clean_loss_plus_the_loss_at_the_hand_computed_perturbation(encoder):
    graphdef, params, batch = encoder
    zero = jnp.zeros((B, T, 64), jnp.float32)
    clean, (g_params, g_delta) = loss_and_grads(graphdef, params, batch, zero)
    adversarial, (g_adv, _) = loss_and_grads(graphdef, params, batch, fgm_delta(g_delta))
    [metrics], _ = run_steps("encoder", FGM, steps=1)
    assert adversarial > clean + 1e-3  # the perturbation raises the loss
    np.testing.assert_allclose(metrics["clean_loss"], clean, rtol=1e-5)
    np.testing.assert_allclose(metrics["adversarial_loss"], adversarial, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], clean + adversarial, rtol=1e-5)
    expected_norm = optax.tree.norm(jax.tree.map(jnp.add, g_params, g_adv))  # tiny-bert clips at 1.0, after the norm
    np.testing.assert_allclose(metrics["grad_norm"], expected_norm, rtol=1e-4)


def test_pgd_stays_inside_the_epsilon_ball_and_raises_the_loss_more_than_one_step(encoder):
    graphdef, params, batch = encoder

    def loss_fn(p, b, delta):
        return mean_loss(graphdef, p, b, delta), {}

    zero = jnp.zeros((B, T, 64), jnp.float32)
    _, (_, grad) = loss_and_grads(graphdef, params, batch, zero)
    far = AdversarialConfig(method="pgd", epsilon=0.5, steps=4, alpha=0.4)  # 4 x 0.4 would leave the ball
    delta = jax.jit(perturbation, static_argnums=(0, 4))(loss_fn, params, batch, grad, far)
    norms = np.sqrt(np.sum(np.asarray(delta) ** 2, axis=(1, 2)))
    assert np.all(norms <= far.epsilon * (1 + 1e-5)) and np.isclose(norms.max(), far.epsilon, rtol=1e-5)
    losses = [float(loss_and_grads(graphdef, params, batch, d)[0]) for d in (zero, fgm_delta(grad), delta)]
    assert losses[0] < losses[1] < losses[2]


def test_t5_takes_the_perturbation_on_its_encoder_inputs_and_zero_leaves_it_bitwise():
    family = "encoder_decoder"
    preset, model = FAMILIES[family]
    _, model_cfg = tiny(preset, **model)
    model = build_model(model_cfg, 0)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, b, d: nnx.merge(graphdef, p).forward(b, embed_delta=d))
    batch = batch_for(family)
    shape = (*batch[model.embedded_input].shape, model_cfg.d_model)
    plain = forward(params, batch, None)
    np.testing.assert_array_equal(forward(params, batch, jnp.zeros(shape)), plain)
    moved = forward(params, batch, jnp.full(shape, 0.1))
    assert np.abs(np.asarray(moved - plain)).max() > 1e-3


def test_off_is_the_plain_step_bitwise():
    plain, plain_state = run_steps("decoder", None)
    off, off_state = run_steps("decoder", AdversarialConfig(method="", epsilon=3.0))
    assert plain == off
    jax.tree.map(np.testing.assert_array_equal, plain_state, off_state)


def test_pgd_on_a_data_fsdp_tensor_mesh_with_grad_accum_gives_the_single_device_losses():
    """Two PGD steps of the tiny Llama on one batch of 8 rows, sharded 2 x 2 x 2 and in 2 micro-batches (one
    program for both splits) == on one device."""
    single, _ = run_steps("decoder", PGD)
    assert single[0]["adversarial_loss"] > single[0]["clean_loss"]
    split, _ = run_steps("decoder", PGD, sizes=(2, 2, 2), grad_accum=2)
    for one, two in zip(single, split):
        for key in ("loss", "clean_loss", "adversarial_loss", "grad_norm"):
            np.testing.assert_allclose(two[key], one[key], rtol=2e-5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.adversarial.method=fgsm", "train.adversarial.method='fgsm' is not one of"),
        ("train.adversarial.epsilon=0", "train.adversarial.epsilon must be > 0"),
        ("train.adversarial.steps=0", "train.adversarial.steps must be >= 1"),
        ("train.adversarial.alpha=-1", "train.adversarial.alpha must be > 0"),
    ],
)
def test_bad_adversarial_values_are_one_line_errors(override, message):
    method = [] if "method" in override else ["train.adversarial.method=pgd"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(REPO / "configs" / "tiny-gpt2.yaml", [*method, override])


RESUME = [
    "configs/tiny-gpt2.yaml",
    "train.adversarial.method=pgd",
    "train.adversarial.steps=2",
    "train.seq_len=32",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=0",  # a warm-up is cut to train.steps: the 2-step run's would differ
    "checkpoint.every=2",
]


@pytest.mark.slow
def test_a_pgd_run_stopped_at_step_2_and_continued_is_bitwise_the_uninterrupted_run(tmp_path):
    whole = in_this_process([*RESUME, f"run.dir={tmp_path / 'whole'}", "train.steps=4"])
    first = in_this_process([*RESUME, f"run.dir={tmp_path / 'parts'}", "train.steps=2"])
    resumed = in_this_process([*RESUME, f"run.dir={tmp_path / 'parts'}", "train.steps=4"])
    assert whole.rc == first.rc == resumed.rc == 0, whole.err + resumed.err
    rows = {r["step"]: r for r in whole.metrics if "loss" in r}
    again = {r["step"]: r for r in resumed.metrics if "loss" in r}
    assert set(again) >= {3, 4}
    for step in (3, 4):
        for key in ("loss", "clean_loss", "adversarial_loss"):
            assert again[step][key] == rows[step][key]
