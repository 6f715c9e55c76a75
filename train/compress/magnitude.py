"""Unstructured magnitude pruning (``prune:``): masks of the smallest weights, a cubic schedule, and an
optax wrapper that keeps masked weights exactly zero.

Targets are the parameters whose path (``stack/blocks/mlp/wi/kernel``, train/core/freeze.py) matches
``prune.targets`` (``re.search``) and that are matrices (two axes or more besides ``layers``).
At each pruning step t (``start_step, start_step + every, ..., end_step``, 0-based: the state's step
before the update) the target sparsity is Zhu & Gupta's cubic schedule

    s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3)        (s_f at t0 == t1: one-shot)

and the round(s_t * n) values of smallest magnitude become zero: n counts every targeted value
(``scope: global``, one ranking) or the values of one matrix in one layer (``scope: layer``: each row
of a stacked [layers, ...] array is ranked on its own). Ties go to the lower flat index, so weights
that are already zero (pruned before) stay pruned as long as the sparsity does not fall.

The masks are boolean arrays shaped, and so sharded, like their parameters; they live in the
optimizer state (``PruneState``), so checkpoints hold them and a resumed run is bitwise the
uninterrupted one. Gradients of masked weights are zeroed before clipping and the optimizer, and
each masked weight's update is ``-w``, so it is exactly zero after every step (weight decay and
momentum cannot revive it).

Only trainable values are pruned: parameters ``train.freeze`` freezes are no target, and the layer rows
``train.freeze_layers`` keeps rank after every other value and count in no group's n, so frozen
weights stay bitwise unchanged and the sparsity is that of the prunable values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from models.config import ConfigError
from train.config.sections import PruneConfig
from train.core.freeze import NOTHING, Freeze, frozen_set, kept_rows, param_path


def sparsity_at(t: int, cfg: PruneConfig) -> float:
    """The cubic schedule's target sparsity at step ``t`` (0 before ``start_step``, ``sparsity`` from ``end_step``)."""
    t0, t1 = cfg.start_step, cfg.end_step
    if t < t0:
        return 0.0
    if t >= t1:
        return cfg.sparsity
    return cfg.sparsity * (1.0 - (1.0 - (t - t0) / (t1 - t0)) ** 3)


def pruning_steps(cfg: PruneConfig) -> list[int]:
    """The steps at which masks are recomputed: start, start + every, ..., and end."""
    return sorted(set(range(cfg.start_step, cfg.end_step, cfg.every)) | {cfg.end_step})


def zeros_for(sparsity: float, n: int) -> int:
    """round(sparsity * n): how many of ``n`` values a sparsity zeroes."""
    return math.floor(sparsity * n + 0.5)


def _flat(tree) -> dict[str, jax.Array]:
    """path -> leaf of a parameter-shaped tree."""
    return {param_path(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def targets(logical_specs, pattern: str) -> dict[str, int | None]:
    """path -> the index of its ``layers`` axis (None: not stacked), for every targeted matrix."""
    out = {}
    matcher = re.compile(pattern)
    for path, spec in jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=_is_spec):
        name, axes = param_path(path), tuple(spec)
        if matcher.search(name) and sum(a != "layers" for a in axes) >= 2:
            out[name] = axes.index("layers") if "layers" in axes else None
    return out


def _rows(x: jax.Array, layer_axis: int | None) -> jax.Array:
    """x -> [rows, values]: one row per layer of a stacked array, else one row."""
    if layer_axis is None:
        return x.reshape(1, -1)
    return jnp.moveaxis(x, layer_axis, 0).reshape(x.shape[layer_axis], -1)


def _unrows(rows: jax.Array, like: jax.Array, layer_axis: int | None) -> jax.Array:
    if layer_axis is None:
        return rows.reshape(like.shape)
    moved = jnp.moveaxis(like, layer_axis, 0).shape
    return jnp.moveaxis(rows.reshape(moved), 0, layer_axis)


def _keep(magnitudes: jax.Array, zeros: jax.Array) -> jax.Array:
    """[rows, n] magnitudes, [rows] counts -> bool [rows, n], False at each row's ``zeros`` smallest."""
    order = jnp.argsort(magnitudes, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return rank >= zeros[:, None]


def group_sizes(
    shapes: dict[str, tuple[int, ...]],
    layer_axes: dict[str, int | None],
    scope: str,
    prunable: dict[str, np.ndarray] | None = None,
) -> list[int]:
    """The number of prunable values in each ranking group, in the order ``magnitude_masks`` takes counts;
    ``prunable``: path -> bool mask broadcastable to the weight, False where it must never be pruned (the
    layer rows ``train.freeze_layers`` keeps; train/core/freeze.py ``kept_rows``), all prunable where absent."""
    prunable, out = prunable or {}, []
    for path in sorted(layer_axes):
        mask, axis = np.broadcast_to(prunable.get(path, True), shapes[path]), layer_axes[path]
        rows = mask.reshape(1, -1) if axis is None else np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1)
        out += rows.sum(1).tolist()
    return [sum(out)] if scope == "global" else out


def magnitude_masks(
    weights: dict[str, jax.Array],
    layer_axes: dict[str, int | None],
    zeros: jax.Array,
    scope: str,
    prunable: dict[str, np.ndarray] | None = None,
) -> dict[str, jax.Array]:
    """path -> bool mask (False: pruned) of each targeted weight; ``zeros`` [groups] int counts, one per
    group of ``group_sizes`` (one for ``global``, one per matrix row of a layer for ``layer``). Values
    where ``prunable`` (as in ``group_sizes``) is False rank last, so they are never pruned."""
    paths, prunable = sorted(layer_axes), prunable or {}

    def magnitudes(p):
        m = jnp.abs(weights[p].astype(jnp.float32))
        return jnp.where(prunable[p], m, jnp.inf) if p in prunable else m

    rows = {p: _rows(magnitudes(p), layer_axes[p]) for p in paths}
    if scope == "global":
        flat = jnp.concatenate([rows[p].reshape(-1) for p in paths])
        keep, out, start = _keep(flat[None], zeros[:1])[0], {}, 0
        for p in paths:
            n = rows[p].size
            out[p] = _unrows(keep[start : start + n], weights[p], layer_axes[p])
            start += n
        return out
    out, start = {}, 0
    for p in paths:
        n = rows[p].shape[0]
        out[p] = _unrows(_keep(rows[p], zeros[start : start + n]), weights[p], layer_axes[p])
        start += n
    return out


def zero_counts(cfg: PruneConfig, sizes: list[int]) -> np.ndarray:
    """int32 [pruning steps, groups]: the values each group zeroes at each pruning step."""
    return np.array([[zeros_for(sparsity_at(t, cfg), n) for n in sizes] for t in pruning_steps(cfg)], np.int32)


class PruneState(NamedTuple):
    count: jax.Array  # int32 []: updates made so far (the state's step)
    masks: optax.Params  # bool, shaped like the parameters; optax.MaskedNode where not targeted
    inner: optax.OptState


def with_pruning(
    tx: optax.GradientTransformation, abstract_params, logical_specs, cfg: PruneConfig, freeze: Freeze = NOTHING
) -> tuple[optax.GradientTransformation, Callable, Callable]:
    """``tx`` keeping the targeted weights masked; ``measured(params) -> {'sparsity': zeros / values}`` over
    the prunable values; ``unpruned(grads, opt_state) -> grads``: path -> gradient of the trainable
    parameters with the pruned weights' entries zeroed, as clipping sees them.

    Only trainable weights are pruned: ``freeze``'s frozen parameters are no target and the layer rows
    it keeps are never masked, so they stay bitwise unchanged. Raises ConfigError when ``prune.targets``
    matches no trainable matrix."""
    frozen = frozen_set(logical_specs, freeze)
    matched = targets(logical_specs, cfg.targets)
    layer_axes = {p: axis for p, axis in matched.items() if p not in frozen}
    if not matched:
        raise ConfigError(
            f"prune.targets='{cfg.targets}' matches no matrix; paths look like 'stack/blocks/mlp/wi/kernel'"
        )
    shapes = {param_path(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
    rows = kept_rows(abstract_params, logical_specs, freeze.layers)
    prunable = {p: rows[p] for p in layer_axes if p in rows}
    sizes = group_sizes(shapes, layer_axes, cfg.scope, prunable)
    if sum(sizes) == 0:
        raise ConfigError(
            f"prune.targets='{cfg.targets}' matches only frozen weights (train.freeze='{freeze.pattern}', "
            f"train.freeze_layers={freeze.layers}); target trainable matrices or freeze less"
        )
    steps = jnp.asarray(pruning_steps(cfg), jnp.int32)
    counts = jnp.asarray(zero_counts(cfg, sizes))

    def by_path(fn, *trees):
        return jax.tree_util.tree_map_with_path(lambda path, *x: fn(param_path(path), *x), *trees)

    def init(params):
        masks = by_path(lambda p, x: jnp.ones_like(x, bool) if p in layer_axes else optax.MaskedNode(), params)
        return PruneState(jnp.zeros((), jnp.int32), masks, tx.init(params))

    def recompute(params, count):
        weights = _flat(params)
        new = magnitude_masks(
            {p: weights[p] for p in layer_axes}, layer_axes, counts[jnp.argmax(steps == count)], cfg.scope, prunable
        )
        return by_path(lambda p, x: new[p] if p in layer_axes else optax.MaskedNode(), params)

    def update(updates, state, params=None):
        masks = jax.lax.cond(jnp.any(steps == state.count), recompute, lambda *_: state.masks, params, state.count)
        flat = _flat(masks)
        masked = by_path(lambda p, u: jnp.where(flat[p], u, 0) if p in layer_axes else u, updates)
        inner_updates, inner = tx.update(masked, state.inner, params)
        final = by_path(lambda p, u, w: jnp.where(flat[p], u, -w) if p in layer_axes else u, inner_updates, params)
        return final, PruneState(state.count + 1, masks, inner)

    def measured(params) -> dict:
        weights = _flat(params)
        zeros = sum(jnp.sum((weights[p] == 0) & prunable.get(p, True)) for p in layer_axes)
        return {"sparsity": zeros / sum(sizes)}

    def unpruned(grads: dict[str, jax.Array], opt_state: PruneState) -> dict[str, jax.Array]:
        masks = _flat(opt_state.masks)
        return {p: jnp.where(masks[p], g, jnp.zeros_like(g)) if p in layer_axes else g for p, g in grads.items()}

    return optax.GradientTransformation(init, update), measured, unpruned
