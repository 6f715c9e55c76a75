"""``checkpoint.init_from``: which parameters of another model start a new run, whatever its head.

``train.checkpoints.sources.warm_start`` reads the source and lays them over a fresh model by these rules.

The source is a run directory (its newest intact checkpoint; also its ``checkpoints/`` or the
output of ``python -m train.export HF_DIR OUT --format checkpoint``), a Hugging Face model directory (config.json +
safetensors), an export (``python -m train.export``, ``train.prune`` or ``train.quantize``: model.json + params/; an
int8 one is dequantised into a float model, and kept int8 by a QLoRA run, ``model.quant: int8``), or
``python-package:NAME`` naming one (train/config/packages.py). Every parameter the
source holds at the same path with the same shape is restored; the rest keep their fresh
initialisation, and one line says which. So a masked-LM encoder, or a bare ``BertModel``,
starts a classifier: the encoder is restored, the pooler (unless the source has one) and the
classifier start fresh.

The source must be the same architecture: every model field except the head's (``head``, ``pooling``,
``num_labels``), the PEFT methods' (a LoRA or adapter, prefix, prompt run starts from its base, their
parameters fresh) and those
that do not change parameters (train/checkpoints/store.py) must match. With ``checkpoint.init_layers:
lower`` the source may have more layers (``n_layers``, ``n_decoder_layers``): every stacked layer
parameter takes the source's rows [0, n_layers) (``lower_layers``), e.g. a 3-layer student from
the lower half of a 6-layer teacher.
"""

from __future__ import annotations

import pathlib

import jax
from flax import nnx, traverse_util

from models import abstract_model, hf
from models import peft as methods
from models.config import ModelConfig
from models.hf import peft
from train.config.sections import ConfigError

HEAD_FIELDS = frozenset({"head", "num_labels", "pooling"})
ADAPTER_FIELDS = frozenset({"lora_rank", "lora_alpha", "lora_targets", "lora_dropout", *methods.FIELDS})
LAYER_FIELDS = frozenset({"n_layers", "n_decoder_layers"})
KEY = "checkpoint.init_from"

Flat = dict[tuple[str, ...], jax.Array]  # parameter path ('stack', 'blocks', 'attn', 'q', 'kernel') -> array


def architecture(model: dict, lower: bool = False) -> dict:
    """The model fields that must match for parameters to carry over (all but the head's and the
    adapters', and with ``lower`` the layer counts)."""
    skip = HEAD_FIELDS | ADAPTER_FIELDS | (LAYER_FIELDS if lower else frozenset())
    return {k: v for k, v in model.items() if k not in skip}


def flat(params) -> Flat:
    """An nnx.State or nested dicts of arrays -> {path tuple: array}."""
    return traverse_util.flatten_dict(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)


def check_layers(saved_model: dict, model: ModelConfig, lower: bool, source) -> None:
    """ConfigError when the source's layer counts differ from ``model``'s (without ``lower``) or are
    fewer (with it)."""
    for name in sorted(LAYER_FIELDS):
        theirs, ours = saved_model.get(name, getattr(model, name)), getattr(model, name)
        if theirs == ours:
            continue
        if not lower:
            raise ConfigError(
                f"{KEY}: {source} holds a different model ({name}: {theirs!r} -> {ours!r}); use its model settings, "
                "or set checkpoint.init_layers=lower to start from its lower layers"
            )
        if theirs < ours or (theirs == 0) != (ours == 0):
            raise ConfigError(
                f"{KEY}: {source} has {name}={theirs}, fewer layers than this model's {ours}; "
                f"checkpoint.init_layers=lower needs a source with at least as many"
            )


def peft_base(directory: pathlib.Path) -> pathlib.Path:
    """The local base model of PEFT adapters: ``base_model_name_or_path`` as given or relative to them."""
    base = str(peft.read_config(directory).get("base_model_name_or_path") or "")
    for candidate in (pathlib.Path(base), directory / base):
        if base and candidate.exists():
            return candidate.absolute()
    raise ConfigError(
        f"{KEY}: the PEFT adapters in {directory} name the base model '{base}', which is no local directory; "
        f"set base_model_name_or_path in {directory / peft.CONFIG} to the base model's directory"
    )


def peft_adapters(directory: pathlib.Path | str, targets: Flat, model: ModelConfig, key: str) -> Flat:
    """The adapters of the PEFT directory placed as ``targets``' lora_a / lora_b; ConfigError (naming
    ``key``) unless ``model``'s LoRA has their rank, alpha and targets."""
    try:
        _, fields, arrays = peft.read(directory, model)
    except hf.ConversionError as e:
        raise ConfigError(f"{key}: {e}") from None
    ours = {p for p in targets if p[-1] in ("lora_a", "lora_b")}
    same = (model.lora_rank, model.lora_alpha) == (fields["lora_rank"], fields["lora_alpha"]) and ours == set(arrays)
    if not same:
        raise ConfigError(
            f"{key}: {directory} holds LoRA adapters of rank {fields['lora_rank']}, alpha {fields['lora_alpha']:g} on "
            f"{fields['lora_targets']}; set lora.rank={fields['lora_rank']} lora.alpha={fields['lora_alpha']:g} "
            f"lora.targets='{fields['lora_targets']}'"
        )
    return {
        p: jax.make_array_from_callback(a.shape, targets[p].sharding, lambda index, a=a: a[index])
        for p, a in arrays.items()
    }


def load_adapters(init_from: str, fresh: nnx.State, target: nnx.State, model: ModelConfig) -> nnx.State:
    """``lora.init_from``: ``fresh`` parameters with their LoRA adapters replaced by those of a PEFT directory."""
    location = pathlib.Path(init_from).absolute()
    if not peft.is_adapter_dir(location):
        raise ConfigError(
            f"lora.init_from='{init_from}' holds no PEFT adapters (adapter_config.json + adapter_model.safetensors); "
            "point it at a PeftModel.save_pretrained or python -m train.export --format peft directory"
        )
    adapters = peft_adapters(location, flat(target), model, "lora.init_from")
    values = {p: adapters.get(p, x) for p, x in flat(fresh).items()}
    nnx.replace_by_pure_dict(fresh, traverse_util.unflatten_dict(values))
    if jax.process_index() == 0:
        print(f"lora.init_from {location}: restored {len(adapters)} adapter parameters", flush=True)
    return fresh


def describe(source: str, restored: int, fresh: list, unused: list) -> str:
    """One line: 'init_from SRC: restored N parameters; initialised fresh: a.b, ...; not used: ...'."""

    def names(paths: list) -> str:
        return ", ".join(".".join(p) for p in paths) or "none"

    line = f"init_from {source}: restored {restored} parameters; initialised fresh: {names(fresh)}"
    return line + (f"; not used: {names(unused)}" if unused else "")


# --- checkpoint.init_layers: lower ------------------------------------------------------------


def layer_axes(model: ModelConfig) -> dict[tuple[str, ...], int]:
    """Parameter path -> index of its ``layers`` axis, for every stacked layer parameter of ``model``."""
    specs = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.get_partition_spec(abstract_model(model)[1])))
    return {path: tuple(spec).index("layers") for path, spec in specs.items() if spec and "layers" in tuple(spec)}


def taller(source: tuple[int, ...] | None, want: tuple[int, ...], axis: int) -> bool:
    """Whether ``source`` is ``want`` with more rows along ``axis`` (a deeper stack of the same layer)."""
    if source is None or len(source) != len(want) or source[axis] <= want[axis]:
        return False
    return all(s == w for i, (s, w) in enumerate(zip(source, want)) if i != axis)


def lower_layers(stacked: jax.Array, want: jax.ShapeDtypeStruct, axis: int) -> jax.Array:
    """Rows [0, n) along the ``layers`` ``axis`` of a deeper source stack, placed as ``want`` [.., n, ..]."""
    n = want.shape[axis]
    return jax.jit(lambda x: jax.lax.slice_in_dim(x, 0, n, axis=axis), out_shardings=want.sharding)(stacked)
