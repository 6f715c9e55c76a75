"""Orbax checkpoints of the whole run: train state, data-iterator position and config.

Layout: ``run.dir/checkpoints/<step>/{state,data,config}``. Orbax writes each step into a
temporary directory and renames it on commit, so a crash mid-save leaves only older steps
visible. A committed step that fails to restore is moved aside to ``<step>.damaged`` (never
deleted) and the next older one is tried.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.config import CheckpointConfig, ConfigError
from train.state import TrainState


@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState
    data_state: dict
    config: dict


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def restore_target(abstract: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs that carry the new shardings: Orbax places each array directly."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def config_mismatch(saved_model: dict, current_model: dict) -> list[str]:
    """Model fields whose values differ, as 'name: saved -> current'."""
    return [
        f"{k}: {saved_model.get(k)!r} -> {v!r}"
        for k, v in current_model.items()
        if k in saved_model and saved_model[k] != v and k not in RESTORE_TOLERANT_FIELDS
    ]


# Fields that change how the model runs, not what its parameters are.
RESTORE_TOLERANT_FIELDS = frozenset({"compute_dtype", "scan_layers", "remat", "attention", "max_seq_len"})


class Checkpoints:
    """Saves and restores a run's checkpoints under ``directory``."""

    def __init__(self, directory: pathlib.Path, cfg: CheckpointConfig):
        self.directory = pathlib.Path(directory).absolute()
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep,
                keep_period=cfg.keep_every or None,
                enable_async_checkpointing=cfg.async_save,
                create=True,
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
        """Starts saving ``step`` (asynchronously unless configured otherwise)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def read_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def restore_latest(self, target: TrainState, model_config: dict) -> Restored | None:
        """The newest step that restores cleanly onto ``target`` (arrays placed with its shardings).

        Raises ConfigError when the newest readable checkpoint holds a different model.
        """
        for step in reversed(self.steps()):
            try:
                config = self.read_config(step)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, not fatal
                self._set_aside(step, e)
                continue
            mismatch = config_mismatch(config.get("model", {}), model_config)
            if mismatch:
                raise ConfigError(
                    f"checkpoint {self.directory / str(step)} holds a different model ({'; '.join(mismatch)}); "
                    "use the saved model settings or a new run.dir"
                )
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, e)
                continue
            return Restored(step, restored.state, restored.data, config)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        path = self.directory / str(step)
        aside = path.with_name(f"{step}.damaged")
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        _warn(f"checkpoint {path} is damaged ({reason}); moved it to {aside.name} and trying an older one")
        if path.exists() and not aside.exists():
            path.rename(aside)
        self.manager.reload()


def params_only(directory: pathlib.Path, target_params: Any) -> Any:
    """The parameters of the newest checkpoint under a run's ``checkpoints`` dir (for init_from)."""
    directory = pathlib.Path(directory).absolute()
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"checkpoint.init_from='{directory}' is not a run or checkpoints directory")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise ConfigError(f"checkpoint.init_from='{directory}' holds no complete checkpoint")
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    {"params": target_params},
                    restore_args=jax.tree.map(
                        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), {"params": target_params}
                    ),
                    partial_restore=True,
                )
            ),
        )
    return restored.state["params"]
