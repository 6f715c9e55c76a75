"""Typed run configuration: YAML + dotted overrides -> a validated Config, or one ConfigError."""

from __future__ import annotations

import pathlib

import pytest
import yaml
from cli_runs import REPO

from models.config import ModelConfig
from train.config.sections import Config, ConfigError, load_config

TINY = REPO / "configs" / "tiny-gpt2.yaml"


def write_yaml(tmp_path: pathlib.Path, tree: dict) -> pathlib.Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# --- every shipped config -------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)

    # Every key written in the file arrives in the Config unchanged (nothing silently dropped).
    def check(node, values: dict, where: str) -> None:
        for key, value in values.items():
            got = getattr(node, key)
            if isinstance(value, dict):  # a nested section (train.early_stopping)
                check(got, value, f"{where}{key}.")
            else:
                assert got == value, f"{path.name}: {where}{key} is {got!r}, the file says {value!r}"

    check(config, yaml.safe_load(path.read_text()), "")


def test_no_path_loads_the_shipped_default():
    assert load_config() == load_config(REPO / "configs" / "default.yaml")


def test_tiny_presets_are_gpt2_and_llama_shaped():
    gpt2 = load_config(TINY).model
    llama = load_config(REPO / "configs" / "tiny-llama.yaml").model
    style = ("position", "norm", "mlp", "use_bias", "tie_embeddings")
    assert tuple(getattr(gpt2, k) for k in style) == ("learned", "layernorm", "gelu", True, True)
    assert tuple(getattr(llama, k) for k in style) == ("rope", "rmsnorm", "swiglu", False, False)
    assert (llama.n_heads, llama.kv_heads) == (4, 2)


# --- unknown keys ---------------------------------------------------------------------------


def test_misspelt_key_in_yaml_names_it_and_suggests_the_right_one(tmp_path):
    path = write_yaml(tmp_path, {"train": {"stpes": 10}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.stpes' \(did you mean 'steps'\?\)"):
        load_config(path)


def test_misspelt_override_suggests_the_right_key():
    with pytest.raises(ConfigError, match=r"'optimizer\.warmup_step'.*did you mean 'warmup_steps'"):
        load_config(TINY, ["optimizer.warmup_step=3"])


def test_misspelt_section_suggests_the_right_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser'.*did you mean 'optimizer'"):
        load_config(TINY, ["optimiser.lr=0.1"])


def test_unknown_key_with_no_close_match_makes_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.zzzzqqq=1"])
    assert "train.zzzzqqq" in str(e.value) and "did you mean" not in str(e.value)


def test_override_into_a_value_that_is_not_a_section_is_rejected():
    with pytest.raises(ConfigError, match="'seed'.*not a section"):
        load_config(TINY, ["seed.x=1"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TINY, ["train.steps"])


# --- types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=ten", r"train\.steps must be an integer, got 'ten'"),
        ("train.steps=2.5", r"train\.steps must be an integer, got 2\.5"),
        ("train.steps=true", r"train\.steps must be an integer, got True"),
        ("train.progress_bar=1", r"train\.progress_bar must be true or false, got 1"),
        ("data.shuffle=yes please", r"data\.shuffle must be true or false, got 'yes please'"),
        ("optimizer.lr=fast", r"optimizer\.lr must be a number, got 'fast'"),
        ("optimizer.lr=false", r"optimizer\.lr must be a number, got False"),
        ("data.tokenizer=12", r"data\.tokenizer must be a string, got 12; quote it in YAML"),
        ("mesh.rules=embed", r"mesh\.rules must be a list, got 'embed'"),
        ("mesh.rules=[[embed]]", r"mesh\.rules\[0\] must be a list of 2 items, got \['embed'\]"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_wrong_type_in_yaml_file_is_rejected(tmp_path):
    path = write_yaml(tmp_path, {"train": {"batch_size": "16"}})
    with pytest.raises(ConfigError, match=r"train\.batch_size must be an integer, got '16'"):
        load_config(path)


def test_section_that_is_not_a_mapping_is_rejected(tmp_path):
    path = write_yaml(tmp_path, {"train": 5})
    with pytest.raises(ConfigError, match="train. must be a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.schedule=cosin", r"optimizer\.schedule='cosin' is not one of .*'cosine'.*did you mean 'cosine'"),
        ("model.compute_dtype=fp16", r"model\.compute_dtype='fp16' is not one of 'bfloat16', 'float32'"),
        ("model.norm=batchnorm", r"model\.norm='batchnorm' is not one of 'layernorm', 'rmsnorm'"),
    ],
)
def test_literal_value_outside_the_allowed_set_lists_the_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


# --- overrides ------------------------------------------------------------------------------


def test_overrides_parse_ints_floats_bools_and_strings():
    config = load_config(
        TINY,
        [
            "train.steps=7",
            "mesh.fsdp=-1",
            "optimizer.lr=3.0e-4",
            "optimizer.weight_decay=0",  # an int is accepted where a float is expected
            "train.progress_bar=true",
            "data.shuffle=False",
            "data.text_field=my text",
            "run.dir=/tmp/a=b",  # only the first '=' separates key from value
            "data.val_files=",  # empty value: the empty string
            "train.sample_prompt='7'",  # quoted: a string, not an int
        ],
    )
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.mesh.fsdp == -1
    assert config.optimizer.lr == pytest.approx(3e-4) and isinstance(config.optimizer.lr, float)
    assert config.optimizer.weight_decay == 0.0 and isinstance(config.optimizer.weight_decay, float)
    assert config.train.progress_bar is True
    assert config.data.shuffle is False
    assert config.run.dir == "/tmp/a=b"
    assert config.data.val_files == ""
    assert config.train.sample_prompt == "7"
    assert config.data.text_field == "my text"


@pytest.mark.parametrize("text", ["3e-4", "1e-3", "5E-5", "2e3"])
def test_exponent_floats_without_a_dot_parse_in_overrides_and_files(text, tmp_path):
    # PyYAML follows YAML 1.1, which reads '3e-4' (no dot, as people write it) as a string.
    assert load_config(TINY, [f"optimizer.lr={text}"]).optimizer.lr == float(text)
    path = tmp_path / "lr.yaml"
    path.write_text(TINY.read_text().replace("lr: 0.003", f"lr: {text}"))
    assert load_config(path).optimizer.lr == float(text)


def test_later_override_wins_and_untouched_keys_keep_file_values():
    base = load_config(TINY)
    config = load_config(TINY, ["train.steps=5", "train.steps=9"])
    assert config.train.steps == 9
    assert config.train.batch_size == base.train.batch_size == 16
    assert config.model == base.model


def test_override_can_add_a_key_the_file_leaves_at_its_default():
    assert load_config(TINY).mesh.dcn_data == 1
    assert load_config(TINY, ["mesh.dcn_data=2"]).mesh.dcn_data == 2


# --- cross-field validation -----------------------------------------------------------------


def test_seq_len_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ConfigError, match=r"train\.seq_len=128 is longer than model\.max_seq_len=64"):
        load_config(TINY, ["train.seq_len=128"])
    assert load_config(TINY, ["train.seq_len=64"]).train.seq_len == 64  # equal is fine


def test_batch_not_divisible_by_grad_accum_is_rejected():
    with pytest.raises(ConfigError, match=r"train\.batch_size=16 is not divisible by train\.grad_accum=3"):
        load_config(TINY, ["train.grad_accum=3"])
    assert load_config(TINY, ["train.grad_accum=4"]).train.grad_accum == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=0", r"train\.steps must be positive, got 0"),
        ("mesh.data=0", r"mesh\.data must be a positive size or -1"),
        ("mesh.tensor=-2", r"mesh\.tensor must be a positive size or -1"),
        ("mesh.data=-1", r"only one of mesh\.data, mesh\.fsdp, mesh\.tensor may be -1"),
        ("model.n_heads=3", r"model\.d_model=64 is not divisible by model\.n_heads=3"),
        ("data.val_fraction=1.0", r"data\.val_fraction must be in \[0, 1\)"),
        (
            "mesh.rules=[[embd, tensor]]",
            r"mesh\.rules\[0\] names the unknown logical axis 'embd' \(did you mean 'embed'\?\)",
        ),
        ("mesh.rules=[[embed, tensr]]", r"mesh\.rules\[0\] maps 'embed' to 'tensr', which is not a mesh axis"),
        ("mesh.rules=[[batch, data]]", r"mesh\.rules\[0\] cannot change 'batch'"),
    ],
)
def test_impossible_values_are_rejected_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.slow
def test_a_config_file_that_is_not_utf8_exits_2_with_one_error_line(tmp_path, capsys):
    from train.__main__ import main

    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    assert main([str(binary)]) == 2
    assert capsys.readouterr().err == f"error: config file '{binary}' is not UTF-8 text; pass a YAML file\n"


def test_config_error_is_one_line():
    for override in ("train.stpes=1", "train.steps=x", "optimizer.schedule=cosin", "train.seq_len=999"):
        with pytest.raises(ConfigError) as e:
            load_config(TINY, [override])
        assert "\n" not in str(e.value)


def test_a_saved_model_config_reads_back_and_unknown_fields_are_refused():
    saved = load_config(TINY).to_dict()["model"]
    assert ModelConfig.from_dict(saved) == load_config(TINY).model
    with pytest.raises(ConfigError, match=r"run/config\.yaml has model fields this version does not know \(colour\)"):
        ModelConfig.from_dict({**saved, "colour": "blue"}, "run/config.yaml")
    with pytest.raises(ConfigError, match=r"model\.json: model\.d_model=64 is not divisible by model\.n_heads=3"):
        ModelConfig.from_dict({**saved, "n_heads": 3}, "model.json")
