"""The training loop: setup, a short loop over the steps, and callbacks for everything else.

config -> tokenizer -> model config -> mesh -> task -> abstract state (shapes + shardings) ->
restore or init -> loop { global batch -> jitted step (donated state) -> callbacks (metrics,
eval, samples, saves, preemption, the caller's) } -> final eval, save, callbacks' on_end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import jax
from flax import nnx

from models.config import ModelConfig
from sharding.fit import check_fits
from sharding.mesh import make_mesh
from train.checkpoints import adapters
from train.checkpoints.sources import warm_start
from train.checkpoints.store import Checkpoints, Restored, restore_target
from train.checkpoints.warm_start import load_adapters
from train.compress.distill_loss import TeacherSpec
from train.compress.teacher import load_teacher
from train.config.sections import Config, ConfigError, save_config
from train.config.validate import fit_sizes
from train.core import flops
from train.core.freeze import Freeze
from train.core.optimizer import schedule
from train.core.precision import resolve_compute_dtype
from train.core.state import StateSpec, TrainState, count_params, init_state, make_state_spec
from train.core.step import make_train_step
from train.data.tasks import ExampleTask, StreamTask, global_batch, make_task, vocab_needed
from train.data.tokenizer import Tokenizer, load_tokenizer
from train.evaluation.evaluators import make_evaluator
from train.run.callbacks import Callback, builtin, describe
from train.run.profiling import Profile
from train.run.writers import MetricsWriter

VOCAB_MULTIPLE = 128


def resolve_model(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """Fills ``vocab_size=0`` from the tokenizer (rounded up for efficient sharding) and
    ``compute_dtype='auto'`` with the dtype fast on this hardware (``train.precision``)."""
    cfg = resolve_compute_dtype(cfg)
    if cfg.vocab_size == 0:
        return dataclasses.replace(cfg, vocab_size=math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
            "set model.vocab_size=0 to take the tokenizer's size"
        )
    return cfg


# --- setup: everything that can be wrong with the input is checked before anything is written


@dataclasses.dataclass(frozen=True)
class Setup:
    config: Config  # resolved: the model's vocab_size and the data's labels filled in
    tokenizer: Tokenizer
    mesh: jax.sharding.Mesh
    task: StreamTask | ExampleTask
    spec: StateSpec
    teacher: TeacherSpec | None = None  # distill.teacher: its step-time spec (train/compress/teacher.py) ...
    teacher_params: nnx.State | None = None  # ... and its placed, frozen parameters


def prepare(config: Config) -> Setup:
    """Tokenizer -> model config -> mesh -> task (reads the data) -> state spec -> teacher (if any)."""
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg = resolve_model(config.model, vocab_needed(config, tokenizer))
    mesh = make_mesh(config.mesh)
    check_fits(model_cfg, mesh.shape, config.mesh.logical_rules, **fit_sizes(config, jax.process_count()))
    task = make_task(config, model_cfg, tokenizer)
    config = epoch_steps(config, task.train_examples)
    freeze = Freeze(config.train.freeze, config.train.freeze_layers, model_cfg.peft_method != "none")
    spec = make_state_spec(
        model_cfg, config.optimizer, config.train.steps, mesh, config.mesh.logical_rules, freeze, config.prune
    )
    resolved = dataclasses.replace(config, model=model_cfg, data=task.data_config)
    return Setup(resolved, tokenizer, mesh, task, spec, *load_teacher(resolved, mesh, tokenizer))


def epoch_steps(config: Config, train_examples: int) -> Config:
    """``config`` with ``train.steps = ceil(train.epochs * train_examples / train.batch_size)`` when
    ``train.epochs`` is set (it wins over train.steps), else as it is."""
    t = config.train
    if not t.epochs:
        return config
    steps = max(math.ceil(t.epochs * train_examples / t.batch_size), 1)
    return dataclasses.replace(config, train=dataclasses.replace(t, steps=steps))


def fresh_state(setup: Setup) -> TrainState:
    """Initial parameters (or ``checkpoint.init_from``'s) and a fresh optimizer state."""
    config, spec = setup.config, setup.spec
    state = init_state(spec, config.model, config.seed)
    if config.train.prior_bias and getattr(setup.task, "log_prior", None) is not None:
        bias = state.params["classifier"]["bias"]
        bias.value = jax.device_put(setup.task.log_prior, bias.value.sharding)
    target = restore_target(spec.abstract.params, spec.shardings.params)
    params = state.params
    if config.checkpoint.init_from:
        init_layers = config.checkpoint.init_layers
        params = warm_start(config.checkpoint.init_from, params, target, config.model, init_layers)
    if config.lora.init_from:
        params = load_adapters(config.lora.init_from, params, target, config.model)
    return state.replace(params=params)


def initial_state(setup: Setup, run_dir: pathlib.Path) -> tuple[TrainState, int, Checkpoints]:
    """(state, step, checkpoints): the newest intact checkpoint in ``run_dir``, or a fresh state at 0.

    A LoRA run's checkpoints hold its adapters and a reference to its base (train/checkpoints/adapters.py).
    """
    config, spec = setup.config, setup.spec
    resuming = (run_dir / "checkpoints").exists()
    state = None if resuming else fresh_state(setup)  # reads init_from before any directory is created
    checkpoints = Checkpoints(run_dir / "checkpoints", config.checkpoint)
    try:
        target = adapters.saved_state(restore_target(spec.abstract, spec.shardings), spec)
        model = dataclasses.asdict(config.model)
        restored = checkpoints.restore_latest(target, model, config.to_dict()) if resuming else None
        if restored and spec.adapter_only:
            where = f"the checkpoint {checkpoints.path(restored.step)}"
            restored.state = adapters.resumed(restored.state, checkpoints.base, config.model, spec, where, warm_start)
    except BaseException:
        checkpoints.close()
        raise
    if not restored:
        state = fresh_state(setup) if state is None else state
        if spec.adapter_only:
            checkpoints.base = adapters.reference(
                config.checkpoint.init_from, config.seed, state.params, spec.frozen, config.checkpoint.init_layers
            )
        return state, 0, checkpoints
    setup.task.batches.set_state(restored.data_state)
    print(f"resumed from {checkpoints.path(restored.step)}", flush=True)
    warn_if_schedule_changed(restored, setup.config)
    return restored.state, restored.step, checkpoints


def warn_if_schedule_changed(restored: Restored, config: Config) -> None:
    """A run continued with another ``train.steps`` rebuilds its learning-rate schedule: say so."""
    saved, steps = restored.config.get("train", {}).get("steps"), config.train.steps
    if saved is None or saved == steps or restored.step >= steps:
        return
    old = float(schedule(config.optimizer, saved)(restored.step))
    new = float(schedule(config.optimizer, steps)(restored.step))
    print(
        f"warning: train.steps={steps} differs from the {saved} steps of the run that saved step {restored.step}; "
        f"the learning-rate schedule is rebuilt for {steps} steps (lr at step {restored.step}: {old:.3g} -> {new:.3g})",
        file=sys.stderr,
        flush=True,
    )


def report(setup: Setup, params, peak: float, peak_source: str) -> None:
    model, mesh = setup.config.model, setup.mesh
    print(
        f"model: {count_params(params) / 1e6:.2f}M params ({setup.spec.trainable_params / 1e6:.2f}M trainable), "
        f"mesh {dict(mesh.shape)}, {model.compute_dtype} compute; "
        f"data: {setup.task.summary}; "
        f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})",
        flush=True,
    )


# --- the loop -------------------------------------------------------------------------------


@dataclasses.dataclass
class Loop:
    """The run as callbacks see it. ``step`` counts finished steps; ``state`` is the state after it."""

    setup: Setup
    run_dir: pathlib.Path
    checkpoints: Checkpoints
    writer: MetricsWriter
    evaluator: Callable[[object], dict]
    state: TrainState
    step: int
    compile_s: float
    callbacks: list[Callback]
    resources: contextlib.ExitStack  # closed when run() returns or raises; callbacks may add to it
    is_main: bool = dataclasses.field(default_factory=lambda: jax.process_index() == 0)
    step_metrics: dict | None = None  # the last step's {'loss', 'grad_norm'}, still on the devices
    last_train: dict = dataclasses.field(default_factory=dict)
    last_eval: dict = dataclasses.field(default_factory=dict)
    stop_reason: str | None = None
    preempted: bool = False
    off_clock_s: float = 0.0  # seconds spent on work that is not training (eval, samples)
    saved_step: int | None = None

    config = property(lambda self: self.setup.config)
    mesh = property(lambda self: self.setup.mesh)
    spec = property(lambda self: self.setup.spec)
    tokenizer = property(lambda self: self.setup.tokenizer)

    def request_stop(self, reason: str, *, preempted: bool = False) -> None:
        """Ends the run after the current step with a checkpoint at it. ``preempted``: exit quickly,
        without the final eval, sample and plot."""
        self.stop_reason = self.stop_reason or reason
        self.preempted = self.preempted or preempted

    def emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    @contextlib.contextmanager
    def off_clock(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.off_clock_s += time.perf_counter() - start

    def log(self, record: dict) -> None:
        self.last_train = record
        self.writer.write(record)
        self.emit("on_log", record)

    def evaluate(self) -> dict:
        """Scores the current parameters on the held-out data; writes and returns the eval record."""
        with self.off_clock():
            self.last_eval = {"step": self.step, **self.evaluator(self.state.params)}
        self.writer.write(self.last_eval)
        self.emit("on_eval", self.last_eval)
        return self.last_eval

    def save(self) -> None:
        """Starts saving the current step (state, data position, config) unless it is saved."""
        if self.saved_step != self.step:
            data_state = self.setup.task.batches.get_state()
            state = adapters.saved_state(self.state, self.spec)  # a LoRA run's: without its base
            self.checkpoints.save(self.step, state, data_state, self.config.to_dict())
            self.saved_step = self.step

    def next_batch(self) -> dict:
        return global_batch(self.setup.task.batch(next(self.setup.task.batches), self.step), self.mesh)


def run_steps(loop: Loop, step_fn: Callable, batch: dict) -> dict:
    """Steps until ``train.steps`` or a stop request, calling the callbacks after every step."""
    steps = loop.config.train.steps
    loop.emit("on_start")
    while loop.step < steps and loop.stop_reason is None:
        loop.state, loop.step_metrics = step_fn(loop.state, batch)
        loop.step += 1
        loop.emit("on_step_end", loop.step)
        if loop.step < steps and loop.stop_reason is None:
            batch = loop.next_batch()  # after the callbacks: a save holds the data position after this step
    return finish(loop)


def finish(loop: Loop) -> dict:
    """Makes the final eval unless one was just made (or the run was preempted), saves the step the
    run ends on (with what the eval told the callbacks, e.g. the best-eval record), waits for the
    checkpoint and tells the callbacks."""
    if not loop.preempted and loop.last_eval.get("step") != loop.step:
        print(f"final: {describe(loop.evaluate())}", flush=True)
    loop.save()
    loop.checkpoints.wait()
    if loop.preempted:
        print(f"preempted: saved checkpoint at step {loop.step} to {loop.checkpoints.path(loop.step)}", flush=True)
    elif loop.stop_reason:
        print(f"stopped at step {loop.step}: {loop.stop_reason}", flush=True)
    result = {"train": loop.last_train, "eval": loop.last_eval, "stopped": loop.stop_reason}
    if loop.preempted:
        result["preempted_at"] = loop.step
    loop.emit("on_end", result)
    return result


def run(config: Config, callbacks: Sequence[Callback] = ()) -> dict:
    """Trains as ``config`` says, resuming from ``run.dir`` when it holds checkpoints.

    ``callbacks`` run after the built-in ones. Returns ``{'train': last train record, 'eval': last
    eval record, 'stopped': reason or None[, 'preempted_at': step]}``. Raises ConfigError for user
    mistakes, before anything is written.
    """
    setup = prepare(config)
    run_dir = pathlib.Path(config.run.dir)
    state, start, checkpoints = initial_state(setup, run_dir)
    with contextlib.ExitStack() as resources:
        resources.callback(checkpoints.close)
        is_main = jax.process_index() == 0
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(setup.config, run_dir / "config.yaml")
        writer = MetricsWriter(run_dir, start, is_main, setup.config.run.trackers, setup.config.to_dict())
        resources.enter_context(contextlib.closing(writer))
        peak, peak_source = flops.peak_flops(setup.mesh.devices.flatten().tolist(), setup.config.model.compute_dtype)
        report(setup, state.params, peak, peak_source)

        compile_start = time.perf_counter()
        first = global_batch(setup.task.batch(next(setup.task.batches), start), setup.mesh)
        t = setup.config.train
        train_step = make_train_step(
            setup.spec, setup.mesh, t.grad_accum, setup.config.seed, setup.teacher, t.adversarial
        )
        teacher = () if setup.teacher is None else (setup.teacher_params,)  # passed to every step, never donated
        compiled = train_step.lower(state, first, *teacher).compile()
        evaluator = make_evaluator(setup.task, setup.spec, setup.mesh)
        compile_s = time.perf_counter() - compile_start

        loop = Loop(
            setup, run_dir, checkpoints, writer, evaluator, state, start, compile_s,
            callbacks=[*builtin(peak), Profile(), *callbacks], resources=resources, is_main=is_main,
        )  # fmt: skip
        return run_steps(loop, lambda state, batch: compiled(state, batch, *teacher), first)
