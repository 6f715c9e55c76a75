"""Logical axis names -> mesh axes: the arrays init_state creates are laid out as RULES say.

Runs on 8 fake CPU devices (tests/conftest.py). One init per (model, mesh), shared by the tests.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
from cli_runs import REPO
from jax.sharding import NamedSharding, PartitionSpec

from sharding.fit import check_fits
from sharding.mesh import make_mesh, resolve_shape
from sharding.rules import MESH_AXES, RULES
from train.config.sections import ConfigError, MeshConfig, load_config
from train.config.validate import fit_sizes
from train.core.state import init_state, make_state_spec
from train.data.tokenizer import ByteTokenizer
from train.run.loop import resolve_model

PRESETS = {"gpt2": REPO / "configs" / "tiny-gpt2.yaml", "llama": REPO / "configs" / "tiny-llama.yaml"}
MESHES = {  # name -> (data, fsdp, tensor) over the 8 devices
    "data8": (8, 1, 1),
    "fsdp8": (1, 8, 1),
    "data2-fsdp2-tensor2": (2, 2, 2),
    "fsdp4-tensor2": (1, 4, 2),
}


def cpu_devices() -> list:
    devices = jax.devices("cpu")
    assert len(devices) == 8, "tests/conftest.py must set XLA_FLAGS before jax is imported"
    return devices


def preset(name: str, *overrides: str):
    config = load_config(PRESETS[name], list(overrides))
    return config, resolve_model(config.model, ByteTokenizer.vocab_size)


def mesh_of(sizes: tuple[int, int, int]):
    data, fsdp, tensor = sizes
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), cpu_devices())


def rule_for(logical_name: str | None) -> tuple[str, ...]:
    """The mesh axes RULES give a logical name (the first matching rule wins, as in Flax)."""
    if logical_name is None:
        return ()
    for name, axes in RULES:
        if name == logical_name:
            return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    raise AssertionError(f"logical axis '{logical_name}' has no rule in sharding/rules.py")


def normalise(spec: PartitionSpec, ndim: int) -> tuple[tuple[str, ...], ...]:
    """PartitionSpec -> one tuple of mesh axes per dimension (unsharded: ())."""
    entries = list(spec) + [None] * (ndim - len(spec))
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries)


def leaves(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def moments(opt_state, name: str):
    found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
    assert len(found) == 1, f"expected one AdamW '{name}' in the optimizer state, found {len(found)}"
    return found[0][1]


@pytest.fixture(scope="module")
def built():
    """(model, mesh name) -> (model config, mesh, StateSpec, TrainState), each initialised once."""
    cache = {}

    def get(model: str, mesh_name: str):
        if (model, mesh_name) not in cache:
            config, model_cfg = preset(model)
            mesh = mesh_of(MESHES[mesh_name])
            spec = make_state_spec(model_cfg, config.optimizer, config.train.steps, mesh)
            cache[model, mesh_name] = (model_cfg, mesh, spec, init_state(spec, model_cfg, config.seed))
        return cache[model, mesh_name]

    return get


CASES = [(model, mesh) for model in PRESETS for mesh in MESHES]


@pytest.mark.parametrize("model, mesh_name", CASES)
def test_every_parameter_is_sharded_as_the_rules_say(built, model, mesh_name):
    _, mesh, spec, state = built(model, mesh_name)
    logical = leaves(spec.logical_specs)
    params = leaves(state.params)
    assert logical.keys() == params.keys()
    for path, array in params.items():
        names = tuple(logical[path])
        assert len(names) == array.ndim, f"{path}: logical names {names} for shape {array.shape}"
        expected = tuple(rule_for(n) for n in names)
        assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh == mesh, path
        assert normalise(array.sharding.spec, array.ndim) == expected, f"{path}: logical {names}"
        # The layout is real: every device holds the slice those axes imply.
        shard_shape = tuple(n // math.prod(mesh.shape[a] for a in axes) for n, axes in zip(array.shape, expected))
        assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, path
        assert len(array.addressable_shards) == 8


@pytest.mark.parametrize("model, mesh_name", CASES)
def test_adam_moments_are_sharded_like_their_parameters(built, model, mesh_name):
    _, _, _, state = built(model, mesh_name)
    params = leaves(state.params)
    for name in ("mu", "nu"):
        moment = leaves(moments(state.opt_state, name))
        assert moment.keys() == params.keys()
        for path, m in moment.items():
            p = params[path]
            assert (m.shape, m.dtype) == (p.shape, p.dtype), path
            assert normalise(m.sharding.spec, m.ndim) == normalise(p.sharding.spec, p.ndim), f"{name} {path}"
            assert {s.data.shape for s in m.addressable_shards} == {s.data.shape for s in p.addressable_shards}
    # Everything else (step counts, the rng, the train step) is replicated.
    is_moment = {id(x) for name in ("mu", "nu") for x in jax.tree.leaves(moments(state.opt_state, name))}
    others = [x for x in jax.tree.leaves(state.opt_state) if id(x) not in is_moment] + [state.step]
    assert others
    for x in others:
        assert normalise(x.sharding.spec, x.ndim) == ((),) * x.ndim


# Concrete shard shapes, written out, so a change to RULES or to the models' names shows here.
# vocab 257 -> 384 (multiple of 128); d_model 64; gpt2 d_ff 256; llama d_ff 192, 2 kv heads x 16.
B = "['stack']['blocks']"  # the stacked blocks: a leading 'layers' axis on every parameter
SPOT_CHECKS = [
    ("gpt2", "fsdp8", "['embed']['embedding'].value", ("vocab", "embed"), (384, 8)),
    ("gpt2", "fsdp8", "['pos_embed'].value", (None, "embed"), (64, 8)),
    ("gpt2", "fsdp4-tensor2", f"{B}['mlp']['wi']['kernel'].value", ("layers", "embed", "mlp"), (2, 16, 128)),
    ("gpt2", "fsdp4-tensor2", f"{B}['mlp']['wi']['bias'].value", ("layers", "mlp"), (2, 128)),
    ("gpt2", "data8", f"{B}['attn']['q']['kernel'].value", ("layers", "embed", "heads"), (2, 64, 64)),
    ("gpt2", "data2-fsdp2-tensor2", "['final_norm']['scale'].value", ("norm",), (64,)),
    ("llama", "fsdp4-tensor2", "['head'].value", ("embed", "vocab"), (16, 192)),
    ("llama", "fsdp4-tensor2", f"{B}['attn']['k']['kernel'].value", ("layers", "embed", "kv_heads"), (2, 16, 16)),
    ("llama", "data2-fsdp2-tensor2", f"{B}['attn']['o']['kernel'].value", ("layers", "heads", "embed"), (2, 32, 32)),
    ("llama", "data2-fsdp2-tensor2", f"{B}['mlp']['wg']['kernel'].value", ("layers", "embed", "mlp"), (2, 32, 96)),
]


@pytest.mark.parametrize(
    "model, mesh_name, path, names, shard_shape", SPOT_CHECKS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in SPOT_CHECKS]
)
def test_known_parameters_carry_their_logical_names_and_shard_shapes(built, model, mesh_name, path, names, shard_shape):
    _, _, spec, state = built(model, mesh_name)
    assert tuple(leaves(spec.logical_specs)[path]) == names
    assert {s.data.shape for s in leaves(state.params)[path].addressable_shards} == {shard_shape}


@pytest.mark.parametrize("model", PRESETS)
def test_initial_parameters_do_not_depend_on_the_mesh(built, model):
    reference = jax.device_get(built(model, "data8")[3])
    for mesh_name in MESHES:
        state = jax.device_get(built(model, mesh_name)[3])
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(reference), jax.tree.leaves(state)):
            np.testing.assert_array_equal(a, b, err_msg=f"{mesh_name} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("model", PRESETS)
def test_parameters_and_optimizer_state_are_float32(built, model):
    _, _, _, state = built(model, "fsdp8")
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    for name in ("mu", "nu"):
        assert {x.dtype for x in jax.tree.leaves(moments(state.opt_state, name))} == {np.dtype("float32")}


# --- mesh shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, devices, expected",
    [
        ((1, -1, 1), 8, (1, 8, 1)),
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((-1, 2, 2), 8, (2, 2, 2)),
        ((1, 4, -1), 8, (1, 4, 2)),
        ((2, 4, 1), 8, (2, 4, 1)),
        ((1, -1, 1), 1, (1, 1, 1)),
        ((1, -1, 2), 4, (1, 2, 2)),
    ],
)
def test_minus_one_takes_the_devices_left_over(sizes, devices, expected):
    data, fsdp, tensor = sizes
    cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
    assert resolve_shape(cfg, devices) == expected
    mesh = make_mesh(cfg, cpu_devices()[:devices])
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape[a] for a in MESH_AXES) == expected
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in cpu_devices()[:devices])


def test_default_mesh_uses_all_devices_for_fsdp():
    mesh = make_mesh(MeshConfig())
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(jax.devices()), "tensor": 1}


def test_dcn_sizes_divide_the_devices_into_slices():
    assert resolve_shape(MeshConfig(data=1, fsdp=-1, tensor=1, dcn_data=2), 8) == (1, 4, 1)
    assert resolve_shape(MeshConfig(data=-1, fsdp=2, tensor=1, dcn_fsdp=2), 8) == (2, 2, 1)


@pytest.mark.parametrize(
    "sizes, dcn, message",
    [
        ((3, 1, 1), (1, 1), r"mesh sizes data=3, fsdp=1, tensor=1 use 3 devices but 8 are available"),
        ((2, 2, 4), (1, 1), r"use 16 devices but 8 are available"),
        ((3, -1, 1), (1, 1), r"cannot fill 8 devices per slice \(8 is not divisible by 3\)"),
        ((1, -1, 1), (3, 1), r"mesh\.dcn_data \* mesh\.dcn_fsdp = 3 does not divide the 8 devices"),
        ((1, 8, 1), (2, 1), r"use 8 devices but 4 are available per slice"),
    ],
)
def test_mesh_sizes_that_do_not_match_the_devices_are_a_config_error(sizes, dcn, message):
    data, fsdp, tensor = sizes
    cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor, dcn_data=dcn[0], dcn_fsdp=dcn[1])
    with pytest.raises(ConfigError, match=message):
        make_mesh(cfg, cpu_devices())


# --- model and batch sizes against the mesh ---------------------------------------------------


@pytest.mark.parametrize(
    "model, sizes, overrides, message",
    [
        ("gpt2", (1, 8, 1), ["train.batch_size=12"], r"batch_size=12 is not divisible by the data-parallel size 8"),
        ("gpt2", (2, 2, 2), ["train.grad_accum=8"], r"size 4 .* x train\.grad_accum=8; use a multiple of 32"),
        ("llama", (2, 1, 4), [], r"model\.n_kv_heads=2 does not divide over mesh\.tensor=4"),
        ("gpt2", (1, 1, 8), ["model.n_heads=2"], r"model\.n_heads=2 does not divide over mesh\.tensor=8"),
        ("gpt2", (1, 8, 1), ["model.d_model=36"], r"model\.d_model=36 does not divide over mesh\.fsdp=8"),
    ],
)
def test_sizes_that_do_not_divide_over_the_mesh_are_a_config_error(model, sizes, overrides, message):
    config, model_cfg = preset(model, *overrides)
    with pytest.raises(ConfigError, match=message):
        check_fits_mesh(config, model_cfg, sizes)


def check_fits_mesh(config, model_cfg, sizes: tuple[int, int, int]) -> None:
    check_fits(model_cfg, mesh_of(sizes).shape, config.mesh.logical_rules, **fit_sizes(config, 1))


def test_sizes_that_divide_pass_the_mesh_check():
    for model in PRESETS:
        config, model_cfg = preset(model)
        for sizes in MESHES.values():
            check_fits_mesh(config, model_cfg, sizes)


def test_every_problem_is_listed_with_its_config_key_and_rule():
    config, model_cfg = preset("llama", "train.batch_size=12")
    with pytest.raises(ConfigError) as error:
        check_fits_mesh(config, model_cfg, (1, 1, 8))
    assert str(error.value) == (
        "model.n_heads=4 does not divide over mesh.tensor=8 (logical axis 'act_heads' -> 'tensor'); "
        "model.n_kv_heads=2 does not divide over mesh.tensor=8 (logical axis 'act_kv_heads' -> 'tensor'); "
        "change those sizes, the mesh sizes or mesh.rules"
    )


def test_the_check_follows_the_runs_rules():
    config, model_cfg = preset("gpt2", "model.d_model=36", "model.n_heads=2", "mesh.rules=[[embed, tensor]]")
    check_fits_mesh(config, model_cfg, (1, 8, 1))  # embed is no longer split over fsdp
    message = r"model\.d_model=36 does not divide over mesh\.tensor=8 \(logical axis 'embed' -> 'tensor'\)"
    with pytest.raises(ConfigError, match=message):
        check_fits_mesh(config, model_cfg, (1, 1, 8))
    config, model_cfg = preset("gpt2", "mesh.rules=[[mlp, [fsdp, tensor]]]", "model.d_ff=132")
    message = (
        r"model\.d_ff=132 does not divide over mesh\.fsdp\*mesh\.tensor=8 \(logical axis 'mlp' -> '\(fsdp, tensor\)'\)"
    )
    with pytest.raises(ConfigError, match=message):
        check_fits_mesh(config, model_cfg, (1, 4, 2))


def test_batch_sizes_that_no_mesh_can_split_fail_at_load():
    with pytest.raises(
        ConfigError, match=r"train\.batch_size=12 is not divisible by train\.grad_accum=8; use a multiple of 8"
    ):
        load_config(PRESETS["gpt2"], ["train.grad_accum=8", "train.batch_size=12"])
    with pytest.raises(ConfigError, match=r"train\.batch_size=12 does not split evenly over 5 processes"):
        load_config(PRESETS["gpt2"], ["run.num_processes=5", "run.coordinator=localhost:1", "train.batch_size=12"])
