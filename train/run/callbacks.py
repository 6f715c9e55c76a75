"""What happens around the train steps, one concern per callback: metrics, eval, samples, saves, preemption.

The loop (train/run/loop.py) calls every callback's hooks in order, the built-in ones (``builtin``)
first. A new concern (early stopping, tuner reports, schedules) is a new ``Callback`` passed to
``train.run.loop.run(config, callbacks)``, never a new branch in the loop.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import jax
from flax import nnx
from tqdm import tqdm

from models.generate import generate
from sharding.rules import activation_context
from train.checkpoints.best import Best, tracked
from train.core import flops
from train.core.optimizer import schedule
from train.core.state import count_params
from train.run.preemption import Preemption
from train.run.writers import plot_losses

if TYPE_CHECKING:
    from train.run.loop import Loop


class Callback:
    """Base class; every hook is a no-op unless overridden."""

    def on_start(self, loop: Loop) -> None:
        """After setup / restore, before the first step."""

    def on_step_end(self, loop: Loop, step: int) -> None:
        """After each finished step (``loop.step == step``)."""

    def on_log(self, loop: Loop, record: dict) -> None:
        """A train record was written (``step, loss, lr, grad_norm, tokens_per_sec, step_ms, mfu``, and any
        further metrics of the step, e.g. distillation's ``hard_loss, distill_loss``)."""

    def on_eval(self, loop: Loop, record: dict) -> None:
        """An eval record was written (``step, eval_loss, ...``)."""

    def on_end(self, loop: Loop, result: dict) -> None:
        """The run finished, stopped or was preempted; its last checkpoint is committed."""


def describe(record: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")


class MetricsLog(Callback):
    """Every ``train.log_every`` steps (and the last): fetches the step's metrics, writes a train
    record with throughput and MFU, and advances the progress bar by the steps it covers.

    Time spent off the clock (eval, samples) does not count against throughput.
    """

    def __init__(self, peak_flops: float):
        self.peak_flops = peak_flops

    def on_start(self, loop: Loop) -> None:
        t, model = loop.config.train, loop.config.model
        self.lr_at = schedule(loop.config.optimizer, t.steps)
        self.flops_per_token = flops.flops_per_token(model, t.seq_len, flops.decoder_tokens(t))
        self.tokens_per_step = t.batch_size * t.seq_len
        self.first = True
        self.progress = tqdm(
            total=t.steps, initial=loop.step, disable=not (loop.is_main and t.progress_bar), dynamic_ncols=True
        )
        loop.resources.callback(self.progress.close)
        self._restart(loop)

    def _restart(self, loop: Loop) -> None:
        self.interval_start, self.interval_steps, self.off_clock_at = time.perf_counter(), 0, loop.off_clock_s

    def on_step_end(self, loop: Loop, step: int) -> None:
        self.interval_steps += 1
        t = loop.config.train
        if step % t.log_every and step != t.steps:
            return
        fetched = jax.device_get(loop.step_metrics)  # waits for the step
        elapsed = time.perf_counter() - self.interval_start - (loop.off_clock_s - self.off_clock_at)
        tokens_per_sec = self.tokens_per_step * self.interval_steps / elapsed
        record = {
            "step": step,
            "loss": float(fetched["loss"]),
            "lr": float(self.lr_at(step - 1)),
            "grad_norm": float(fetched["grad_norm"]),
            "tokens_per_sec": tokens_per_sec,
            "step_ms": 1000 * elapsed / self.interval_steps,
            "mfu": flops.mfu(tokens_per_sec, self.flops_per_token, self.peak_flops),
            **{
                k: float(v) for k, v in fetched.items() if k not in ("loss", "grad_norm")
            },  # prune's sparsity, distillation's parts
        }
        if self.first:
            record["compile_s"], self.first = loop.compile_s, False
            record["params"] = count_params(loop.spec.abstract.params)
            record["trainable_params"] = loop.spec.trainable_params
        self.progress.update(self.interval_steps)  # the steps this record covers have finished
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", mfu=f"{record['mfu']:.0%}")
        if step == t.steps:
            self.progress.close()
        loop.log(record)
        self._restart(loop)


class PeriodicEval(Callback):
    """Evaluates every ``train.eval_every`` steps before the last (the loop makes the final eval)."""

    def on_step_end(self, loop: Loop, step: int) -> None:
        t = loop.config.train
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            tqdm.write(f"step {step}: {describe(loop.evaluate())}")


def sample_text(loop: Loop) -> str:
    """A continuation of ``train.sample_prompt`` (empty: a new document, from eos; temperature 0.8,
    top-k 40) from the KV-cached sampler, ending at eos or the model's last position. Every process
    runs it (the arrays are global); the prompt is repeated over the data-parallel axes, under the
    training mesh and rules, and row 0 is kept.
    """
    t, tokenizer, mesh = loop.config.train, loop.tokenizer, loop.mesh
    model = nnx.merge(loop.spec.graphdef, loop.state.params)
    window = model.cfg.max_seq_len
    prompt = tokenizer.encode(t.sample_prompt)[-(window // 2) :]
    if len(prompt) == 0:  # an empty prompt starts a new document, as in python -m train.generate
        prompt = [tokenizer.eos_id]
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    with loop.off_clock(), activation_context(mesh, loop.spec.rules):
        tokens = generate(
            model,
            [prompt] * rows,
            min(t.sample_tokens, window - len(prompt)),
            temperature=0.8,
            top_k=40,
            seed=loop.config.seed,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.eos_id,
        )[0]
    tokens = list(tokens)
    return tokenizer.decode(tokens[: tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens)


class BestEval(Callback):
    """Tracks the best eval of the run's metric (train/checkpoints/best.py) in ``loop.checkpoints.best``, which every
    checkpoint saves: with ``checkpoint.keep_best`` a new best step is saved at once (and kept), and
    ``train.early_stopping`` stops the run after ``patience`` evals in a row without an improvement."""

    def on_start(self, loop: Loop) -> None:
        self.best, saved = tracked(loop.config), loop.checkpoints.best
        if self.best and saved:
            restored = Best.from_dict(saved)
            if restored.same_rule(self.best):
                self.best = restored
            elif loop.is_main:
                tqdm.write(
                    f"warning: the checkpoint tracked {saved['metric']} ({saved['mode']}); tracking "
                    f"{self.best.metric} ({self.best.mode}) afresh from step {loop.step}",
                    file=sys.stderr,
                )
        loop.checkpoints.best = self.best.to_dict() if self.best else None

    def on_eval(self, loop: Loop, record: dict) -> None:
        if self.best is None:
            return
        improved = self.best.update(record)
        loop.checkpoints.best = self.best.to_dict()
        if improved and loop.config.checkpoint.keep_best:
            loop.save()
        es = loop.config.train.early_stopping
        reason = self.best.stop_reason(es.patience) if es.metric else None
        if reason:
            loop.request_stop(reason)


class Samples(Callback):
    """Decoders: prints a sample every ``train.sample_every`` steps before the last, and at the end."""

    def on_start(self, loop: Loop) -> None:
        self.enabled = loop.config.model.family == "decoder" and loop.config.train.sample_tokens > 0

    def on_step_end(self, loop: Loop, step: int) -> None:
        t = loop.config.train
        if self.enabled and t.sample_every and step % t.sample_every == 0 and step < t.steps:
            sample = sample_text(loop)
            if loop.is_main:
                tqdm.write(f"step {step} sample:\n{t.sample_prompt}{sample}")

    def on_end(self, loop: Loop, result: dict) -> None:
        if self.enabled and not loop.preempted:
            sample = sample_text(loop)
            if loop.is_main:
                print("sample:\n" + loop.config.train.sample_prompt + sample, flush=True)


class PeriodicSave(Callback):
    """Saves a checkpoint every ``checkpoint.every`` steps before the last: the loop saves the step it
    ends on after its final eval, so that checkpoint holds the best-eval record that eval updated."""

    def on_step_end(self, loop: Loop, step: int) -> None:
        every = loop.config.checkpoint.every
        if every and step % every == 0 and step < loop.config.train.steps:
            loop.save()


class Preempt(Callback):
    """On SIGTERM / SIGINT (train/run/preemption.py): stops at a step every process agrees on."""

    def on_start(self, loop: Loop) -> None:
        self.preemption = Preemption()
        loop.resources.callback(self.preemption.restore)

    def on_step_end(self, loop: Loop, step: int) -> None:
        if self.preemption.reached(step):  # every step: JAX's sync protocol needs every step id
            loop.request_stop("preempted", preempted=True)


class LossPlot(Callback):
    """Draws ``loss.png`` when the run ends (not when preempted)."""

    def on_end(self, loop: Loop, result: dict) -> None:
        if loop.is_main and not loop.preempted:
            plot_losses(loop.run_dir)


def builtin(peak_flops: float) -> list[Callback]:
    """The run's own concerns, in the order they act after each step."""
    return [MetricsLog(peak_flops), PeriodicEval(), BestEval(), Samples(), Preempt(), PeriodicSave(), LossPlot()]
