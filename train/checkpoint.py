"""Orbax checkpoints of the whole run: train state, data-iterator position, config, manifest.

Layout: ``run.dir/checkpoints/<step>/{state,data,config,manifest}``. Orbax writes each step
into ``<step>.orbax-checkpoint-tmp*`` and renames it on commit, so a process killed mid-save
leaves only older steps visible (the leftover temporary directory is removed on the next start).

Orbax does not notice a flipped byte in array data: it restores garbage. ``manifest`` holds a
fingerprint of every array (computed where the arrays live, independent of the mesh) and a
SHA-256 of the ``data`` and ``config`` items; a restore that does not match is damaged.
When the newest steps are damaged and an older one restores, the damaged ones are moved aside
to ``<step>.damaged`` (never deleted) with a ``warning:`` line each. When none restores, nothing
is moved and the run stops with an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from train.config import CheckpointConfig, ConfigError
from train.state import TrainState

MANIFEST_FORMAT = 1


class CheckpointError(ConfigError):
    """No checkpoint can be used; the message names the newest one, why, and what to do."""


class DamagedCheckpoint(Exception):
    """A committed step whose files do not read back as they were written."""


@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState
    data_state: dict
    config: dict


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def restore_target(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry shardings, so Orbax places each array directly.

    ``abstract``: a tree of ShapeDtypeStructs (a TrainState, an nnx.State, a dict);
    ``shardings``: a matching tree, or one Sharding for every leaf (e.g. one CPU device).
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# Fields that change how the model runs, not what its parameters are (max_seq_len: unless
# positions are learned, when it is the position table's length).
RESTORE_TOLERANT_FIELDS = frozenset(
    {"compute_dtype", "scan_layers", "remat", "attention", "max_seq_len", "dropout", "attention_dropout"}
)


def config_mismatch(saved_model: dict, current_model: dict) -> list[str]:
    """Model fields whose values differ, as 'name: saved -> current'."""
    tolerant = RESTORE_TOLERANT_FIELDS - ({"max_seq_len"} if current_model.get("position") == "learned" else set())
    return [
        f"{k}: {saved_model.get(k)!r} -> {v!r}"
        for k, v in current_model.items()
        if k in saved_model and saved_model[k] != v and k not in tolerant
    ]


# --- integrity ------------------------------------------------------------------------------


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


def _reason(error: Exception) -> str:
    """'Type: first line of the message', without TensorStore's multi-kilobyte spec dump."""
    while error.__cause__ is not None:  # Orbax wraps the TensorStore error that says what is wrong
        error = error.__cause__
    text = str(error).strip().split(" See full TensorStore details")[0]
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


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


# --- the run's checkpoints ------------------------------------------------------------------


class Checkpoints:
    """Saves and restores a run's checkpoints under ``directory``."""

    def __init__(self, directory: pathlib.Path, cfg: CheckpointConfig, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                keep_period=cfg.keep_every or None,
                enable_async_checkpointing=cfg.async_save,
                create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
        """Starts saving ``step`` (asynchronously unless configured otherwise).

        ``state`` may be donated as soon as this returns. The files, and the manifest once the
        array fingerprints are computed, are written in the background and committed atomically.
        """
        if step in self.manager.all_steps():
            return
        arrays = start_fingerprints(state)
        items = {"data": json_digest(data_state), "config": json_digest(config)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),  # PyTree handler: restores may be partial
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
                manifest=ManifestSave(lambda: {"format": MANIFEST_FORMAT, "arrays": arrays(), "items": items}),
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def read_manifest(self, step: int) -> dict | None:
        if not (self.path(step) / "manifest").is_dir():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(manifest=ManifestRestore())).manifest

    def read_config(self, step: int) -> dict:
        """The run config saved with ``step``, checked against the manifest."""
        config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        verify(self.read_manifest(step), config=config)
        return config

    def newest_intact(
        self, restore: Callable[[int, dict], Any], model_config: dict, what: str = ""
    ) -> tuple[int, Any, dict, list[tuple[int, str]]] | None:
        """The newest step whose config reads and whose ``restore(step, config)`` succeeds and verifies.

        Returns (step, restored, config, [(newer damaged step, reason)]), or None when there are no
        steps. Raises ConfigError when the newest readable step holds a model other than
        ``model_config``, and CheckpointError when no step restores. ``what`` prefixes messages.
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                config = self.read_config(step)
            except Exception as e:  # noqa: BLE001 - unreadable means damaged; judged below
                failed.append((step, _reason(e)))
                continue
            mismatch = config_mismatch(config.get("model", {}), model_config)
            if mismatch:
                fix = (
                    "use the same model settings as that run"
                    if what
                    else "use the saved model settings or a new run.dir"
                )
                raise ConfigError(
                    f"{what}checkpoint {self.path(step)} holds a different model ({'; '.join(mismatch)}); {fix}"
                )
            try:
                restored = restore(step, config)
            except ConfigError:  # the caller's verdict on the saved config, not damage
                raise
            except Exception as e:  # noqa: BLE001
                failed.append((step, _reason(e)))
                continue
            return step, restored, config, failed
        if failed:
            step, reason = failed[0]
            raise CheckpointError(
                f"{what}no checkpoint under {self.directory} restores; the newest, {self.path(step)}, fails with "
                f"{reason}; fix the cause, or move the step directories away to start fresh"
            )
        return None

    def restore_latest(self, target: TrainState, model_config: dict) -> Restored | None:
        """The newest step that restores intact onto ``target`` (arrays placed with its shardings).

        None when there are no checkpoints. Newer damaged steps are moved aside (``_set_aside``).
        """

        def restore(step: int, _config: dict):
            args = ocp.args.Composite(state=_partial_restore(target), data=ocp.args.JsonRestore())
            restored = self.manager.restore(step, args=args)
            verify(self.read_manifest(step), restored.state, data=restored.data)
            return restored

        found = self.newest_intact(restore, model_config)
        if found is None:
            return None
        step, restored, config, failed = found
        for bad, reason in failed:
            self._set_aside(bad, reason, step)
        return Restored(step, restored.state, restored.data, config)

    def _set_aside(self, step: int, reason: str, used: int) -> None:
        path = self.path(step)
        aside = path.with_name(f"{step}.damaged")
        n = 1
        while aside.exists():
            aside, n = path.with_name(f"{step}.damaged.{n}"), n + 1
        if jax.process_index() == 0:
            path.rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"meshlm_set_aside_{step}")
        if jax.process_index() == 0:
            _warn(f"checkpoint {path} is damaged ({reason}); moved it to {aside.name} and resumed from step {used}")
        self.manager.reload()


# --- parameters of another run ---------------------------------------------------------------


def _checkpoints_dir(directory: pathlib.Path, what: str) -> pathlib.Path:
    directory = pathlib.Path(directory).absolute()
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"{what}='{directory}' is not a run or checkpoints directory; point it at a run.dir")
    return directory


def newest_params(
    directory: pathlib.Path,
    target_params: Callable[[dict], Any],
    model_config: dict | None = None,
    what: str = "checkpoint.init_from",
) -> tuple[int, Any, dict]:
    """(step, params, config) of the newest intact checkpoint of another run; nothing is moved.

    ``directory`` is a run dir or its ``checkpoints`` dir; ``target_params(saved_config)`` gives
    the shapes and shardings to restore onto. Raises ConfigError when the saved model differs
    from ``model_config`` or no step restores.
    """
    directory = _checkpoints_dir(directory, what)
    checkpoints = Checkpoints(directory, CheckpointConfig(), read_only=True)

    def restore(step: int, config: dict) -> Any:
        return _restore_params(checkpoints, step, target_params(config))

    try:
        found = checkpoints.newest_intact(restore, model_config or {}, f"{what}: ")
    finally:
        checkpoints.close()
    if found is None:
        raise ConfigError(f"{what}='{directory}' holds no complete checkpoint; point it at a run that saved one")
    step, params, config, failed = found
    for bad, reason in failed:
        _warn(f"checkpoint {checkpoints.path(bad)} is damaged ({reason}); using step {step}")
    return step, params, config


def _partial_restore(target: Any) -> ocp.args.PyTreeRestore:
    """Restores the arrays of ``target`` (ShapeDtypeStructs with shardings) and skips any others saved.

    Checkpoints written before the train state lost its unused ``rng`` still hold one.
    """
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    return ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)


def _restore_params(checkpoints: Checkpoints, step: int, target_params: Any) -> Any:
    args = ocp.args.Composite(state=_partial_restore({"params": target_params}))
    restored = checkpoints.manager.restore(step, args=args).state
    verify(checkpoints.read_manifest(step), restored)
    return restored["params"]


def params_only(directory: pathlib.Path, target_params: Any, model_config: dict | None = None) -> Any:
    """The parameters of another run's newest intact checkpoint (for ``checkpoint.init_from``)."""
    return newest_params(directory, lambda _: target_params, model_config)[1]
