"""Post-training weight-only int8: symmetric, per output channel, dequantised on the fly.

A quantised model (``ModelConfig.quant='int8'``) is built as the float one, then every ``Dense``
whose path (``'stack/blocks/attn/q'``, joined by ``/``) does not match ``cfg.quant_skip`` is
swapped for a ``QDense``: ``kernel`` int8 [..., d_in, d_out] with the float kernel's logical axes
and ``scale`` float32 [..., d_out] with the same axes less the reduced input one (so
``('layers', 'embed', 'heads')`` -> ``('layers', 'heads')``), and the model shards as the float one.
With ``cfg.quant_embeddings`` every token table (``nnx.Embed``) becomes a ``QEmbed`` too: int8
``table`` [vocab, embed] with a float32 ``scale`` per row [vocab] (axes ``('vocab',)``), which is also
per output channel of a tied LM head, and every untied LM head (a parameter with axes ``('embed', 'vocab')``:
``head``, BERT's ``mlm/decoder``) becomes a ``QHead``: int8 ``kernel`` [embed, vocab] and float32 ``scale`` [vocab]
(axes ``('vocab',)``). Position tables, norms and biases stay float.

Quantisation-aware training (``cfg.quant='qat'``) selects the same weights but keeps them float: each becomes
a ``FakeQuant`` parameter, which reads (``p[...]``) as its int8 round trip ``dequantize(*quantize(w))``
with a straight-through gradient, so a QAT model computes what its int8 export will, and trains for it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.layers import Dense, adapter, matmul

QMAX = 127  # symmetric int8: [-127, 127], so 0 is exact and the range is the same both ways


def quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [..., d_in, d_out] float -> (q int8 [..., d_in, d_out], scale float32 [..., d_out]).

    scale = absmax over d_in / 127 (1 for an all-zero channel), q = round(w / scale), so
    |w - q * scale| <= scale / 2 for every element.
    """
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(absmax > 0, absmax / QMAX, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """(q int8 [..., d_in, d_out], scale [..., d_out]) -> float32 [..., d_in, d_out]."""
    return q.astype(jnp.float32) * scale[..., None, :]


class QDense(nnx.Module):
    """``Dense`` with an int8 kernel: ``(x @ kernel) * scale + bias``.

    The int8 kernel is cast to the compute dtype inside the jitted matmul (exact: bf16 holds every
    integer up to 256) and the per-channel scale multiplies the float32 product, which equals
    ``x @ (kernel * scale)``; the weights stay int8 in memory. LoRA adapters (``models.lora``,
    QLoRA) add their float update as on a ``Dense`` (``models.layers.adapter``).
    """

    lora_a = lora_b = None  # [d_in, r], [r, d_out] when models.lora attaches them

    def __init__(self, dense: Dense):
        kernel = dense.kernel
        axes = kernel.get_metadata().get("out_sharding")
        q, scale = quantize(kernel[...])
        self.kernel = nnx.Param(q, out_sharding=axes, eager_sharding=False)
        scale_axes = None if axes is None else tuple(axes[:-2]) + (axes[-1],)
        self.scale = nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False)
        self.bias = dense.bias
        self.dtype = dense.dtype

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x [..., d_in] -> [..., d_out]; rng: the adapters' dropout key (None: off)."""
        x = x.astype(self.dtype)
        y = adapter(self, x, matmul(x, self.kernel[...].astype(self.dtype)) * self.scale[...], rng)  # [..., d_out] f32
        if self.bias is not None:
            y = y + self.bias[...]
        return checkpoint_name(y.astype(self.dtype), "projection")


class QEmbed(nnx.Module):
    """``nnx.Embed`` with an int8 table: ``tokens [...] -> table[tokens] * scale[tokens]`` [..., embed].

    ``embedding`` is the dequantised float32 table [vocab, embed], for the tied LM heads that read
    ``embed.embedding[...]`` (a jax array indexes with ``[...]`` as a Param does); it is computed
    inside the jitted forward, so only the int8 table and its scales are kept.
    """

    def __init__(self, embed: nnx.Embed):
        axes = embed.embedding.get_metadata().get("out_sharding")
        q, scale = quantize(embed.embedding[...].T)  # per row: the rows are the output channels of w.T
        self.table = nnx.Param(q.T, out_sharding=axes, eager_sharding=False)
        self.scale = nnx.Param(scale, out_sharding=None if axes is None else (axes[0],), eager_sharding=False)
        self.dtype = embed.dtype

    @property
    def embedding(self) -> jax.Array:
        return dequantize(self.table[...].T, self.scale[...]).T

    def __call__(self, tokens: jax.Array) -> jax.Array:
        rows = self.table[...][tokens].astype(jnp.float32) * self.scale[...][tokens][..., None]
        return rows.astype(self.dtype)


class QHead(nnx.Module):
    """An untied LM head [embed, vocab] in int8: ``kernel`` int8 [embed, vocab], ``scale`` float32 [vocab].

    ``head[...]`` is the dequantised float32 [embed, vocab] matrix (read as the float ``nnx.Param`` it
    replaces), computed inside the jitted forward, so only the int8 kernel and its scales are kept.
    """

    def __init__(self, head: nnx.Param):
        axes = head.get_metadata().get("out_sharding")
        q, scale = quantize(head[...])
        self.kernel = nnx.Param(q, out_sharding=axes, eager_sharding=False)
        self.scale = nnx.Param(scale, out_sharding=None if axes is None else (axes[-1],), eager_sharding=False)

    def __getitem__(self, key) -> jax.Array:
        return dequantize(self.kernel[...], self.scale[...])[key]


HEAD_AXES = ("embed", "vocab")  # the logical axes of an untied LM head


def selected(model: nnx.Module, skip: str = "", embeddings: bool = False) -> Iterator[tuple[str, object, str | int]]:
    """(path, parent, attribute) of each weight quantisation takes: every ``Dense``, and with ``embeddings``
    every ``nnx.Embed`` and untied LM head parameter (axes ``('embed', 'vocab')``), whose path
    (``'stack/blocks/mlp/wi'``, ``'embed'``, ``'head'``) does not match the regex ``skip`` ('' skips none).
    ``getattr(parent, attribute)`` (``parent[attribute]`` for an int) is the Dense, Embed or Param."""
    pattern = re.compile(skip) if skip else None
    for path, module in list(nnx.iter_modules(model)):
        hits = []
        if type(module) is Dense or (embeddings and type(module) is nnx.Embed):
            hits.append((path, _parent(model, path), path[-1]))
        if embeddings:
            heads = [k for k, v in vars(module).items() if type(v) is nnx.Param and _axes(v) == HEAD_AXES]
            hits += [((*path, k), module, k) for k in heads]
        for where, parent, attribute in hits:
            name = "/".join(str(p) for p in where)
            if pattern is None or not pattern.search(name):
                yield name, parent, attribute


def _parent(model: nnx.Module, path: tuple) -> nnx.Module:
    for p in path[:-1]:
        model = getattr(model, p) if isinstance(p, str) else model[p]
    return model


def _axes(param: nnx.Variable) -> tuple | None:
    axes = param.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def _get(parent, attribute):
    return parent[attribute] if isinstance(attribute, int) else getattr(parent, attribute)


def _set(parent, attribute, value) -> None:
    if isinstance(attribute, int):
        parent[attribute] = value
    else:
        setattr(parent, attribute, value)


def quantize_model(model: nnx.Module, skip: str = "", embeddings: bool = False) -> list[str]:
    """Swaps in place every weight ``selected(model, skip, embeddings)`` names for its int8 twin (``QDense``,
    ``QEmbed``, ``QHead``); returns the quantised paths."""
    twins = {Dense: QDense, nnx.Embed: QEmbed, nnx.Param: QHead}
    done = []
    for name, parent, attribute in list(selected(model, skip, embeddings)):
        old = _get(parent, attribute)
        _set(parent, attribute, twins[type(old)](old))
        done.append(name)
    return done


def dequantize_params(flat: dict[tuple, jax.Array]) -> dict[tuple, jax.Array]:
    """Flat parameters of a quantised model (path tuple -> array) -> those of its float twin: each int8
    ``kernel`` and its ``scale`` become the float32 ``kernel`` q * scale, each int8 ``table`` and its
    ``scale`` the ``embedding`` (one scale per row); the rest is unchanged."""
    out = dict(flat)
    for path, q in flat.items():
        parent, name = path[:-1], path[-1]
        scale = flat.get((*parent, "scale"))
        if name not in ("kernel", "table") or scale is None or q.dtype != jnp.int8:
            continue
        del out[(*parent, "scale")]
        if name == "kernel":
            out[path] = dequantize(q, scale)
        else:
            del out[path]
            out[(*parent, "embedding")] = dequantize(q.T, scale).T
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fake_quantize(w: jax.Array, axis: int = -2) -> jax.Array:
    """w float -> its int8 round trip float32 (same shape), per channel: ``axis`` is the one the absmax
    reduces (-2: a kernel [..., d_in, d_out], one scale per output channel; -1: a token table
    [vocab, embed], one per row). The same arithmetic as ``dequantize(*quantize(w))``, so the values
    equal an int8 export's. The gradient is straight-through: the identity, as if it were not rounded.
    """
    if axis == -1:
        return jnp.swapaxes(dequantize(*quantize(jnp.swapaxes(w, -1, -2))), -1, -2)
    return dequantize(*quantize(w))


@fake_quantize.defjvp
def _fake_quantize_jvp(axis, primals, tangents):
    (w,), (dw,) = primals, tangents
    return fake_quantize(w, axis), dw.astype(jnp.float32)


class FakeQuant(nnx.Param):
    """A float parameter that reads (``p[...]``) as ``fake_quantize(value, p.quant_axis)``: its int8 round
    trip with a straight-through gradient. Its stored value, state path, shape, logical axes and
    optimizer state are the plain ``nnx.Param``'s; only the forward pass sees the rounding. ``get_value()``
    reads the stored float value (of a gradient tree too, whose leaves keep this type)."""

    def __getitem__(self, key) -> jax.Array:
        return fake_quantize(self.get_value(), self.quant_axis)[key]


def add_fake_quant(model: nnx.Module, skip: str = "", embeddings: bool = False) -> list[str]:
    """Quantisation-aware training: turns in place the float weight of everything ``selected(model, skip,
    embeddings)`` names (a Dense ``kernel``, an Embed's ``embedding``, an untied head) into a ``FakeQuant``
    parameter with the same value and metadata; returns the paths. ``float_weights`` undoes it."""
    done = []
    for name, parent, attribute in list(selected(model, skip, embeddings)):
        old = _get(parent, attribute)
        if isinstance(old, Dense):
            old.kernel = _fake(old.kernel, -2)
        elif isinstance(old, nnx.Embed):
            old.embedding = _fake(old.embedding, -1)
        else:
            _set(parent, attribute, _fake(old, -2))
        done.append(name)
    return done


def _fake(param: nnx.Param, axis: int) -> FakeQuant:
    return FakeQuant(param.get_value(), quant_axis=axis, **param.get_metadata())


def float_weights(model: nnx.Module) -> None:
    """Turns every ``FakeQuant`` parameter of ``model`` back into a plain ``nnx.Param`` (same value and
    axes) in place: the float model a QAT run trained, ready for ``quantize_model``."""
    for _, module in list(nnx.iter_modules(model)):
        for name, value in list(vars(module).items()):
            if isinstance(value, FakeQuant):
                metadata = {k: v for k, v in value.get_metadata().items() if k != "quant_axis"}
                setattr(module, name, nnx.Param(value.get_value(), **metadata))
