"""The training loop: the only place with side effects (data, I/O, logging, checkpoints).

config -> mesh -> abstract state (shapes + shardings) -> restore or init -> loop {
global batch -> jitted step (donated state) -> metrics } -> final eval, save, sample, plot.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import jax
from tqdm import tqdm

from models.config import ModelConfig
from models.generate import generate
from sharding.mesh import make_mesh
from train import metrics as perf
from train.checkpoint import Checkpoints, restore_target
from train.config import Config, ConfigError, save_config
from train.optimizer import schedule
from train.precision import resolve_compute_dtype
from train.preemption import Preemption
from train.state import count_params, init_state, make_state_spec
from train.step import make_train_step
from train.tasks import global_batch, make_task, vocab_needed
from train.tokenizer import load_tokenizer
from train.warm_start import warm_start
from train.writers import MetricsWriter, plot_losses

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


def check_fits_mesh(config: Config, model: ModelConfig, mesh: jax.sharding.Mesh) -> None:
    """Every sharded dimension must divide evenly over its mesh axes."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    train = config.train
    if train.batch_size % (dp * train.grad_accum):
        raise ConfigError(
            f"train.batch_size={train.batch_size} is not divisible by the data-parallel size {dp} "
            f"(mesh.data * mesh.fsdp) x train.grad_accum={train.grad_accum}; "
            f"use a multiple of {dp * train.grad_accum}"
        )
    checks = [
        ("model.vocab_size", model.vocab_size, t, "mesh.tensor"),
        ("model.n_heads", model.n_heads, t, "mesh.tensor"),
        ("model.n_kv_heads", model.kv_heads, t, "mesh.tensor"),
        ("model.d_ff", model.d_ff, t, "mesh.tensor"),
        ("model.d_model", model.d_model, f, "mesh.fsdp"),
    ]
    for name, size, axis_size, axis in checks:
        if size % axis_size:
            raise ConfigError(f"{name}={size} does not divide over {axis}={axis_size}; choose sizes that divide")


def run(config: Config) -> dict:
    """Trains as ``config`` says, resuming from ``run.dir`` when it holds checkpoints.

    Returns the last train and eval metrics. Raises ConfigError for user mistakes, before
    anything is written.
    """
    run_dir = pathlib.Path(config.run.dir)
    train_cfg = config.train
    is_main = jax.process_index() == 0

    # Everything that can be wrong with the input is checked before anything is written.
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg = resolve_model(config.model, vocab_needed(config, tokenizer))
    mesh = make_mesh(config.mesh)
    check_fits_mesh(config, model_cfg, mesh)
    task = make_task(config, model_cfg, tokenizer)
    batches = task.batches

    spec = make_state_spec(model_cfg, config.optimizer, train_cfg.steps, mesh)
    resolved = dataclasses.replace(config, model=model_cfg, data=task.data_config)

    def fresh_state():
        state = init_state(spec, model_cfg, config.seed)
        if not config.checkpoint.init_from:
            return state
        target = restore_target(spec.abstract.params, spec.shardings.params)
        return state.replace(params=warm_start(config.checkpoint.init_from, state.params, target, model_cfg))

    resuming = (run_dir / "checkpoints").exists()
    state = None if resuming else fresh_state()  # reads init_from before any directory is created
    checkpoints = Checkpoints(run_dir / "checkpoints", config.checkpoint)
    target = restore_target(spec.abstract, spec.shardings)
    restored = checkpoints.restore_latest(target, dataclasses.asdict(model_cfg)) if resuming else None
    if restored:
        state, start = restored.state, restored.step
        batches.set_state(restored.data_state)
        print(f"resumed from {checkpoints.directory / str(start)}", flush=True)
    else:
        state, start = fresh_state() if state is None else state, 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(resolved, run_dir / "config.yaml")
    writer = MetricsWriter(run_dir, start, enabled=is_main)

    n_params = count_params(state.params)
    flops_per_token = perf.flops_per_token(model_cfg, train_cfg.seq_len)
    peak, peak_source = perf.peak_flops(mesh.devices.flatten().tolist(), model_cfg.compute_dtype)
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    lr_at = schedule(config.optimizer, train_cfg.steps)
    if is_main:
        print(
            f"model: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, {model_cfg.compute_dtype} compute; "
            f"data: {task.summary}; "
            f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})",
            flush=True,
        )

    def record_eval(step: int) -> dict:
        result = {"step": step, **evaluate(state.params)}
        writer.write(result)
        return result

    compile_start = time.perf_counter()
    first = global_batch(task.batch(next(batches), start), mesh)
    train_step = make_train_step(spec, mesh, train_cfg.grad_accum)
    compiled_step = train_step.lower(state, first).compile()
    evaluate = task.evaluator(spec, mesh)
    compile_s = time.perf_counter() - compile_start

    can_sample = model_cfg.family == "decoder" and train_cfg.sample_tokens > 0
    preemption = Preemption()
    last_train, last_eval = {}, {}
    progress = tqdm(
        total=train_cfg.steps, initial=start, disable=not (is_main and train_cfg.progress_bar), dynamic_ncols=True
    )
    try:
        step, batch = start, first
        interval_start, interval_steps = time.perf_counter(), 0
        while step < train_cfg.steps:
            state, step_metrics = compiled_step(state, batch)
            step += 1
            interval_steps += 1
            progress.update(1)
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                step_metrics = jax.device_get(step_metrics)  # waits for the step
                elapsed = time.perf_counter() - interval_start
                tokens_per_sec = tokens_per_step * interval_steps / elapsed
                last_train = {
                    "step": step,
                    "loss": float(step_metrics["loss"]),
                    "lr": float(lr_at(step - 1)),
                    "grad_norm": float(step_metrics["grad_norm"]),
                    "tokens_per_sec": tokens_per_sec,
                    "step_ms": 1000 * elapsed / interval_steps,
                    "mfu": perf.mfu(tokens_per_sec, flops_per_token, peak),
                }
                if step == start + interval_steps:
                    last_train["compile_s"] = compile_s
                writer.write(last_train)
                progress.set_postfix(loss=f"{last_train['loss']:.3f}", mfu=f"{last_train['mfu']:.0%}")
                interval_start, interval_steps = time.perf_counter(), 0
            if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step < train_cfg.steps:
                last_eval = record_eval(step)
                progress.write(f"step {step}: {describe(last_eval)}")
                interval_start = time.perf_counter()
            if can_sample and train_cfg.sample_every and step % train_cfg.sample_every == 0 and step < train_cfg.steps:
                sample = sample_text(spec.graphdef, state.params, tokenizer, train_cfg, config.seed)
                if is_main:
                    progress.write(f"step {step} sample:\n{train_cfg.sample_prompt}{sample}")
                interval_start = time.perf_counter()
            preempted = preemption.reached(step)
            save_due = config.checkpoint.every and step % config.checkpoint.every == 0
            if save_due or step == train_cfg.steps or preempted:
                checkpoints.save(step, state, batches.get_state(), resolved.to_dict())
            if preempted:
                checkpoints.wait()
                print(f"preempted: saved checkpoint at step {step} to {checkpoints.directory / str(step)}", flush=True)
                return {"train": last_train, "eval": last_eval, "preempted_at": step}
            if step < train_cfg.steps:
                batch = global_batch(task.batch(next(batches), step), mesh)
        progress.close()
        if start < train_cfg.steps or not last_eval:
            last_eval = record_eval(train_cfg.steps)
            print(f"final: {describe(last_eval)}", flush=True)
        if can_sample:
            sample = sample_text(spec.graphdef, state.params, tokenizer, train_cfg, config.seed)
            if is_main:
                print("sample:\n" + train_cfg.sample_prompt + sample, flush=True)
        checkpoints.wait()
        if is_main:
            plot_losses(run_dir)
    finally:
        preemption.restore()
        progress.close()
        checkpoints.close()
        writer.close()
    return {"train": last_train, "eval": last_eval}


def describe(record: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")


def sample_text(graphdef, params, tokenizer, train_cfg, seed: int) -> str:
    """A continuation of ``train.sample_prompt`` (every process runs it; the arrays are global)."""
    prompt = tokenizer.encode(train_cfg.sample_prompt)
    return tokenizer.decode(generate(graphdef, params, prompt, train_cfg.sample_tokens, train_cfg.seq_len, seed=seed))
