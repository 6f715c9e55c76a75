"""Distillation (``distill:``): the loss against a numpy reference for every objective, a frozen
teacher that gets no gradient or optimizer state, the same numbers on 8 devices as on one,
exact resume, clear errors; and ``checkpoint.init_layers=lower``, which copies a deeper source's
lower layer rows exactly.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_runs import REPO, in_this_process
from flax import nnx, traverse_util
from test_resume import GPT2

from models import build_model
from sharding.mesh import make_mesh
from train.checkpoints import exporting
from train.checkpoints.sources import load_source, shardings_for, warm_start
from train.checkpoints.store import restore_target
from train.compress.distill_loss import TeacherSpec, kl_per_position
from train.config.sections import ConfigError, MeshConfig, OptimizerConfig, load_config
from train.core.state import init_state, make_state_spec
from train.core.step import make_train_step

TINY = {"d_model": 32, "d_ff": 64, "n_heads": 4, "vocab_size": 128, "compute_dtype": "float32", "max_seq_len": 16}
OPTIMIZER = OptimizerConfig(lr=0.01, warmup_steps=0, schedule="constant")


# --- the loss against numpy ------------------------------------------------------------------


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(student, teacher, targets, weights, temperature, alpha, top_k) -> dict[str, float]:
    """float64 numpy: alpha * weighted mean cross-entropy + T^2 * weighted mean KL(teacher || student)."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64) / temperature
    if top_k:
        kth = np.sort(t, axis=-1)[..., -top_k][..., None]
        t = np.where(t >= kth, t, -np.inf)
    p, log_q = np.exp(log_softmax(t)), log_softmax(s / temperature)
    kl = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0), axis=-1)
    ce = -np.take_along_axis(log_softmax(s), targets[..., None], axis=-1)[..., 0]
    hard = float(np.sum(ce * weights) / np.sum(weights))
    soft = float(temperature**2 * np.sum(kl * weights) / np.sum(weights))
    return {"loss": alpha * hard + soft, "hard_loss": hard, "distill_loss": soft}


def model_config(preset: str, **changes):
    return dataclasses.replace(load_config(REPO / "configs" / f"{preset}.yaml").model, **{**TINY, **changes})


def batch_for(objective: str) -> dict[str, np.ndarray]:
    """8 rows of 16 tokens: next-token targets; masked-LM targets on ~30% of positions; class labels."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, (8, 17)).astype(np.int32)
    if objective == "causal_lm":
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    mask = np.ones((8, 16), np.int32)
    if objective == "masked_lm":
        chosen = (rng.random((8, 16)) < 0.3).astype(np.float32)
        inputs = np.where(chosen > 0, 127, tokens[:, :-1]).astype(np.int32)
        return {"inputs": inputs, "attention_mask": mask, "targets": tokens[:, :-1], "weights": chosen}
    labels = rng.integers(0, 3, 8).astype(np.int32)
    return {"inputs": tokens[:, :-1], "attention_mask": mask, "targets": labels, "weights": np.ones(8, np.float32)}


OBJECTIVES = {  # objective -> (preset, model changes)
    "causal_lm": ("tiny-gpt2", {}),
    "masked_lm": ("tiny-bert", {}),
    "classification": ("tiny-bert", {"head": "classification", "num_labels": 3}),
}


def student_and_teacher(objective: str):
    preset, changes = OBJECTIVES[objective]
    student = model_config(preset, n_layers=1, **changes)
    return student, dataclasses.replace(student, n_layers=2, d_model=48, d_ff=96)  # a bigger teacher


def make_teacher(cfg, mesh, temperature=2.0, alpha=0.5, top_k=0) -> tuple[TeacherSpec, nnx.State]:
    graphdef, params = nnx.split(build_model(cfg, seed=1))
    shardings = shardings_for(params, mesh)
    spec = TeacherSpec(graphdef, shardings, temperature, alpha, top_k)
    return spec, jax.device_put(params, shardings)


def logits_of(graphdef, params, batch) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, b: nnx.merge(graphdef, p).forward(b))(params, batch))


def one_device_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), jax.devices("cpu")[:1])


@pytest.mark.parametrize(
    "objective, temperature, alpha, top_k",
    [
        ("causal_lm", 2.0, 0.5, 8),
        ("masked_lm", 3.0, 0.25, 0),
        ("classification", 1.5, 0.0, 2),
    ],
)
def test_the_train_steps_loss_and_its_parts_equal_a_numpy_reference(objective, temperature, alpha, top_k):
    """The step's first metrics are the reference computed from the student's and teacher's logits
    (masked LM: only the masked positions count; top-k: the teacher's k best classes renormalised)."""
    student_cfg, teacher_cfg = student_and_teacher(objective)
    mesh = one_device_mesh()
    spec = make_state_spec(student_cfg, OPTIMIZER, 10, mesh)
    state = init_state(spec, student_cfg, seed=0)
    teacher, teacher_params = make_teacher(teacher_cfg, mesh, temperature, alpha, top_k)
    batch = batch_for(objective)
    expected = reference(
        logits_of(spec.graphdef, state.params, batch),
        logits_of(teacher.graphdef, teacher_params, batch),
        batch["targets"],
        batch.get("weights", np.ones(batch["targets"].shape)),
        temperature,
        alpha,
        top_k,
    )
    _, metrics = make_train_step(spec, mesh, 1, teacher=teacher)(state, batch, teacher_params)
    for key, value in expected.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, atol=2e-6, err_msg=key)
    assert expected["distill_loss"] > 0.01


def test_the_hand_written_gradient_equals_autodiff_of_the_kl():
    rng = np.random.default_rng(1)
    student, teacher = jnp.asarray(rng.normal(size=(2, 3, 11)) * 3), jnp.asarray(rng.normal(size=(2, 3, 11)) * 3)
    for top_k in (0, 4):

        def plain(s, top_k=top_k):
            t = teacher / 2.5
            if top_k:
                t = jnp.where(t >= jnp.sort(t, axis=-1)[..., -top_k][..., None], t, -jnp.inf)
            p = jax.nn.softmax(t)
            return 2.5**2 * jnp.sum(p * (jnp.log(jnp.where(p > 0, p, 1)) - jax.nn.log_softmax(s / 2.5)))

        ours = jax.jit(jax.grad(lambda s, k=top_k: jnp.sum(kl_per_position(s, teacher, 2.5, k))))(student)
        np.testing.assert_allclose(ours, jax.jit(jax.grad(plain))(student), rtol=1e-5, atol=1e-7)


# --- the frozen teacher in the jitted step ---------------------------------------------------


def train_decoder(mesh, initial, teacher_cfg, teacher_host, steps=3):
    """``steps`` distillation steps of the tiny decoder on ``mesh``: (losses, host state, teacher params after)."""
    student_cfg, _ = student_and_teacher("causal_lm")
    spec = make_state_spec(student_cfg, OPTIMIZER, 10, mesh)
    teacher, _ = make_teacher(teacher_cfg, mesh, top_k=8)
    teacher_params = jax.device_put(teacher_host, teacher.shardings)
    step = make_train_step(spec, mesh, 1, teacher=teacher)
    state, losses = jax.device_put(initial, spec.shardings), []
    batch = batch_for("causal_lm")
    for i in range(steps):
        state, metrics = step(state, {k: np.roll(v, i, axis=0) for k, v in batch.items()}, teacher_params)
        losses.append({k: float(v) for k, v in metrics.items()})
    return losses, jax.device_get(state), jax.device_get(teacher_params), spec


@pytest.fixture(scope="module")
def decoder_runs():
    """The tiny decoder distilled 3 steps on one device and on 8 (data 2 x fsdp 2 x tensor 2)."""
    student_cfg, teacher_cfg = student_and_teacher("causal_lm")
    one = one_device_mesh()
    initial = jax.device_get(init_state(make_state_spec(student_cfg, OPTIMIZER, 10, one), student_cfg, seed=0))
    teacher_host = jax.device_get(nnx.state(build_model(teacher_cfg, seed=1)))
    eight = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices("cpu"))
    return {
        "one": train_decoder(one, initial, teacher_cfg, teacher_host),
        "eight": train_decoder(eight, initial, teacher_cfg, teacher_host),
        "teacher_before": teacher_host,
        "initial": initial,
    }


def test_the_teacher_gets_no_gradient_no_optimizer_state_and_stays_unchanged(decoder_runs):
    _, state, teacher_after, spec = decoder_runs["one"]
    for before, after in zip(jax.tree.leaves(decoder_runs["teacher_before"]), jax.tree.leaves(teacher_after)):
        np.testing.assert_array_equal(before, after)
    # the train state is the student's alone: the same tree as without a teacher, moments shaped like its params
    assert jax.tree.structure(state) == jax.tree.structure(spec.abstract)
    student_sizes = sum(x.size for x in jax.tree.leaves(spec.abstract.params))
    assert sum(x.size for x in jax.tree.leaves(state.params)) == student_sizes
    assert all(
        np.any(a != b) for a, b in zip(jax.tree.leaves(decoder_runs["initial"].params), jax.tree.leaves(state.params))
    )
    # and no gradient reaches the teacher's parameters through the loss
    teacher, teacher_params = make_teacher(student_and_teacher("causal_lm")[1], one_device_mesh())
    batch = batch_for("causal_lm")

    @jax.jit
    def teacher_grads(params, tp):
        student_logits = nnx.merge(spec.graphdef, params).forward(batch)
        return jax.grad(lambda t: jnp.sum(kl_per_position(student_logits, teacher.logits(t, batch), 2.0)))(tp)

    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(teacher_grads(state.params, teacher_params)))


def test_distillation_on_8_devices_matches_one_device(decoder_runs):
    one, eight = decoder_runs["one"], decoder_runs["eight"]
    for a, b in zip(one[0], eight[0]):
        for key in ("loss", "hard_loss", "distill_loss", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=key)
    # atol: the attention key bias has a zero gradient up to rounding, which Adam turns into ~1e-5 steps
    for a, b in zip(jax.tree.leaves(one[1].params), jax.tree.leaves(eight[1].params)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=5e-5)


# --- runs: resume, errors, lower-layer init --------------------------------------------------

FAST = GPT2  # tiny GPT-2 on data 2 x fsdp 2 x tensor 2, constant lr: train.steps only says where to stop


SMALL_DATA = ["data.train_files=data/shakespeare/hamlet.txt", "data.val_files=data/shakespeare/macbeth.txt"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> pathlib.Path:
    """A 2-layer tiny GPT-2 run, 2 steps."""
    directory = tmp_path_factory.mktemp("distill") / "teacher"
    run = in_this_process([*FAST, f"run.dir={directory}", "train.steps=2"])
    assert run.rc == 0, run.err[-2000:]
    return directory


@pytest.fixture(scope="module")
def runs(teacher) -> dict:
    """A 1-layer student from the teacher's lower layer, distilled 4 steps; and 2 + 2 with a resume."""
    root = teacher.parent
    student = [
        f"distill.teacher={teacher}",
        "distill.top_k=16",
        "model.n_layers=1",
        f"checkpoint.init_from={teacher}",
        "checkpoint.init_layers=lower",
    ]
    argvs = {
        "ref": [*FAST, *student, f"run.dir={root / 'ref'}", "train.steps=4"],
        "stopped": [*FAST, *student, f"run.dir={root / 'resumed'}", "train.steps=2"],
        "resumed": [*FAST, *student, f"run.dir={root / 'resumed'}", "train.steps=4"],
    }
    return {name: in_this_process(argv) for name, argv in argvs.items()}


@pytest.fixture(scope="module")
def error_runs(teacher) -> dict:
    root = teacher.parent
    argvs = {
        "missing": [*FAST, *SMALL_DATA, f"distill.teacher={root / 'nowhere'}", f"run.dir={root / 'e1'}"],
        "tokenizer": [*FAST, *SMALL_DATA, f"distill.teacher={teacher}", f"run.dir={root / 'e2'}"]
        + ["data.tokenizer=data/tokenizers/shakespeare-bpe-2048"],
        "family": ["configs/tiny-bert.yaml", *SMALL_DATA, f"distill.teacher={teacher}", f"run.dir={root / 'e3'}"],
    }
    return {name: in_this_process(argv) for name, argv in argvs.items()}


def saved_params(run_dir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    with ocp.PyTreeCheckpointer() as checkpointer:
        directory = run_dir / "checkpoints" / str(step) / "state"
        tree = checkpointer.metadata(directory).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(directory, restore_args=args)
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(restored)}


@pytest.mark.slow
def test_a_distilled_run_logs_both_parts_and_resumes_bitwise(teacher, runs):
    ref, resumed = runs["ref"], runs["resumed"]
    for run in (ref, runs["stopped"], resumed):
        assert run.rc == 0, run.err[-2000:]
    assert "distill: teacher" in ref.out and "top_k 16" in ref.out
    first = ref.metrics[0]
    assert first["loss"] == pytest.approx(0.5 * first["hard_loss"] + first["distill_loss"], rel=1e-6)
    assert resumed.losses() == ref.losses()  # exact, every step
    ref_state, resumed_state = saved_params(ref.dir, 4), saved_params(resumed.dir, 4)
    assert ref_state.keys() == resumed_state.keys()
    for key, value in ref_state.items():
        np.testing.assert_array_equal(value, resumed_state[key], err_msg=key)
    # the checkpoint holds the 1-layer student alone (the teacher has 2 layers)
    stacked = [v.shape for k, v in ref_state.items() if "'params'" in k and "'blocks'" in k]
    assert stacked and all(shape[0] == 1 for shape in stacked)
    assert load_config(ref.dir / "config.yaml").distill.teacher == str(teacher)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, words",
    [
        ("missing", ["distill.teacher", "is not a directory"]),
        ("tokenizer", ["another tokenizer", "must share one", "data.tokenizer="]),
        ("family", ["has model.family=decoder but the student encoder"]),
    ],
)
def test_a_teacher_that_cannot_teach_is_one_error_line(error_runs, name, words):
    run = error_runs[name]
    assert run.rc == 2
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    assert all(word in lines[0] for word in words), lines[0]
    assert not (run.dir / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["run", "hf"])
def test_init_layers_lower_copies_exactly_the_sources_lower_rows(teacher, kind, tmp_path):
    teacher_dir = source = teacher
    if kind == "hf":
        source = tmp_path / "hf"
        exporting.export(teacher_dir, source, format="hf")
    config = load_config(REPO / FAST[0], [*FAST[1:], "model.n_layers=1", "model.vocab_size=384"])
    mesh = make_mesh(config.mesh)
    spec = make_state_spec(config.model, config.optimizer, 4, mesh)
    fresh = init_state(spec, config.model, config.seed).params
    target = restore_target(spec.abstract.params, spec.shardings.params)
    params = warm_start(str(source), fresh, target, config.model, "lower")
    teacher = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(load_source(teacher_dir).model)))
    ours = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    assert ours.keys() == teacher.keys()
    for path, value in ours.items():
        expected = np.asarray(teacher[path])[:1] if "blocks" in path else np.asarray(teacher[path])
        np.testing.assert_array_equal(np.asarray(value), expected, err_msg=str(path))
        assert value.sharding == traverse_util.flatten_dict(nnx.to_pure_dict(target))[path].sharding
    with pytest.raises(
        ConfigError, match=r"n_layers: 2 -> 1\); use its model settings, or set checkpoint.init_layers=lower"
    ):
        warm_start(str(source), fresh, target, config.model)
