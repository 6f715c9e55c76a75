"""A serving export (``python -m train.export SRC OUT --format stablehlo``): the model's forward, and a
decoder's prefill and one-token decode step, serialized with ``jax.export`` (StableHLO inside), so any
JAX runs them without meshlm's Python: ``jax.export.deserialize(bytes).call(weights, ...)``.

    OUT/forward.jaxexport   forward(weights, tokens[b, T] int32) -> logits[b, T, vocab] float32
                            (encoder: + mask[b, T] int32; encoder-decoder: + mask, decoder_tokens[b, D])
    OUT/prefill.jaxexport   decoders: prefill(weights, tokens[b, P], mask[b, P]) -> (logits[b, vocab] of each
                            row's last token, k, v, valid, index, positions[b]): the KV cache of S = max_seq_len
                            slots (k, v [layers, b, S, kv_heads, head_dim]) and each row's next position
    OUT/decode.jaxexport    decoders: decode(weights, token[b], positions[b], k, v, valid, index) ->
                            (logits[b, vocab], k, v, valid, index)
    OUT/weights.npz         the parameters as ``w0000, w0001, ...``: ``weights`` is that list in order
    OUT/serving.json        family, vocab size, max_seq_len, eos id, the files and their arguments

The batch ``b`` is symbolic, and so are T and P (at most max_seq_len) but for the encoder-decoder,
whose T and D are max_seq_len (pad with mask 0; T5's relative position buckets are laid out for
static lengths). Prompts are
left-padded (mask 0 on the left), as ``models.generate`` pads them.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.cache import KVCache, init_cache
from models.config import ModelConfig

SUFFIX = ".jaxexport"


def export_serving(model: nnx.Module, cfg: ModelConfig, out_dir: pathlib.Path, eos_id: int | None) -> list[str]:
    """Writes the files above for ``model`` (parameters on one device) into ``out_dir``; returns their names."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    weights = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    bind = lambda w: nnx.merge(graphdef, jax.tree.unflatten(treedef, w))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    programs = {"forward": _forward_program(cfg, bind, weights, ints)}
    if cfg.family == "decoder":
        b, t = _dims(cfg, "b, t")
        programs["prefill"] = (jax.jit(lambda w, x, mask: _prefill(bind(w), x, mask)), (weights, ints(b, t), ints(b, t)))
        (b,) = _dims(cfg, "b")
        cache = jax.eval_shape(lambda: init_cache(cfg, cfg.n_layers, 2, cfg.max_seq_len))
        k = jax.ShapeDtypeStruct((cfg.n_layers, b, *cache.k.shape[2:]), cache.k.dtype)
        valid = jax.ShapeDtypeStruct((b, cfg.max_seq_len), jnp.bool_)
        args = (weights, ints(b), ints(b), k, k, valid, jax.ShapeDtypeStruct((), jnp.int32))
        programs["decode"] = (jax.jit(lambda w, *rest: _decode(bind(w), *rest)), args)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, (fn, args) in programs.items():
        (out_dir / f"{name}{SUFFIX}").write_bytes(jax.export.export(fn)(*args).serialize())
        files.append(f"{name}{SUFFIX}")
    np.savez(out_dir / "weights.npz", **{f"w{i:04d}": np.asarray(x) for i, x in enumerate(leaves)})
    info = {"family": cfg.family, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len, "eos_id": eos_id,
            "files": files, "weights": "weights.npz"}  # fmt: skip
    (out_dir / "serving.json").write_text(json.dumps(info, indent=1) + "\n")
    return [*files, "weights.npz", "serving.json"]


def load_weights(out_dir: pathlib.Path) -> list[np.ndarray]:
    """``weights.npz`` as the list every exported function takes first."""
    with np.load(out_dir / "weights.npz") as saved:
        return [saved[name] for name in sorted(saved.files)]


def _dims(cfg: ModelConfig, names: str) -> tuple:
    """Symbolic dimensions (one scope per exported function); lengths are at most max_seq_len."""
    lengths = [f"{n} <= {cfg.max_seq_len}" for n in names.replace(" ", "").split(",") if n != "b"]
    return jax.export.symbolic_shape(names, constraints=lengths)


def _forward_program(cfg: ModelConfig, bind, weights, ints):
    """(jitted forward, its abstract arguments) for the family of ``cfg``."""
    if cfg.family == "decoder":
        b, t = _dims(cfg, "b, t")
        return jax.jit(lambda w, x: bind(w)(x)), (weights, ints(b, t))
    if cfg.family == "encoder":
        b, t = _dims(cfg, "b, t")
        return jax.jit(lambda w, x, mask: bind(w)(x, mask)), (weights, ints(b, t), ints(b, t))

    def seq2seq(w, x, mask, y):
        model = bind(w)
        return model.decode(y, model.encode(x, mask), mask)

    (b,) = _dims(cfg, "b")  # T5's relative position buckets are laid out for static lengths
    t = d = cfg.max_seq_len
    return jax.jit(seq2seq), (weights, ints(b, t), ints(b, t), ints(b, d))


def _prefill(model: nnx.Module, tokens: jax.Array, mask: jax.Array):
    """Left-padded prompts [b, P] into an empty cache of max_seq_len slots."""
    cfg = model.cfg
    cache = init_cache(cfg, cfg.n_layers, tokens.shape[0], cfg.max_seq_len)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # each prompt's own positions
    logits, cache = model(tokens, positions, mask, cache=cache)
    return logits[:, -1], cache.k, cache.v, cache.valid, cache.index, jnp.sum(mask, axis=1, dtype=jnp.int32)


def _decode(model: nnx.Module, token, positions, k, v, valid, index):
    """One token per row at ``positions`` -> its next-token logits and the cache after it."""
    logits, cache = model(token[:, None], positions[:, None], cache=KVCache(k, v, valid, index))
    return logits[:, 0], cache.k, cache.v, cache.valid, cache.index
