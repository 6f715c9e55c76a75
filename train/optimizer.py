"""AdamW with a learning-rate schedule, global-norm clipping and a weight-decay mask (optax)."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from train.config import OptimizerConfig


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to ``cfg.lr``, then cosine / linear / constant / warmup-stable-decay."""
    warmup = min(cfg.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, rest)
    else:  # wsd: stable at the peak, then a linear decay over the last decay_fraction of steps
        decay = max(int(rest * cfg.decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end, decay)], [rest - decay]
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(logical_specs):
    """True for matrices (two or more axes besides ``layers``); norms and biases are not decayed."""

    def is_matrix(spec) -> bool:
        return sum(1 for name in spec if name != "layers") >= 2

    return jax.tree.map(is_matrix, logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def make_optimizer(cfg: OptimizerConfig, total_steps: int, logical_specs: nnx.State) -> optax.GradientTransformation:
    """``logical_specs``: the parameters' logical PartitionSpecs (same tree as the params)."""
    adamw = optax.adamw(
        schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask(logical_specs),
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
