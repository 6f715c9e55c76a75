"""The optimizer (AdamW, Adafactor or SGD with momentum) with a learning-rate schedule, global-norm
clipping, decoupled weight decay on matrices, frozen parameters (train/core/freeze.py) and layer-wise
learning-rate decay (``optimizer.layer_decay``), from optax.

Weight decay is decoupled for every optimizer: each step also subtracts ``lr * weight_decay * w``
from the matrices (never from norms, biases or embedding tables).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.config.sections import OptimizerConfig
from train.core.freeze import Freeze, param_path, with_freezing

ADAFACTOR_EPS = 1e-30  # added to squared gradients (t5x's epsilon1)
ADAFACTOR_MIN_SCALE = 1e-3  # multiply_by_parameter_scale: floor of the parameter RMS (t5x's epsilon2)


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """``optimizer.warmup_ratio`` of the steps (rounded) when set, else ``optimizer.warmup_steps``; at most all."""
    return min(round(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio > 0 else cfg.warmup_steps, total_steps)


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``cfg.lr``, then cosine / linear / constant / warmup-stable-decay / rsqrt."""
    warmup = warmup_steps(cfg, total_steps)
    rest = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, rest)
    elif cfg.schedule == "rsqrt":
        after = rsqrt_schedule(cfg.lr, max(warmup, 1))
    else:  # wsd: stable at the peak, then a linear decay over the last decay_fraction of steps
        decay = max(int(rest * cfg.decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end, decay)], [rest - decay]
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def rsqrt_schedule(lr: float, start: int) -> optax.Schedule:
    """``lr * sqrt(start / (start + count))``: after a warm-up of ``start`` steps, ``lr * sqrt(start / step)``
    (T5's ``1 / sqrt(max(step, 10_000))`` is lr 0.01 with warmup_steps 10_000)."""
    return lambda count: lr * jnp.sqrt(start / (start + count))


def _is_spec(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


EMBEDDING_TABLE = re.compile(r"(.*/)?\w*embed(/embedding)?")  # embed/embedding, pos_embed, type_embed


def decay_mask(logical_specs):
    """True for matrices (two or more axes besides ``layers``) but embedding tables; norms, biases and
    embeddings are not decayed."""

    def is_matrix(path, spec) -> bool:
        matrix = sum(1 for name in spec if name != "layers") >= 2
        return matrix and not EMBEDDING_TABLE.fullmatch(param_path(path))

    return jax.tree_util.tree_map_with_path(is_matrix, logical_specs, is_leaf=_is_spec)


def layer_scales(decay: float, abstract_params, logical_specs) -> dict[str, float | np.ndarray]:
    """Layer-wise learning-rate decay: path -> multiplier of the parameter's update. Layer ``i`` of a
    stack of ``L`` (its ``layers`` axis) gets ``decay ** (L - i)`` (an array broadcastable to the
    parameter), the embeddings (top-level ``*embed*`` parameters, their norm too) ``decay ** (L + 1)``,
    every other parameter (heads, final norms) 1."""
    shapes = {param_path(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}
    specs = {param_path(path): spec for path, spec in jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=_is_spec)}
    depth = max((shapes[p][tuple(s).index("layers")] for p, s in specs.items() if "layers" in s), default=0)
    out: dict[str, float | np.ndarray] = {}
    for path, spec in specs.items():
        if "layers" in spec:
            axis, shape = tuple(spec).index("layers"), shapes[path]
            broadcast = [1] * len(shape)
            broadcast[axis] = shape[axis]
            out[path] = (decay ** (shape[axis] - np.arange(shape[axis]))).astype(np.float32).reshape(broadcast)
        elif "embed" in path.split("/")[0]:
            out[path] = decay ** (depth + 1)
    return out


def scale_by_layer(scales: dict[str, float | np.ndarray]) -> optax.GradientTransformation:
    """Stateless: multiplies each update by its ``layer_scales`` multiplier (1 where it has none)."""

    def update(updates, state, params=None):
        def one(path, u):
            name = param_path(path)
            return u * jnp.asarray(scales[name], u.dtype) if name in scales else u

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scaling(cfg: OptimizerConfig) -> list[optax.GradientTransformation]:
    """The optimizer's own direction, before weight decay and the learning rate."""
    if cfg.name == "adamw":
        return [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
    if cfg.name == "sgd":
        return [optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum else []
    out = [  # adafactor, as t5x: factored second moments, update clipping, relative step sizes
        optax.scale_by_factored_rms(
            factored=cfg.factored,
            decay_rate=cfg.decay_rate,
            min_dim_size_to_factor=cfg.min_dim_size_to_factor,
            epsilon=ADAFACTOR_EPS,
        )
    ]
    if cfg.clipping_threshold > 0:
        out.append(optax.clip_by_block_rms(cfg.clipping_threshold))
    if cfg.multiply_by_parameter_scale:
        out.append(optax.scale_by_param_block_rms(ADAFACTOR_MIN_SCALE))
    return out


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, abstract_params: nnx.State, logical_specs: nnx.State, freeze: Freeze
) -> tuple[optax.GradientTransformation, int]:
    """The run's transformation and its number of trainable parameter values.

    ``abstract_params``: the parameters' shapes; ``logical_specs``: their logical PartitionSpecs (same tree).
    """
    tx = optax.chain(
        *scaling(cfg),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(logical_specs)),
        optax.scale_by_learning_rate(schedule(cfg, total_steps)),
    )
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    tx, trainable = with_freezing(tx, abstract_params, logical_specs, freeze)
    if cfg.layer_decay < 1:
        tx = optax.chain(tx, scale_by_layer(layer_scales(cfg.layer_decay, abstract_params, logical_specs)))
    return tx, trainable
