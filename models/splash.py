"""Splash attention (the Pallas TPU flash-attention kernel) behind ``model.attention: splash``.

The kernel works on one device's arrays, so it runs under ``jax.shard_map``: batch over the
data-parallel mesh axes and heads over the tensor axis, taken from the same logical rules as
the rest of the model (``batch``, ``act_heads``, ``act_kv_heads``). Grouped-query attention
uses the kernel's own head grouping (``kv_heads`` must divide ``n_heads``). Only TPUs run it;
its numerics cannot be checked on CPU, where ``xla`` stays the reference implementation.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

BLOCKS = (512, 256, 128)  # query/key tiles of the kernels, largest first (MaxText's default is 512)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    scale: float,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, heads, head_dim], k/v [B, S, kv_heads, head_dim] -> [B, T, heads, head_dim].

    T and S must be multiples of 128, the kernel's smallest tile. segment_ids: the queries' [B, T]
    and keys' [B, S] int segment ids (the kernel's ``SegmentIds``: a query sees only keys of its own
    id); every query must see at least one key, which holds for self-attention. interpret: run the
    kernels in Pallas interpret mode, on any backend and slowly (how CPU tests check their numerics).
    """
    mesh = jax.sharding.get_abstract_mesh()  # the jax.set_mesh mesh the step is traced for, maybe TPUs from a CPU host
    device = None if mesh.empty else mesh.abstract_device
    platform = jax.default_backend() if device is None else device.platform
    if platform != "tpu" and not interpret:
        raise ValueError(f"model.attention='splash' runs on TPU only, not on {platform}; use model.attention='xla'")
    if q.shape[1] % BLOCKS[-1] or k.shape[1] % BLOCKS[-1]:
        raise ValueError(f"model.attention='splash' needs sequence lengths that are multiples of {BLOCKS[-1]}")
    t, heads, s = q.shape[1], q.shape[2], k.shape[1]
    q = (q * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, heads, T, head_dim]; the kernel does not scale
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv_heads, S, head_dim]
    segments = () if segment_ids is None else tuple(ids.astype(jnp.int32) for ids in segment_ids)
    if mesh.empty:
        kernel = _with_segments(_kernel(heads, t, s, causal, interpret))
        return jax.vmap(kernel)(q, k, v, *segments).transpose(0, 2, 1, 3)
    q_spec = nn.logical_to_mesh_axes(("batch", "act_heads", None, None))
    kv_spec = nn.logical_to_mesh_axes(("batch", "act_kv_heads", None, None))
    ids_spec = nn.logical_to_mesh_axes(("batch", None))
    local_heads = heads // _axis_size(mesh, q_spec[1])  # this device's heads
    kernel = _with_segments(_kernel(local_heads, t, s, causal, interpret))
    specs = (q_spec, kv_spec, kv_spec) + (ids_spec,) * len(segments)

    @functools.partial(jax.shard_map, in_specs=specs, out_specs=q_spec, check_vma=False)
    def per_device(q, k, v, *segments):
        return jax.vmap(kernel)(q, k, v, *segments)

    return per_device(q, k, v, *segments).transpose(0, 2, 1, 3)


def _with_segments(kernel):
    """One example's kernel call, q/k/v [heads, length, head_dim], with optional segment ids [T], [S]."""

    def call(q, k, v, *segments):
        from jax.experimental.pallas.ops.tpu import splash_attention as splash

        return kernel(q, k, v, segment_ids=splash.SegmentIds(*segments) if segments else None)

    return call


def _block(length: int) -> int:
    return next(b for b in BLOCKS if length % b == 0)


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[n] for n in names)


@functools.cache
def _kernel(heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool = False):
    """The kernel for one device's ``heads``: [heads, T, head_dim] q with [kv_heads, S, head_dim] k, v."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas/Mosaic: only when used

    mask_type = splash.CausalMask if causal else splash.FullMask
    mask = splash.MultiHeadMask([mask_type((q_len, kv_len)) for _ in range(heads)])
    bq, bkv = _block(q_len), _block(kv_len)
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
