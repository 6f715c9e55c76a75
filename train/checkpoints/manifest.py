"""A checkpoint's manifest: a fingerprint of every array and a SHA-256 of every JSON item.

Orbax does not notice a flipped byte in array data: it restores garbage. The manifest is written
inside the step's atomic commit; ``verify`` compares a restore against it (train/checkpoints/store.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

MANIFEST_FORMAT = 1


class DamagedCheckpoint(Exception):
    """A committed step whose files do not read back as they were written."""


def _path_name(path) -> str:
    """'params/stack/blocks/mlp/wi/kernel/value': the same for a TrainState and a {'params': ...} dict."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def array_paths(tree: Any) -> set[str]:
    """The names the manifest gives the array leaves of ``tree``."""
    return {_path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that mixes every input bit into every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 (one word per element; 64-bit dtypes add a trailing axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
    if bits == 64:
        return jax.lax.bitcast_convert_type(u, jnp.uint32)
    return u.astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32[]: the wrapping sum over elements of a hash of (bits, position).

    Integer sums wrap exactly in any order, so the value does not depend on the sharding; a
    change to any single element always changes it (the hash is a bijection of the bits).
    """
    u = _words(x)
    index = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(u.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= u.shape[axis]
    return jnp.sum(_fmix32(u + index * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(arrays: list) -> list:
    return [_fingerprint(x) for x in arrays]


def start_fingerprints(tree: Any) -> Callable[[], dict[str, str]]:
    """Starts fingerprinting every array leaf of ``tree`` on its devices; returns a function that
    waits for the result: path -> 'dtype[shape]:8 hex digits'."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in leaves]
    names = [(_path_name(path), f"{jnp.dtype(x.dtype).name}{list(x.shape)}") for (path, _), x in zip(leaves, arrays)]
    sums = _fingerprints(arrays)  # dispatched; the devices compute it before any later donation
    return lambda: {path: f"{kind}:{int(s):08x}" for (path, kind), s in zip(names, jax.device_get(sums))}


def fingerprints(tree: Any) -> dict[str, str]:
    """Path -> 'dtype[shape]:8 hex digits' for every array leaf of ``tree``."""
    return start_fingerprints(tree)()


def json_digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (what a JSON item reads back as)."""
    canonical = json.dumps(json.loads(json.dumps(obj)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def verify(manifest: dict | None, arrays: Any = None, **items: Any) -> None:
    """Raises DamagedCheckpoint when restored ``arrays`` or JSON ``items`` differ from ``manifest``.

    Only the arrays present in ``arrays`` are checked (partial restores); ``None`` skips the check
    (checkpoints written before manifests existed).
    """
    if manifest is None:
        return
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DamagedCheckpoint(f"manifest format {manifest.get('format')!r} is not {MANIFEST_FORMAT}")
    for name, value in items.items():
        if name in manifest["items"] and json_digest(value) != manifest["items"][name]:
            raise DamagedCheckpoint(f"item '{name}' does not match its SHA-256")
    if arrays is not None:
        saved = manifest["arrays"]
        for path, fingerprint in fingerprints(arrays).items():
            kind, _, value = fingerprint.rpartition(":")
            saved_kind, _, saved_value = saved.get(path, "").rpartition(":")
            if kind == saved_kind and value != saved_value:  # a cast on restore is not damage
                raise DamagedCheckpoint(f"array '{path}' does not match its fingerprint")


class ManifestHandler(ocp.handlers.JsonCheckpointHandler):
    """Writes the manifest as JSON inside the step's atomic commit, from a background thread.

    The array fingerprints are still being computed when ``save`` returns; waiting for them
    here keeps them out of the time a save blocks training.
    """

    async def async_save(self, directory, item=None, args=None):
        async def write() -> None:
            manifest = await asyncio.to_thread(args.item)
            if jax.process_index() == 0:
                (directory / "metadata").write_text(json.dumps(manifest))

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="meshlm_manifest")]


@ocp.args.register_with_handler(ManifestHandler, for_save=True)
@dataclasses.dataclass
class ManifestSave(ocp.args.CheckpointArgs):
    item: Callable[[], dict]  # returns the manifest; called in the background


@ocp.args.register_with_handler(ManifestHandler, for_restore=True)
@dataclasses.dataclass
class ManifestRestore(ocp.args.CheckpointArgs):
    pass
