"""MiniLM token classification: meshlm's train step against transformers' BertForTokenClassification
in PyTorch eager, in one process: tokens/s and their ratio.

    PYTHONPATH=. python benchmarks/torch_encoder.py                        # batch 32 x 128, fp32 and auto
    PYTHONPATH=. python benchmarks/torch_encoder.py --batch 8 --single-thread --repeats 5

Ours is the run's jitted train step (``train.core.step.make_train_step``) on the model and
optimizer of ``--config`` (default ``configs/speakers-minilm.yaml``: all-MiniLM-L6-v2's shape, 6
layers, 384 wide, 12 heads, exact GELU, post-LN, a 5-tag per-token head, dropout 0.1, AdamW with
a linear schedule). The reference is ``transformers.BertForTokenClassification`` built from
``models.hf.bert.config_to_hf`` of the same config (random init both sides: speed does not depend
on the weights; SDPA attention, the same dropout), trained in ``model.train()`` mode with
torch's fused AdamW, foreach clipping and the same decay mask and schedule
(``benchmarks/torch_reference.py``). Both get the same random WordPiece ids and tags, every token
a target. Timing, rounds and the JSON fields are those of ``benchmarks/torch_reference.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.torch_reference import adamw, machine, timed, train_step


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "speakers-minilm.yaml"))
    p.add_argument("--batch", type=int, nargs="+", default=[32], help="batch sizes in sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", nargs="+", default=["float32", "auto"], help="our compute dtypes (torch: float32)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and model")
    p.add_argument("--repeats", type=int, default=5, help="rounds, alternating which side goes first")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--single-thread", action="store_true", help="one thread each (torch and XLA)")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides for ours")
    return p.parse_args(argv)


class Ours:
    """The run's jitted token-classification step; ``run(batches)`` dispatches one step per batch and waits."""

    def __init__(self, config, model_cfg, total_steps: int):
        import jax

        from sharding.mesh import make_mesh
        from sharding.rules import batch_sharding
        from train.core.state import init_state, make_state_spec
        from train.core.step import make_train_step

        mesh = make_mesh(config.mesh)
        spec = make_state_spec(model_cfg, config.optimizer, total_steps, mesh)
        self.state = init_state(spec, model_cfg, config.seed)
        self.step = make_train_step(spec, mesh, grad_accum=1, seed=config.seed)
        self.sharding = batch_sharding(mesh)
        self.jax = jax
        self.loss = float("nan")

    def prepare(self, rows: np.ndarray) -> dict:
        """int32 [B, T + 1]: ids, then the tags in the last column's place -> the step's placed batch."""
        ids, tags = rows[:, :-1], rows[:, 1:] % 5
        batch = {"inputs": ids, "attention_mask": np.ones_like(ids), "targets": tags}
        return self.jax.device_put(batch, self.sharding)

    def run(self, batches: list[dict]) -> None:
        out = None
        for batch in batches:
            self.state, out = self.step(self.state, batch)
        self.loss = float(out["loss"])


class Torch:
    """transformers' BertForTokenClassification of ``model_cfg``'s shape, trained in eager fp32."""

    def __init__(self, config, model_cfg, total_steps: int, threads: int):
        import torch
        import transformers

        from models.hf.bert import config_to_hf

        torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        hf = config_to_hf(model_cfg)
        hf.hidden_dropout_prob = model_cfg.dropout
        hf.attention_probs_dropout_prob = model_cfg.attention_dropout
        hf.classifier_dropout = model_cfg.dropout
        self.model = transformers.BertForTokenClassification(hf).train()
        self.torch = torch
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.lrs = adamw(self.params, config.optimizer, total_steps)
        self.clip = config.optimizer.clip_norm
        self.steps = 0
        self.loss = float("nan")

    def prepare(self, rows: np.ndarray) -> tuple:
        ids, tags = rows[:, :-1], rows[:, 1:] % 5
        t = self.torch.from_numpy
        return t(ids).long(), t(np.ones_like(ids)).long(), t(tags).long()

    def run(self, batches: list) -> None:
        for ids, mask, tags in batches:
            loss = self.model(input_ids=ids, attention_mask=mask, labels=tags).loss
            train_step(self, loss)
        self.loss = loss.item()


def compare(args: argparse.Namespace, batch: int, dtype: str) -> dict:
    from train.config.sections import load_config
    from train.core.precision import resolve_compute_dtype

    config = load_config(args.config, ["checkpoint.init_from=", *args.overrides, f"model.compute_dtype={dtype}"])
    model_cfg = resolve_compute_dtype(config.model)
    rng = np.random.default_rng(0)
    batches = [rng.integers(1000, model_cfg.vocab_size, (batch, args.seq_len + 1)).astype(np.int32) for _ in range(4)]
    total = args.warmup + args.repeats * args.steps + 1
    ours, ref = Ours(config, model_cfg, total), Torch(config, model_cfg, total, args.threads)

    start = time.perf_counter()
    timed(ours, batches, args.warmup)  # compiles
    compile_s = time.perf_counter() - start
    timed(ref, batches, args.warmup)
    rounds = []
    for r in range(args.repeats):  # ours first in even rounds, torch first in odd ones
        if r % 2:
            b = timed(ref, batches, args.steps)
            rounds.append((timed(ours, batches, args.steps), b))
        else:
            rounds.append((timed(ours, batches, args.steps), timed(ref, batches, args.steps)))
    tokens = batch * args.seq_len
    ratios = [a[0] / b[0] for a, b in rounds]
    return {
        "model": "minilm token classification",
        "batch": batch,
        "seq_len": args.seq_len,
        "dtype": dtype,
        "compute_dtype": model_cfg.compute_dtype,
        "attention": model_cfg.attention,
        "ours_ms_per_step": round(1000 * tokens / float(np.median([a[0] for a, _ in rounds])), 1),
        "torch_ms_per_step": round(1000 * tokens / float(np.median([b[0] for _, b in rounds])), 1),
        "ratio": round(float(np.median(ratios)), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "cpu_ratio": round(float(np.median([a[1] / b[1] for a, b in rounds])), 3),
        "rounds": args.repeats,
        "steps_per_round": args.steps,
        "ours_loss": round(ours.loss, 4),
        "torch_loss": round(ref.loss, 4),
        "compile_s": round(compile_s, 2),
        "torch_threads": args.threads,
        "single_thread": args.single_thread,
        **machine(),
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.single_thread:  # before jax starts its CPU client
        args.threads = 1
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    for batch in args.batch:
        for dtype in args.dtype:
            print(json.dumps(compare(args, batch, dtype)), flush=True)


if __name__ == "__main__":
    main()
