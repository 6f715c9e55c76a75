"""Generation for decoders (GPT-2, Llama) and T5: prefill the prompt once, then one token per step.

The cached path runs the whole prompt through the model in one call, filling a fixed-size
``KVCache`` (``models.cache``), then feeds one token per step inside a jitted ``lax.while_loop``:
one compile per (batch, prompt bucket, new tokens). ``cache=False`` is the reference: every step
re-runs the model on the whole sequence so far.

Conventions:
- ``prompts``: int [B, P], or a list of B int sequences of different lengths. Decoder prompts
  are left-padded to a bucket (a power of two >= 8) and each row keeps the positions it has
  alone (0..len-1, rope or learned), with padding masked out of attention, so a row of a
  ragged batch gives the tokens it gives alone. A ``mask`` [B, P] (1 = token, 0 = padding,
  on either side) marks padding in an already padded array. T5: ``prompts`` are the encoder's
  inputs (right-padded); the decoder starts from ``start_id`` (default ``pad_id``; Hugging Face
  T5 and our span corruption use 0, its ``decoder_start_token_id``).
- Length: a decoder's prompt plus its new tokens, and T5's prompt and its new tokens each, must fit
  the model's ``max_seq_len`` positions (any position scheme); ValueError otherwise.
- ``eos_id``: the stop ids, one int or several (Hugging Face's ``eos_token_id`` list, a chat
  template's end-of-turn token beside the tokenizer's eos): once a row emits any of them, the rest
  of the row is ``pad_id``; the loop stops when every row is done. None: no early end.
- Sampling: ``temperature=0`` is greedy (argmax, the first of ties); otherwise logits are divided
  by the temperature, cut to the ``top_k`` largest (0, or more than the vocabulary: all, as Hugging
  Face clamps it) and to the smallest set whose probability reaches ``top_p`` (nucleus), in that
  order as Hugging Face does. Step i draws with ``fold_in(key(seed), i)`` on both paths.
- Sharding: called inside ``sharding.rules.activation_context(mesh)`` (with a model whose
  parameters live on that mesh) the cache and activations take their logical shardings (batch over
  data/fsdp, kv heads over tensor); the returned tokens are replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.cache import KVCache, init_cache
from models.config import ModelConfig
from models.layers import constrain
from models.transformer import split_layers

NO_EOS = -1


class Decoding(NamedTuple):
    """A batch being decoded: the cache, the logits of each row's next token [B, vocab] float32,
    the position that token will take [B], which rows emitted eos [B] and how many steps ran []."""

    cache: KVCache
    logits: jax.Array
    positions: jax.Array
    done: jax.Array
    step: jax.Array


class Sampling(NamedTuple):
    """Traced sampling settings (changing them does not recompile; the number of stop ids does):
    temperature, top_p, the stop ids [K], pad."""

    temperature: jax.Array
    top_p: jax.Array
    eos: jax.Array
    pad: jax.Array


def _stops(token: jax.Array, eos: jax.Array) -> jax.Array:
    """tokens [B], stop ids [K] -> bool [B]: the token is one of them."""
    return jnp.any(token[:, None] == eos[None, :], axis=1)


def sample(logits: jax.Array, key: jax.Array, s: Sampling, *, top_k: int, greedy: bool, nucleus: bool) -> jax.Array:
    """logits [B, vocab] float32 -> tokens [B] int32 (see the module docstring)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if top_k:
        cutoff = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if nucleus:
        ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        cutoff = jnp.min(jnp.where(before < s.top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _last_slots(mask: jax.Array) -> jax.Array:
    """mask [B, P] -> the slot of each row's last token [B]."""
    return mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)


def _prompt_positions(mask: jax.Array) -> jax.Array:
    """Each token's position among its row's tokens (padding: 0), as Hugging Face derives them."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "length"))
def _prefill(graphdef, state, prompts, mask, start, length: int) -> Decoding:
    """Runs the prompts [B, P] (T5: encodes them and feeds the start token) into a cache of ``length`` slots."""
    model = nnx.merge(graphdef, state)
    cfg, b = model.cfg, prompts.shape[0]
    if cfg.family == "encoder_decoder":
        cache = model.init_cache(model.encode(prompts, mask), mask, length)
        logits, cache = model.decode(jnp.full((b, 1), start, jnp.int32), cache=cache)
        logits, positions = logits[:, 0], jnp.ones((b,), jnp.int32)
    else:
        cache = init_cache(cfg, cfg.n_layers, b, length)
        logits, cache = model(prompts, _prompt_positions(mask), mask, cache=cache)
        logits = logits[jnp.arange(b), _last_slots(mask)]
        positions = jnp.sum(mask, axis=1, dtype=jnp.int32)
    return Decoding(cache, logits, positions, jnp.zeros((b,), bool), jnp.zeros((), jnp.int32))


def _feed(model, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per row [B] at ``positions`` [B] -> its next-token logits [B, vocab] and the cache."""
    if model.cfg.family == "encoder_decoder":
        logits, cache = model.decode(tokens[:, None], cache=cache)
    else:
        logits, cache = model(tokens[:, None], positions[:, None], cache=cache)
    return logits[:, 0], cache


@functools.partial(
    jax.jit, static_argnames=("graphdef", "steps", "top_k", "greedy", "nucleus"), donate_argnames=("decoding",)
)
def _decode(graphdef, state, decoding: Decoding, key, s: Sampling, *, steps: int, top_k: int, greedy: bool, nucleus):
    """``steps`` tokens per row [B, steps] (pad after eos) and the decoding state after them."""
    model = split_layers(nnx.merge(graphdef, state))
    out = jnp.full((decoding.logits.shape[0], steps), s.pad, jnp.int32)

    def body(carry):
        i, d, out = carry
        token = sample(d.logits, jax.random.fold_in(key, d.step), s, top_k=top_k, greedy=greedy, nucleus=nucleus)
        token = jnp.where(d.done, s.pad, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        logits, cache = _feed(model, token, d.positions, d.cache)
        return i + 1, Decoding(cache, logits, d.positions + 1, d.done | _stops(token, s.eos), d.step + 1), out

    def more(carry):
        i, d, _ = carry
        return (i < steps) & ~jnp.all(d.done)

    _, decoding, out = jax.lax.while_loop(more, body, (jnp.zeros((), jnp.int32), decoding, out))
    return constrain(out, (None, None)), decoding


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "top_k", "greedy", "nucleus"))
def _recompute(graphdef, state, prompts, mask, start, key, s: Sampling, *, steps, top_k, greedy, nucleus):
    """The reference path: every step runs the model over the whole sequence so far -> [B, steps]."""
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    rows = jnp.arange(b)
    if model.cfg.family == "encoder_decoder":
        encoded = model.encode(prompts, mask)
        tokens = jnp.full((b, steps + 1), s.pad, jnp.int32).at[:, 0].set(start)

        def next_logits(tokens, i):
            return model.decode(tokens, encoded, mask)[:, i], i + 1  # the logits at i, the slot for the token

    else:
        tokens = jnp.concatenate([prompts, jnp.full((b, steps), s.pad, jnp.int32)], axis=1)
        valid = jnp.concatenate([mask, jnp.ones((b, steps), mask.dtype)], axis=1)
        lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
        positions = jnp.concatenate([_prompt_positions(mask), lengths[:, None] + jnp.arange(steps)], axis=1)
        last = _last_slots(mask)

        def next_logits(tokens, i):
            at = jnp.where(i == 0, last, p + i - 1)
            return model(tokens, positions, valid)[rows, at], p + i

    def body(carry):
        i, tokens, done, out = carry
        logits, slot = next_logits(tokens, i)
        token = sample(logits, jax.random.fold_in(key, i), s, top_k=top_k, greedy=greedy, nucleus=nucleus)
        token = jnp.where(done, s.pad, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, slot))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, tokens, done | _stops(token, s.eos), out

    def more(carry):
        return (carry[0] < steps) & ~jnp.all(carry[2])

    out = jnp.full((b, steps), s.pad, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), tokens, jnp.zeros((b,), bool), out)
    return constrain(jax.lax.while_loop(more, body, carry)[3], (None, None))


def bucket(n: int) -> int:
    """The padded prompt length: the next power of two, at least 8 (so prompts share compiles)."""
    return max(8, 1 << (max(n, 1) - 1).bit_length())


def pad_prompts(
    prompts: np.ndarray | Sequence[Sequence[int]], mask: np.ndarray | None, pad_id: int, *, left: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (ragged list or [B, P] with an optional ``mask``) -> int32 tokens and mask [B, bucket]."""
    if mask is None:
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
        masks = [np.ones(len(r), np.int32) for r in rows]
    else:
        rows, masks = list(np.asarray(prompts)), list(np.asarray(mask).astype(np.int32))
    if not rows:
        raise ValueError("generation needs at least one prompt")
    width = bucket(max(len(r) for r in rows))
    tokens = np.full((len(rows), width), pad_id, np.int32)
    padding = np.zeros((len(rows), width), np.int32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        where = slice(width - len(r), width) if left else slice(0, len(r))
        tokens[i, where], padding[i, where] = r, m
    return tokens, padding


def _check_positions(cfg: ModelConfig, longest: int, new: int) -> None:
    """ValueError unless the longest prompt and the new tokens fit the model's ``max_seq_len`` positions:
    a decoder's prompt plus its new tokens; T5's encoder prompt, and its decoder's new tokens, each.
    Every position embedding is held to it (learned tables end there; rope and T5's buckets would run
    on past what the model was trained on), as ``python -m train.generate`` does."""
    n = cfg.max_seq_len
    if cfg.family == "decoder" and longest + new > n:
        fix = f"generate at most {n - longest} tokens" if longest < n else "shorten the prompt"
        raise ValueError(f"a prompt of {longest} tokens plus {new} new ones exceeds the model's {n} positions; {fix}")
    if cfg.family == "encoder_decoder" and longest > n:
        raise ValueError(f"a prompt of {longest} tokens exceeds the encoder's {n} positions; shorten it")
    if cfg.family == "encoder_decoder" and new > n:
        raise ValueError(f"{new} new tokens exceed the decoder's {n} positions; generate at most {n}")


class _Setup(NamedTuple):
    graphdef: nnx.GraphDef
    state: nnx.State
    tokens: np.ndarray
    mask: np.ndarray
    start: int
    sampling: Sampling
    static: dict
    decoder: bool


def _stop_ids(eos_id: int | Sequence[int] | None) -> list[int]:
    """``eos_id`` as a list of stop ids (``[NO_EOS]`` for None, which no token matches)."""
    if eos_id is None:
        return [NO_EOS]
    ids = [int(eos_id)] if isinstance(eos_id, int | np.integer) else [int(i) for i in eos_id]
    return ids or [NO_EOS]


def _setup(model, prompts, max_new_tokens, mask, temperature, top_k, top_p, eos_id, pad_id, start_id) -> _Setup:
    cfg = model.cfg
    if cfg.family not in ("decoder", "encoder_decoder") or cfg.head != "lm":
        raise ValueError(f"model.family='{cfg.family}' cannot generate; use a decoder (GPT-2, Llama) or T5")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError("sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
    tokens, mask = pad_prompts(prompts, mask, pad_id, left=cfg.family == "decoder")
    if cfg.family == "decoder" and int(mask.sum(axis=1).min()) == 0:
        raise ValueError("every decoder prompt needs at least one token")
    _check_positions(cfg, int(mask.sum(axis=1).max()), max_new_tokens)
    graphdef, state = nnx.split(model)
    s = Sampling(
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        jnp.asarray(_stop_ids(eos_id), jnp.int32),
        jnp.int32(pad_id),
    )
    static = {"top_k": min(int(top_k), cfg.vocab_size), "greedy": temperature == 0, "nucleus": top_p < 1.0}
    start = pad_id if start_id is None else start_id
    return _Setup(graphdef, state, tokens, mask, start, s, static, cfg.family == "decoder")


def generate(
    model: nnx.Module,
    prompts: np.ndarray | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    cache: bool = True,
    mask: np.ndarray | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    start_id: int | None = None,
) -> np.ndarray:
    """New tokens int32 [B, max_new_tokens] continuing each prompt (T5: the decoder's tokens after
    the start token); see the module docstring for prompts, padding, eos and sampling."""
    run = _setup(model, prompts, max_new_tokens, mask, temperature, top_k, top_p, eos_id, pad_id, start_id)
    key = jax.random.key(seed)
    if not cache:
        args = (run.graphdef, run.state, run.tokens, run.mask, run.start, key, run.sampling)
        return np.asarray(_recompute(*args, steps=max_new_tokens, **run.static))
    decoding = _prefill(run.graphdef, run.state, run.tokens, run.mask, run.start, _cache_length(run, max_new_tokens))
    out, _ = _decode(run.graphdef, run.state, decoding, key, run.sampling, steps=max_new_tokens, **run.static)
    return np.asarray(out)


def stream(
    model: nnx.Module,
    prompts: np.ndarray | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    chunk: int = 16,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    mask: np.ndarray | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    start_id: int | None = None,
) -> Iterator[np.ndarray]:
    """``generate`` (cached) in pieces: yields int32 [B, <= chunk] as soon as each ``chunk`` tokens
    are decoded, the cache kept between pieces; stops early once every row emitted eos.

    The tokens are those ``generate`` gives for the same arguments. Single process only.
    """
    run = _setup(model, prompts, max_new_tokens, mask, temperature, top_k, top_p, eos_id, pad_id, start_id)
    key = jax.random.key(seed)
    pieces = -(-max_new_tokens // chunk)
    decoding = _prefill(run.graphdef, run.state, run.tokens, run.mask, run.start, _cache_length(run, pieces * chunk))
    for i in range(pieces):
        out, decoding = _decode(run.graphdef, run.state, decoding, key, run.sampling, steps=chunk, **run.static)
        yield np.asarray(out)[:, : max_new_tokens - i * chunk]
        if bool(np.asarray(decoding.done).all()):
            return


def _cache_length(run: _Setup, steps: int) -> int:
    """Slots for the prompt (decoders) or start token (T5) and every fed token."""
    return (run.tokens.shape[1] if run.decoder else 1) + steps
