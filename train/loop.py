"""The training loop: the only place with side effects (data, I/O, logging, checkpoints).

config -> mesh -> abstract state (shapes + shardings) -> restore or init -> loop {
global batch -> jitted step (donated state) -> metrics } -> final eval, save, sample, plot.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from models.config import ModelConfig
from models.generate import generate
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding
from train import metrics as perf
from train.checkpoint import Checkpoints, params_only, restore_target
from train.config import Config, ConfigError, save_config
from train.data import PackedTokens, eval_batches, read_documents, train_iterator
from train.objectives import raw_length, text_objective
from train.optimizer import schedule
from train.state import count_params, init_state, make_state_spec
from train.step import make_eval_step, make_train_step
from train.tokenizer import load_tokenizer
from train.writers import MetricsWriter, plot_losses

VOCAB_MULTIPLE = 128


def resolve_model(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """Fills ``vocab_size=0`` from the tokenizer (rounded up for efficient sharding)."""
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


class Preemption:
    """SIGTERM/SIGINT ask the loop to save and stop after the current step; a second one exits now."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            print(f"error: second signal {signum}; exiting now (committed checkpoints are intact)", file=sys.stderr, flush=True)
            sys.stdout.flush()
            import os

            os._exit(128 + signum)
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


EVAL_SEED_OFFSET = 2**31  # eval batches draw objective randomness apart from any train step


def make_objective(config: Config, model: ModelConfig, tokenizer):
    """``objective(local_windows, step) -> batch`` turning pipeline windows into the objective's batch."""
    t = config.train
    mask_id = getattr(tokenizer, "mask_id", None) or tokenizer.vocab_size
    if t.objective == "masked_lm" and mask_id >= model.vocab_size:
        raise ConfigError(
            f"masked_lm needs a [MASK] id below model.vocab_size={model.vocab_size}; "
            "set model.vocab_size=0 (padded) or use a tokenizer with a mask token"
        )
    transform = text_objective(
        t.objective, vocab_size=model.vocab_size, eos_id=tokenizer.eos_id, mask_id=mask_id, seed=config.seed,
        rate=t.mask_rate, noise_density=t.noise_density, mean_span=t.mean_span,
    )

    def objective(local: dict, step: int) -> dict:
        rows = np.concatenate([local["inputs"][:, :1], local["targets"]], axis=1)  # the raw windows
        return transform(rows, step, jax.process_index() * len(rows))

    return objective


def process_rows(batch: dict) -> dict:
    """This process's rows of a global host batch (rows ``[p*local, (p+1)*local)``)."""
    local = len(next(iter(batch.values()))) // jax.process_count()
    start = jax.process_index() * local
    return {k: v[start : start + local] for k, v in batch.items()}


def global_batch(local: dict, mesh) -> dict:
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def evaluate(eval_step, params, batches, mesh, bytes_per_token: float | None) -> dict:
    total, weight = 0.0, 0.0
    for batch in batches:
        s, w = eval_step(params, global_batch(batch, mesh))
        total, weight = total + float(s), weight + float(w)
    loss = total / weight
    if bytes_per_token is None:  # bits per byte only means something for next-token prediction
        return {"eval_loss": loss}
    return {"eval_loss": loss, "eval_bpb": loss / math.log(2) / bytes_per_token}


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
    train_docs, val_docs = read_documents(config.data)
    model_cfg = resolve_model(config.model, tokenizer.vocab_size)
    mesh = make_mesh(config.mesh)
    check_fits_mesh(config, model_cfg, mesh)
    train_tokens, val_tokens = PackedTokens(train_docs, tokenizer), PackedTokens(val_docs, tokenizer)
    window = raw_length(train_cfg.objective, train_cfg.seq_len, train_cfg.noise_density, train_cfg.mean_span) - 1
    batches = train_iterator(
        train_tokens, window, train_cfg.batch_size, config.seed, config.data.shuffle,
        jax.process_index(), jax.process_count(), config.data.num_workers,
    )
    objective = make_objective(config, model_cfg, tokenizer)
    eval_set = [
        objective(process_rows(b), EVAL_SEED_OFFSET + i)
        for i, b in enumerate(eval_batches(val_tokens, window, train_cfg.batch_size, train_cfg.eval_batches))
    ]
    bytes_per_token = val_tokens.num_bytes / val_tokens.num_tokens if train_cfg.objective == "causal_lm" else None

    spec = make_state_spec(model_cfg, config.optimizer, train_cfg.steps, mesh)
    resolved = dataclasses.replace(config, model=model_cfg)
    checkpoints = Checkpoints(run_dir / "checkpoints", config.checkpoint)
    restored = checkpoints.restore_latest(restore_target(spec.abstract, spec.shardings), dataclasses.asdict(model_cfg))
    if restored:
        state, start = restored.state, restored.step
        batches.set_state(restored.data_state)
        print(f"resumed from {checkpoints.directory / str(start)}", flush=True)
    else:
        state, start = init_state(spec, model_cfg, config.seed), 0
        if config.checkpoint.init_from:
            state = state.replace(params=params_only(pathlib.Path(config.checkpoint.init_from), restore_target(spec.abstract.params, spec.shardings.params)))
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
            f"data: {train_tokens.num_tokens:,} train / {val_tokens.num_tokens:,} val tokens; "
            f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source})",
            flush=True,
        )

    def record_eval(step: int) -> dict:
        result = {"step": step, **evaluate(eval_step, state.params, eval_set, mesh, bytes_per_token)}
        writer.write(result)
        return result

    compile_start = time.perf_counter()
    first = global_batch(objective(next(batches), start), mesh)
    train_step = make_train_step(spec, mesh, train_cfg.grad_accum)
    compiled_step = train_step.lower(state, first).compile()
    eval_step = make_eval_step(spec, mesh)
    compile_s = time.perf_counter() - compile_start

    preemption = Preemption()
    last_train, last_eval = {}, {}
    progress = tqdm(total=train_cfg.steps, initial=start, disable=not (is_main and train_cfg.progress_bar), dynamic_ncols=True)
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
            save_due = config.checkpoint.every and step % config.checkpoint.every == 0
            if save_due or step == train_cfg.steps or preemption.requested:
                checkpoints.save(step, state, batches.get_state(), resolved.to_dict())
            if preemption.requested:
                checkpoints.wait()
                print(f"preempted: saved checkpoint at step {step} to {checkpoints.directory / str(step)}", flush=True)
                return {"train": last_train, "eval": last_eval, "preempted_at": step}
            if step < train_cfg.steps:
                batch = global_batch(objective(next(batches), step), mesh)
        progress.close()
        if start < train_cfg.steps or not last_eval:
            last_eval = record_eval(train_cfg.steps)
            print(f"final: {describe(last_eval)}", flush=True)
        if model_cfg.family == "decoder" and train_cfg.sample_tokens > 0:
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
