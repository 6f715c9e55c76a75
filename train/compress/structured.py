"""Structured pruning: remove the least important attention heads or MLP neurons of every layer.

The result is a smaller model of the same family (``n_heads`` / ``n_kv_heads`` or ``d_ff`` lowered,
``head_dim`` written out), whose outputs equal the original's with those heads' / neurons' output
rows zeroed (tested). Every layer keeps the same count, since a stack's layers are one array each;
which heads / neurons stay is chosen per layer.

Importance (per layer), ``weight`` by default:

- ``weight``: a neuron f scores ``||[wi[:, f]; wg[:, f]]|| * ||wo[f, :]||`` (how much it can read
  times how much it can write); an attention head h ``||v_g(h)|| * ||o[h]||``, the norm of its value
  columns (its key/value group's) times its rows of the output projection. Queries and keys only
  shape the attention pattern; the value-output path bounds what a head adds to the residual stream.
- ``taylor`` (data): removing a head or neuron is zeroing its output rows W_r, which changes the loss
  by about ``<dL/dW_r, W_r>`` (first-order Taylor, as Molchanov et al. 2019); a unit scores the mean
  over a few batches of that estimate's absolute value. ``dL/dW_r`` sums the activation of the unit
  times the gradient at the output over the batch's tokens, so this weighs what the unit actually
  writes on real data. The gradients come from the caller (train/compress/pruning.py).

Grouped-query attention removes whole key/value groups (a kv head and its ``n_heads / n_kv_heads``
query heads, scored by their summed importance), so the group size stays the same. T5's relative
position bias is one [buckets, heads] table for all layers of a stack, so heads cannot be removed per
layer there: ``heads`` refuses ``family: encoder_decoder`` (its neurons prune as any other).

Parameters are handled as a flat dict of path tuples, ``('stack', 'blocks', 'mlp', 'wi', 'kernel')``,
of stacked arrays ``[layers, ...]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.config import ConfigError, ModelConfig
from models.layers import GATED

Flat = dict[tuple[str, ...], np.ndarray]


def stacks(flat: Flat) -> list[tuple[str, ...]]:
    """The path prefixes of the model's layer stacks (``('stack',)``, or ``('encoder',), ('decoder',)``)."""
    return sorted({p[: p.index("blocks")] for p in flat if "blocks" in p and p[p.index("blocks") + 1] == "mlp"})


def removed_count(total: int, sparsity: float, what: str) -> int:
    """round(sparsity * total); ConfigError when that removes nothing or everything."""
    n = int(np.floor(sparsity * total + 0.5))
    if n == 0:
        raise ConfigError(
            f"--sparsity {sparsity} removes none of the {total} {what} per layer; raise it to at least {0.5 / total:.3g}"
        )
    if n >= total:
        raise ConfigError(
            f"--sparsity {sparsity} would remove all {total} {what} of every layer; lower it below {(total - 0.5) / total:.3g}"
        )
    return n


def _top(scores: np.ndarray, keep: int) -> np.ndarray:
    """[L, N] scores -> [L, keep] indices of the highest, ascending within each row (ties: lower index)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :keep]
    return np.sort(order, axis=-1)


def _norms(x: np.ndarray, axis: int, groups: int) -> np.ndarray:
    """Squared norms of ``x`` [L, ...] split into ``groups`` equal slices along ``axis`` -> [L, groups]."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    x = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    return np.sum(x**2, axis=tuple(range(1, x.ndim - 2)) + (x.ndim - 1,))


def neuron_scores(flat: Flat, stack: tuple[str, ...], cfg: ModelConfig) -> np.ndarray:
    """[L, d_ff] importance of each MLP neuron of ``stack``."""
    mlp = stack + ("blocks", "mlp")
    read = _norms(flat[mlp + ("wi", "kernel")], 2, cfg.d_ff)
    if cfg.mlp in GATED:
        read = read + _norms(flat[mlp + ("wg", "kernel")], 2, cfg.d_ff)
    return np.sqrt(read * _norms(flat[mlp + ("wo", "kernel")], 1, cfg.d_ff))


def group_scores(flat: Flat, stack: tuple[str, ...], cfg: ModelConfig) -> np.ndarray:
    """[L, kv_heads] importance of each key/value group of ``stack``'s self-attention."""
    attn = stack + ("blocks", "attn")
    per_group = cfg.n_heads // cfg.kv_heads
    value = _norms(flat[attn + ("v", "kernel")], 2, cfg.kv_heads)  # [L, K]
    out = _norms(flat[attn + ("o", "kernel")], 1, cfg.n_heads)  # [L, H]
    heads = np.sqrt(np.repeat(value, per_group, axis=1) * out)
    return heads.reshape(heads.shape[0], cfg.kv_heads, per_group).sum(-1)


def taylor_scores(contributions: Flat, stack: tuple[str, ...], cfg: ModelConfig, unit: str) -> np.ndarray:
    """[L, d_ff] (``unit='neurons'``) or [L, kv_heads] (``'heads'``) importance from ``contributions``:
    path -> mean over batches of |<dL/dW_r, W_r>| of each output row r of ``mlp/wo`` / ``attn/o`` ([L, rows])."""
    if unit == "neurons":
        return contributions[stack + ("blocks", "mlp", "wo", "kernel")]
    rows = contributions[stack + ("blocks", "attn", "o", "kernel")]  # [L, heads * head_dim]
    return rows.reshape(rows.shape[0], cfg.kv_heads, -1).sum(-1)


def importance(flat: Flat, stack: tuple[str, ...], cfg: ModelConfig, unit: str, contributions: Flat | None):
    """[L, units] scores of ``stack``'s neurons or key/value groups: by weight, or Taylor when given ``contributions``."""
    if contributions is not None:
        return taylor_scores(contributions, stack, cfg, unit)
    return neuron_scores(flat, stack, cfg) if unit == "neurons" else group_scores(flat, stack, cfg)


def _take(x: np.ndarray, axis: int, index: np.ndarray, width: int) -> np.ndarray:
    """x [L, ...] keeping, per layer, the blocks ``index`` [L, keep] of ``width`` values along ``axis``."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // width, width)
    expand = index.reshape(index.shape[0], *([1] * (blocks.ndim - 3)), index.shape[1], 1)
    kept = np.take_along_axis(blocks, expand, axis=-2)
    return np.moveaxis(kept.reshape(*x.shape[:-1], -1), -1, axis)


def shrink_neurons(
    flat: Flat, cfg: ModelConfig, sparsity: float, contributions: Flat | None = None
) -> tuple[Flat, ModelConfig, dict]:
    """(parameters, config, {stack: kept [L, d_ff'] indices}) without the ``sparsity`` share of each
    layer's MLP neurons of least importance (by weight, or ``taylor_scores`` of ``contributions``)."""
    keep = cfg.d_ff - removed_count(cfg.d_ff, sparsity, "MLP neurons")
    out, kept = dict(flat), {}
    for stack in stacks(flat):
        index = _top(importance(flat, stack, cfg, "neurons", contributions), keep)
        kept["/".join(stack)] = index
        mlp = stack + ("blocks", "mlp")
        for name in ("wi", "wg") if cfg.mlp in GATED else ("wi",):
            out[mlp + (name, "kernel")] = _take(flat[mlp + (name, "kernel")], 2, index, 1)
            if cfg.use_bias:
                out[mlp + (name, "bias")] = _take(flat[mlp + (name, "bias")], 1, index, 1)
        out[mlp + ("wo", "kernel")] = _take(flat[mlp + ("wo", "kernel")], 1, index, 1)
    return out, dataclasses.replace(cfg, d_ff=keep), kept


def shrink_heads(
    flat: Flat, cfg: ModelConfig, sparsity: float, contributions: Flat | None = None
) -> tuple[Flat, ModelConfig, dict]:
    """(parameters, config, {stack: kept [L, n_heads'] query heads}) without the ``sparsity`` share of
    each layer's attention heads (key/value groups under GQA) of least importance (by weight, or
    ``taylor_scores`` of ``contributions``)."""
    if cfg.family == "encoder_decoder":
        raise ConfigError(
            "--method heads does not apply to family encoder_decoder (T5): its relative-position bias is one "
            "table for all layers, so every layer must keep the same heads; use --method neurons"
        )
    grouped = cfg.kv_heads < cfg.n_heads
    groups_left = cfg.kv_heads - removed_count(cfg.kv_heads, sparsity, "key/value groups" if grouped else "heads")
    per_group, hd = cfg.n_heads // cfg.kv_heads, cfg.dim_per_head
    out, kept = dict(flat), {}
    for stack in stacks(flat):
        groups = _top(importance(flat, stack, cfg, "heads", contributions), groups_left)  # [L, K']
        heads = (groups[:, :, None] * per_group + np.arange(per_group)).reshape(groups.shape[0], -1)  # [L, H']
        kept["/".join(stack)] = heads
        attn = stack + ("blocks", "attn")
        for name, index in (("q", heads), ("k", groups), ("v", groups)):
            out[attn + (name, "kernel")] = _take(flat[attn + (name, "kernel")], 2, index, hd)
            if cfg.use_bias:
                out[attn + (name, "bias")] = _take(flat[attn + (name, "bias")], 1, index, hd)
        out[attn + ("o", "kernel")] = _take(flat[attn + ("o", "kernel")], 1, heads, hd)
    n_heads = groups_left * per_group
    small = dataclasses.replace(cfg, n_heads=n_heads, n_kv_heads=groups_left if cfg.n_kv_heads else 0, head_dim=hd)
    return out, small, kept


METHODS = {"heads": shrink_heads, "neurons": shrink_neurons}
