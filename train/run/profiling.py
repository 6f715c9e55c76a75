"""``train.profile``: a jax.profiler trace of some steps, for TensorBoard's profile plugin or XProf.

The trace starts once ``start_step`` steps have finished and stops after ``steps`` more, when the
devices are done with them; it is written on the main process only, under ``run.dir/profile``
(``plugins/profile/<time>/*.xplane.pb``), and one line says where.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from train.run.callbacks import Callback

if TYPE_CHECKING:
    from train.run.loop import Loop


class Profile(Callback):
    """Traces steps ``start_step + 1 .. start_step + steps`` (1-based) of ``train.profile``."""

    def __init__(self) -> None:
        self.tracing = False

    def on_start(self, loop: Loop) -> None:
        self.cfg = loop.config.train.profile
        self.on_step_end(loop, loop.step)  # start_step 0, or a resume at start_step

    def on_step_end(self, loop: Loop, step: int) -> None:
        if not (self.cfg.steps and loop.is_main):
            return
        if step == self.cfg.start_step and not self.tracing:
            jax.block_until_ready(loop.state)  # the trace holds the traced steps, not the earlier ones
            jax.profiler.start_trace(str(loop.run_dir / "profile"))
            self.tracing = True
        elif step == self.cfg.start_step + self.cfg.steps and self.tracing:
            self._stop(loop)

    def on_end(self, loop: Loop, result: dict) -> None:
        if self.tracing:  # the run stopped inside the traced steps
            self._stop(loop)

    def _stop(self, loop: Loop) -> None:
        jax.block_until_ready(loop.state)
        jax.profiler.stop_trace()
        self.tracing = False
        first = self.cfg.start_step + 1
        print(
            f"profile: steps {first}-{loop.step} traced to {loop.run_dir / 'profile'} "
            f"(tensorboard --logdir {loop.run_dir / 'profile'}, or xprof)",
            flush=True,
        )
