"""Freezing: parameters (``train.freeze``) and lower layers (``train.freeze_layers``) kept fixed.

A parameter's path is its nnx state path joined by '/', without the trailing ``value``:
``embed/embedding``, ``pos_embed``, ``stack/blocks/attn/q/kernel``, ``encoder/blocks/mlp/wo/kernel``.
``train.freeze`` is a regular expression that must match a whole path or a leading part of it
ending at a '/': ``embed`` freezes ``embed/embedding`` but not ``pos_embed``; ``stack/blocks/attn``
freezes every attention weight of every layer. Such parameters get no optimizer state at all
(``optax.multi_transform`` with ``set_to_zero``).

``train.freeze_layers: N`` freezes rows [0, N) of the ``layers`` axis of every stacked parameter
(the lower N blocks of each stack). A stacked array's optimizer state is one array for all its
layers, so those rows keep (zero) moments; their gradient rows are zeroed before clipping and the
optimizer, and their update rows after it, so weight decay cannot move them either: the update
is exactly zero and the rows stay bitwise unchanged.

A PEFT run (``lora.rank > 0`` or ``peft.method``, ``Freeze.adapters_only``) freezes every parameter but
the method's (LoRA's ``lora_a`` / ``lora_b``, models/lora.py; the adapters, prefixes, gates and prompts
of models/peft.py, ``is_peft_path``) and a classifier's fresh head (``pooler``, ``classifier``: as PEFT's
sequence-classification ``modules_to_save``) the same way.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from models.config import ConfigError
from models.peft import is_peft_path

TRAINABLE, FROZEN = "trainable", "frozen"


@dataclasses.dataclass(frozen=True)
class Freeze:
    pattern: str = ""  # train.freeze
    layers: int = 0  # train.freeze_layers
    adapters_only: bool = False  # a PEFT run: everything but the method's parameters


NOTHING = Freeze()


def param_path(key_path) -> str:
    """A tree path into the parameters (or into a tree shaped like them) -> 'stack/blocks/attn/q/kernel'."""
    parts = []
    for key in key_path:
        if isinstance(key, DictKey):
            parts.append(str(key.key))
        elif isinstance(key, SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, GetAttrKey) and key.name != "value":
            parts.append(key.name)
    return "/".join(parts)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _paths(logical_specs) -> dict[str, PartitionSpec]:
    flat = jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=_is_spec)
    return {param_path(path): spec for path, spec in flat}


def frozen_paths(logical_specs, pattern: str) -> set[str]:
    """The parameter paths ``pattern`` freezes (all of them under a matched leading part)."""
    if not pattern:
        return set()
    matcher = re.compile(f"(?:{pattern})(?:/.*)?")
    return {path for path in _paths(logical_specs) if matcher.fullmatch(path)}


def labels(logical_specs, frozen: set[str]):
    """The parameters' tree of 'trainable' / 'frozen' (the labels of ``optax.multi_transform``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: FROZEN if param_path(path) in frozen else TRAINABLE, logical_specs, is_leaf=_is_spec
    )


def kept_rows(abstract_params, logical_specs, layers: int) -> dict[str, np.ndarray]:
    """path -> bool mask broadcastable to the parameter, False on rows [0, layers) of its ``layers`` axis."""
    if layers == 0:
        return {}
    shapes = {param_path(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}
    out = {}
    for path, spec in _paths(logical_specs).items():
        if "layers" not in spec:
            continue
        axis, shape = tuple(spec).index("layers"), shapes[path]
        if layers > shape[axis]:
            raise ConfigError(
                f"train.freeze_layers={layers} is more than the {shape[axis]} layers of {path}; "
                f"set it to at most {shape[axis]}"
            )
        mask_shape = [1] * len(shape)
        mask_shape[axis] = shape[axis]
        out[path] = (np.arange(shape[axis]) >= layers).reshape(mask_shape)
    return out


def trainable_leaves(params, frozen: frozenset[str] | set[str]) -> dict[str, jax.Array]:
    """path -> array of every parameter not in ``frozen``: the ones a train step differentiates."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {name: x for name, x in ((param_path(path), x) for path, x in leaves) if name not in frozen}


def with_leaves(params, leaves: dict[str, jax.Array]):
    """``params`` (or a tree shaped like them) with the arrays at the paths of ``leaves`` replaced by those."""
    return jax.tree_util.tree_map_with_path(lambda path, x: leaves.get(param_path(path), x), params)


def zero_frozen_rows(grads: dict[str, jax.Array], rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """path -> gradient with the frozen layer rows (``kept_rows``) zeroed, as clipping sees it."""
    return {name: jnp.where(rows[name], g, jnp.zeros_like(g)) if name in rows else g for name, g in grads.items()}


def zero_frozen(frozen: set[str], rows: dict[str, np.ndarray]) -> optax.GradientTransformation:
    """Stateless: zeroes the updates of frozen parameters and of the frozen rows of stacked ones."""

    def update(updates, state, params=None):
        def one(path, u):
            name = param_path(path)
            if name in frozen:
                return jnp.zeros_like(u)
            return jnp.where(rows[name], u, jnp.zeros_like(u)) if name in rows else u

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def with_freezing(
    tx: optax.GradientTransformation, abstract_params, logical_specs, freeze: Freeze
) -> tuple[optax.GradientTransformation, int]:
    """``tx`` restricted to the trainable parameters, and the number of trainable values.

    ``tx`` is assumed to include the gradient clipping, so clipping sees only trainable gradients.
    """
    frozen = frozen_set(logical_specs, freeze)
    rows = kept_rows(abstract_params, logical_specs, freeze.layers)
    trainable = trainable_count(abstract_params, frozen, rows)
    if trainable == 0:
        raise ConfigError("train.freeze and train.freeze_layers freeze every parameter; nothing would train")
    if frozen:
        tx = optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels(logical_specs, frozen))
    if frozen or rows:
        mask = zero_frozen(frozen, rows)
        tx = optax.chain(mask, tx, mask)
    return tx, trainable


def frozen_set(logical_specs, freeze: Freeze) -> set[str]:
    """The paths of the parameters ``freeze`` keeps whole (``train.freeze``, and with ``adapters_only``
    all but the adapters and a classifier's head); ConfigError when ``train.freeze`` matches none."""
    frozen = frozen_paths(logical_specs, freeze.pattern)
    if freeze.pattern and not frozen:
        example = ", ".join(f"'{p}'" for p in sorted(_paths(logical_specs))[:3])
        raise ConfigError(f"train.freeze='{freeze.pattern}' matches no parameter path; paths look like {example}")
    if freeze.adapters_only:
        frozen |= {path for path in _paths(logical_specs) if not _adapter_or_head(path)}
    return frozen


def _adapter_or_head(path: str) -> bool:
    return is_peft_path(path) or path.startswith(("pooler/", "classifier/"))


def trainable_count(abstract_params, frozen: set[str], rows: dict[str, np.ndarray]) -> int:
    """Parameter values that training changes: all but the frozen parameters and frozen layer rows."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        name = param_path(path)
        if name in frozen:
            continue
        total += leaf.size if name not in rows else leaf.size // rows[name].size * int(rows[name].sum())
    return total
