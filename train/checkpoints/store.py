"""Orbax checkpoints of the whole run: train state, data-iterator position, config, manifest.

Layout: ``run.dir/checkpoints/<step>/{state,data,config,manifest[,best]}``. Orbax writes each step
into ``<step>.orbax-checkpoint-tmp*`` and renames it on commit, so a process killed mid-save
leaves only older steps visible (the leftover temporary directory is removed on the next start).

Orbax does not notice a flipped byte in array data: it restores garbage. ``manifest`` holds a
fingerprint of every array (computed where the arrays live, independent of the mesh) and a
SHA-256 of the ``data`` and ``config`` items (train/checkpoints/manifest.py); a restore that does not match is damaged.
When the newest steps are damaged and an older one restores, the damaged ones are moved aside
to ``<step>.damaged`` (never deleted) with a ``warning:`` line each. When none restores, nothing
is moved and the run stops with an error.

Each array is written once, as whole chunks: Orbax's replica-parallel saving (its default off
GPU) splits a replicated shard into one slice per replica, and the slices of a small array fall
under OCDBT's 1 KiB inline limit, where they are kept in every B-tree version of the per-process
database and again in the merged one (a LoRA adapter state replicated 8 ways took 3.6x its bytes
on disk). Only slices of at least ``MIN_REPLICA_SLICE_BYTES`` are split off.

``best`` (train/checkpoints/best.py, when the run tracks a metric) records the best eval so far; with
``checkpoint.keep_best`` its step is kept besides the ``keep`` newest and ``best_params`` reads it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as preservation
from orbax.checkpoint._src.metadata import array_metadata_store

from train.checkpoints.manifest import (
    MANIFEST_FORMAT,
    ManifestRestore,
    ManifestSave,
    array_paths,
    json_digest,
    start_fingerprints,
    verify,
)
from train.config.sections import CheckpointConfig, ConfigError
from train.core.state import TrainState


class CheckpointError(ConfigError):
    """No checkpoint can be used; the message names the newest one, why, and what to do."""


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
DROPOUT_FIELDS = ("dropout", "attention_dropout", "lora_dropout")
RESTORE_TOLERANT_FIELDS = frozenset(
    {"compute_dtype", "scan_layers", "remat", "attention", "max_seq_len", *DROPOUT_FIELDS}
)


# Settings that shape the optimizer state (and so a checkpoint's train state), besides the model's.
STATE_SETTINGS = (
    "optimizer.name",
    "optimizer.momentum",
    "optimizer.factored",
    "optimizer.clip_norm",
    "train.freeze",
    "train.freeze_layers",
    "lora.rank",
    "lora.targets",
    "peft.method",
)


# Also those of quantisation while neither side stores int8 (none and qat hold the same float parameters).
QUANT_FIELDS = frozenset({"quant", "quant_skip", "quant_embeddings"})


def config_mismatch(saved_model: dict, current_model: dict) -> list[str]:
    """Model fields whose values differ, as 'name: saved -> current'."""
    tolerant = RESTORE_TOLERANT_FIELDS - ({"max_seq_len"} if current_model.get("position") == "learned" else set())
    if "int8" not in (saved_model.get("quant"), current_model.get("quant")):
        tolerant = tolerant | QUANT_FIELDS
    return [
        f"{k}: {saved_model.get(k)!r} -> {v!r}"
        for k, v in current_model.items()
        if k in saved_model and saved_model[k] != v and k not in tolerant
    ]


def _reason(error: Exception) -> str:
    """'Type: first line of the message', without TensorStore's multi-kilobyte spec dump."""
    while error.__cause__ is not None:  # Orbax wraps the TensorStore error that says what is wrong
        error = error.__cause__
    text = str(error).strip().split(" See full TensorStore details")[0]
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


# --- the run's checkpoints ------------------------------------------------------------------

MIN_REPLICA_SLICE_BYTES = 1 << 20


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The items' handlers: the train state's arrays through an ArrayHandler that leaves replicated
    shards under ``MIN_REPLICA_SLICE_BYTES`` per replica whole (else Orbax's default handlers)."""
    arrays = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        array_metadata_store=array_metadata_store.Store(),  # as Orbax's default: PRNG keys, shape checks
    )
    types = ocp.type_handlers.create_type_handler_registry(
        *[
            (t, ocp.type_handlers.get_type_handler(t))
            for t in ocp.type_handlers.supported_types()
            if t is not jax.Array
        ],
        (jax.Array, arrays),
    )
    state = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave, state)
    registry.add("state", ocp.args.PyTreeRestore, state)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore, ManifestSave, ManifestRestore):
        registry.add(None, args)
    return registry


@dataclasses.dataclass
class _KeepStep(preservation.PreservationPolicy):
    """Preserves the step ``step()`` names (None: none)."""

    step: Callable[[], int | None]

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        keep = self.step()
        return [info.step == keep for info in checkpoints]


class Checkpoints:
    """Saves and restores a run's checkpoints under ``directory``.

    ``best``: the best-eval record (train/checkpoints/best.py) saved with each step; the callback that tracks it
    keeps it current. With ``keep_best`` its step is preserved besides the ``keep`` newest.
    """

    def __init__(self, directory: pathlib.Path, cfg: CheckpointConfig, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.cfg = cfg
        self.best: dict | None = None
        self.base: dict | None = None  # a LoRA run's base reference (train/checkpoints/adapters.py), saved with each step
        policies = [preservation.LatestN(cfg.keep)]
        if cfg.keep_every:
            policies.append(preservation.EveryNSteps(cfg.keep_every))
        if cfg.keep_best:
            policies.append(_KeepStep(lambda: (self.best or {}).get("step")))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation.AnyPreservationPolicy(policies),
                enable_async_checkpointing=cfg.async_save,
                create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
            ),
            handler_registry=_handlers(),
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
        extra = {name: value for name, value in (("best", self.best), ("base", self.base)) if value}
        json_items = {"data": data_state, "config": config, **extra}
        items = {name: json_digest(value) for name, value in json_items.items()}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),  # PyTree handler: restores may be partial
                **{name: ocp.args.JsonSave(value) for name, value in json_items.items()},
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
        return self.read_json(step, "config")

    def read_json(self, step: int, item: str) -> dict:
        """A JSON item (config, data, best) saved with ``step``, checked against the manifest."""
        value = self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        verify(self.read_manifest(step), **{item: value})
        return value

    def read_best(self, step: int) -> dict | None:
        """The best-eval record saved with ``step``; None when the run tracked no metric then."""
        return self.read_json(step, "best") if (self.path(step) / "best").is_dir() else None

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
                    else "use the saved model settings, or start a new run.dir with "
                    f"checkpoint.init_from={self.directory.parent} to fine-tune it with these"
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

    def restore_latest(self, target: TrainState, model_config: dict, config: dict | None = None) -> Restored | None:
        """The newest step that restores intact onto ``target`` (arrays placed with its shardings).

        None when there are no checkpoints. Newer damaged steps are moved aside (``_set_aside``).
        ConfigError when the step lacks arrays ``target`` has: the run's optimizer, freezing or LoRA
        settings (``config``, the run's config as a dict) differ from those it was saved with.
        """
        wanted = array_paths(target)

        def restore(step: int, saved_config: dict):
            manifest = self.read_manifest(step)
            if manifest is not None and not wanted <= set(manifest["arrays"]):
                raise ConfigError(self._layout_error(step, saved_config, config or {}))
            args = ocp.args.Composite(state=partial_restore(target), data=ocp.args.JsonRestore())
            restored = self.manager.restore(step, args=args)
            verify(self.read_manifest(step), restored.state, data=restored.data)
            return restored

        found = self.newest_intact(restore, model_config)
        if found is None:
            return None
        step, restored, config, failed = found
        for bad, reason in failed:
            self._set_aside(bad, reason, step)
        self.best = self.read_best(step)  # the tracker carries on from it (train/run/callbacks.py BestEval)
        self.base = self.read_json(step, "base") if (self.path(step) / "base").is_dir() else None
        return Restored(step, restored.state, restored.data, config)

    def _layout_error(self, step: int, saved: dict, current: dict) -> str:
        """Which of the settings that shape the train state differ between ``saved`` and ``current``, and the fix."""

        def value(config: dict, key: str):
            section, name = key.split(".")
            return config.get(section, {}).get(name)

        changed = [
            f"{k}: {value(saved, k)!r} -> {value(current, k)!r}"
            for k in STATE_SETTINGS
            if value(saved, k) != value(current, k)
        ]
        return (
            f"checkpoint {self.path(step)} holds a train state of other settings "
            f"({'; '.join(changed) or 'another optimizer state layout'}); set them back to resume it, or start a "
            f"new run.dir with checkpoint.init_from={self.directory.parent} to continue from its parameters"
        )

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
    restore: Callable[[Checkpoints, int, Any], Any] | None = None,
) -> tuple[int, Any, dict]:
    """(step, params, config) of the newest intact checkpoint of another run; nothing is moved.

    ``directory`` is a run dir or its ``checkpoints`` dir; ``target_params(saved_config)`` gives
    the shapes and shardings to restore onto; ``restore(checkpoints, step, target)`` restores them
    (default ``restore_params``; train/checkpoints/sources.py also reads LoRA runs' adapter-only steps). Raises
    ConfigError when the saved model differs from ``model_config`` or no step restores.
    """
    directory = _checkpoints_dir(directory, what)
    checkpoints = Checkpoints(directory, CheckpointConfig(), read_only=True)

    restore = restore or restore_params

    try:
        found = checkpoints.newest_intact(
            lambda step, config: restore(checkpoints, step, target_params(config)), model_config or {}, f"{what}: "
        )
    finally:
        checkpoints.close()
    if found is None:
        raise ConfigError(f"{what}='{directory}' holds no complete checkpoint; point it at a run that saved one")
    step, params, config, failed = found
    for bad, reason in failed:
        _warn(f"checkpoint {checkpoints.path(bad)} is damaged ({reason}); using step {step}")
    return step, params, config


def best_params(
    directory: pathlib.Path,
    target_params: Callable[[dict], Any],
    what: str = "SOURCE",
    restore: Callable[[Checkpoints, int, Any], Any] | None = None,
) -> tuple[int, Any, dict]:
    """(step, params, config) of another run's best checkpoint (``checkpoint.keep_best``): the step the
    best-eval record of its newest intact step names, restored as ``newest_params`` does. ConfigError
    when there is none or it is damaged."""
    directory = _checkpoints_dir(directory, what)
    checkpoints = Checkpoints(directory, CheckpointConfig(), read_only=True)
    try:
        found = checkpoints.newest_intact(lambda step, _: checkpoints.read_best(step), {}, f"{what}: ")
        if found is None:
            raise ConfigError(f"{what}='{directory}' holds no complete checkpoint; point it at a run that saved one")
        newest, record, config, _ = found
        if record is None or not config.get("checkpoint", {}).get("keep_best"):
            raise ConfigError(
                f"{what}: step {newest} of '{directory}' was trained without checkpoint.keep_best, so it has no best "
                "checkpoint; leave out --best to use the newest step"
            )
        step, name = record["step"], f"the best checkpoint of '{directory}'"
        if step is None:
            raise ConfigError(f"{what}: {name} does not exist: no eval gave a finite {record['metric']}")
        if step not in checkpoints.steps():
            raise ConfigError(f"{what}: {name}, step {step}, is gone; leave out --best to use the newest step")
        try:
            config = checkpoints.read_config(step)
            params = (restore or restore_params)(checkpoints, step, target_params(config))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - unreadable means damaged
            raise CheckpointError(
                f"{what}: {name}, {checkpoints.path(step)}, is damaged ({_reason(e)}); leave out --best to use the "
                "newest intact step"
            ) from None
    finally:
        checkpoints.close()
    return step, params, config


def partial_restore(target: Any) -> ocp.args.PyTreeRestore:
    """Restores the arrays of ``target`` (ShapeDtypeStructs with shardings) and skips any others saved.

    Checkpoints written before the train state lost its unused ``rng`` still hold one.
    """
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    return ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)


def restore_params(checkpoints: Checkpoints, step: int, target_params: Any) -> Any:
    """The parameters saved with ``step``, placed as ``target_params`` (ShapeDtypeStructs with shardings)."""
    args = ocp.args.Composite(state=partial_restore({"params": target_params}))
    restored = checkpoints.manager.restore(step, args=args).state
    verify(checkpoints.read_manifest(step), restored)
    return restored["params"]


def params_only(directory: pathlib.Path, target_params: Any, model_config: dict | None = None) -> Any:
    """The parameters of another run's newest intact checkpoint (for ``checkpoint.init_from``)."""
    return newest_params(directory, lambda _: target_params, model_config)[1]
