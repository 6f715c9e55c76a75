"""meshlm's train step against a PyTorch eager GPT of the same shape, in one process: tokens/s and their ratio.

    PYTHONPATH=. python benchmarks/torch_reference.py                          # batch 12 and 64, fp32 and auto
    PYTHONPATH=. python benchmarks/torch_reference.py --batch 12 --dtype float32 --repeats 7

Ours is the run's own jitted train step (``train.core.step.make_train_step``, the code path of
``python -m train``) on the model and optimizer of ``--config`` (default: the default run).
The reference is a nanoGPT-style eager model of the same shape: pre-LN blocks, fused QKV,
``F.scaled_dot_product_attention``, tanh-GELU MLP, tied embeddings, AdamW with the same
settings and decay mask (``fused=True``: one kernel for all parameters), foreach global-norm
clipping, warm-up + cosine schedule read from a precomputed table (no work between steps but
the step itself: batches are torch tensors before the clock starts); always fp32, with
``torch.set_num_threads`` = the cores this process may use. ``--tokenizer`` picks the
vocabulary: ``char`` (nanoGPT's shakespeare_char: the 83 characters of the plays), ``byte``
(256) or the config's BPE (2048). Both train on the same windows of
the config's training text. After ``--warmup`` untimed steps each, ``--repeats`` rounds time
``--steps`` steps of each, alternating which goes first; one JSON line per (batch, dtype)
reports the median tokens/s of each, the median of the per-round ratios and their spread, the
ratio of the best rounds, and tokens per second of process CPU time. On a CPU shared with other
work the wall-clock ratio mostly measures how each side copes with losing cores (torch's OpenMP
threads wait on each other); ``--single-thread`` (one thread each) and ``cpu_ratio`` compare the
work each side does per token instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "default.yaml"), help="the run whose model is timed")
    p.add_argument("--batch", type=int, nargs="+", default=[12, 64], help="batch sizes in sequences")
    p.add_argument("--seq-len", type=int, default=64, help="context length")
    p.add_argument("--dtype", nargs="+", default=["float32", "auto"], help="our compute dtypes (torch: float32)")
    p.add_argument(
        "--tokenizer",
        nargs="+",
        default=[None],
        help="char (83), byte (256), or a tokenizer dir; default: the config's",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and model")
    p.add_argument("--repeats", type=int, default=11, help="rounds, alternating which of ours and torch goes first")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument(
        "--single-thread",
        action="store_true",
        help="one thread each (torch and XLA): compares the work, not the scaling",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides for ours, e.g. model.remat=full")
    return p.parse_args(argv)


# --- data ------------------------------------------------------------------------------------


def token_windows(config, tokenizer_name: str, seq_len: int, count: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """``count`` random int32 [seq_len + 1] windows of the config's training text, and the vocabulary size.

    ``tokenizer_name`` ``'char'``: one id per distinct character of the text (nanoGPT's shakespeare_char)."""
    from train.data.tokenizer import load_tokenizer

    paths = sorted(p for pattern in config.data.train_files.split(",") for p in glob.glob(pattern.strip()))
    if not paths:
        sys.exit(f"error: data.train_files={config.data.train_files!r} matches no file; run from the repository root")
    texts = [pathlib.Path(path).read_text() for path in paths]
    if tokenizer_name == "char":
        chars = sorted(set("".join(texts)))
        ids = {c: i for i, c in enumerate(chars)}
        stream = np.array([ids[c] for text in texts for c in text], np.int32)
        vocab = len(chars)
    else:
        tokenizer = load_tokenizer(tokenizer_name)
        eos = np.array([tokenizer.eos_id], np.int32)
        stream = np.concatenate([x for text in texts for x in (tokenizer.encode(text), eos)])
        vocab = tokenizer.vocab_size
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len - 1, count)
    return np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int32), vocab


# --- ours ------------------------------------------------------------------------------------


class Ours:
    """The run's jitted train step on ``model_cfg``; ``run(batches)`` dispatches one step per batch and waits."""

    def __init__(self, config, model_cfg, total_steps: int):
        import jax

        from sharding.mesh import make_mesh
        from sharding.rules import batch_sharding
        from train.core.state import init_state, make_state_spec
        from train.core.step import make_train_step

        mesh = make_mesh(config.mesh)
        spec = make_state_spec(model_cfg, config.optimizer, total_steps, mesh)
        self.state = init_state(spec, model_cfg, config.seed)
        self.step = make_train_step(spec, mesh, grad_accum=1)
        self.sharding = batch_sharding(mesh)
        self.jax = jax
        self.loss = float("nan")

    def prepare(self, windows: np.ndarray) -> dict:
        """An int32 [B, T + 1] window batch as the step's placed inputs and targets."""
        return self.jax.device_put({"inputs": windows[:, :-1], "targets": windows[:, 1:]}, self.sharding)

    def run(self, batches: list[dict]) -> None:
        out = None
        for batch in batches:
            self.state, out = self.step(self.state, batch)
        self.loss = float(out["loss"])  # waits for the last step


# --- the PyTorch reference -------------------------------------------------------------------


def torch_gpt(model_cfg, seed: int):
    """A nanoGPT-style eager GPT with ``model_cfg``'s shape (learned positions, LayerNorm, tanh-GELU, tied head)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    d, heads = model_cfg.d_model, model_cfg.n_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=model_cfg.norm_eps), nn.LayerNorm(d, eps=model_cfg.norm_eps)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, model_cfg.d_ff), nn.Linear(model_cfg.d_ff, d)

        def forward(self, x):  # [B, T, d]
            b, t, _ = x.shape
            q, k, v = (h.view(b, t, heads, d // heads).transpose(1, 2) for h in self.qkv(self.ln_1(x)).split(d, 2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(model_cfg.vocab_size, d)
            self.wpe = nn.Embedding(model_cfg.max_seq_len, d)
            self.blocks = nn.ModuleList(Block() for _ in range(model_cfg.n_layers))
            self.ln_f = nn.LayerNorm(d, eps=model_cfg.norm_eps)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = model_cfg.init_std / (
                        math.sqrt(2 * model_cfg.n_layers) if name.endswith(("proj.weight", "out.weight")) else 1
                    )
                    nn.init.normal_(p, std=std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, inputs, targets):  # int64 [B, T] each -> mean cross-entropy
            x = self.wte(inputs) + self.wpe.weight[: inputs.shape[1]]
            for block in self.blocks:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    torch.manual_seed(seed)
    return GPT()


class Torch:
    """The reference model and its AdamW (decay on matrices only, as ``train.optimizer``), schedule and clipping."""

    def __init__(self, config, model_cfg, total_steps: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = torch_gpt(model_cfg, config.seed)
        self.params = list(self.model.parameters())
        self.optimizer, self.lrs = adamw(self.params, config.optimizer, total_steps)
        self.clip = config.optimizer.clip_norm
        self.steps = 0
        self.loss = float("nan")

    def prepare(self, windows: np.ndarray):
        """An int32 [B, T + 1] window batch as an int64 tensor."""
        return self.torch.from_numpy(windows).long()

    def run(self, windows: list) -> None:
        """One step per int64 [B, T + 1] tensor of ``windows``."""
        for w in windows:
            loss = self.model(w[:, :-1], w[:, 1:])
            train_step(self, loss)
        self.loss = loss.item()


def adamw(params: list, opt, total_steps: int) -> tuple:
    """torch's fused AdamW with ``opt``'s settings, decay on matrices only (as ``train.core.optimizer``),
    and the learning rate of every step (warm-up + cosine) as a list of floats."""
    import jax.numpy as jnp
    import torch

    from train.core.optimizer import schedule

    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, fused=True)
    return optimizer, np.asarray(schedule(opt, total_steps)(jnp.arange(total_steps + 1))).tolist()


def train_step(ref, loss) -> None:
    """Backward, foreach clipping and the optimizer step of a reference with ``optimizer``, ``params``, ``lrs``."""
    ref.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if ref.clip > 0:
        ref.torch.nn.utils.clip_grad_norm_(ref.params, ref.clip, foreach=True)
    lr = ref.lrs[min(ref.steps, len(ref.lrs) - 1)]
    for group in ref.optimizer.param_groups:
        group["lr"] = lr
    ref.optimizer.step()
    ref.steps += 1


# --- one comparison --------------------------------------------------------------------------


def timed(model, batches: list[np.ndarray], n: int) -> tuple[float, float]:
    """``n`` steps of ``model`` on its prepared ``batches``: tokens per second of wall time and per
    second of this process's CPU time."""
    prepared = [model.prepare(b) for b in batches]
    wall, cpu = time.perf_counter(), time.process_time()
    model.run([prepared[i % len(prepared)] for i in range(n)])
    tokens = n * batches[0][:, 1:].size
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def compare(args: argparse.Namespace, batch: int, dtype: str, tokenizer: str | None) -> dict:
    from train.config.sections import load_config
    from train.core.precision import resolve_compute_dtype

    config = load_config(args.config, [*args.overrides, f"model.compute_dtype={dtype}"])
    windows, vocab = token_windows(config, tokenizer or config.data.tokenizer, args.seq_len, 8 * batch)
    model_cfg = config.model
    model_cfg = dataclasses.replace(
        resolve_compute_dtype(model_cfg),
        vocab_size=vocab,
        max_seq_len=max(model_cfg.max_seq_len, args.seq_len),
    )
    batches = [windows[i * batch : (i + 1) * batch] for i in range(8)]
    total = args.warmup + args.repeats * args.steps
    ours, ref = Ours(config, model_cfg, total), Torch(config, model_cfg, total, args.threads)

    start = time.perf_counter()
    timed(ours, batches, args.warmup)  # compiles
    compile_s = time.perf_counter() - start
    timed(ref, batches, args.warmup)
    rounds = []  # ((ours wall, ours cpu), (torch wall, torch cpu))
    for r in range(args.repeats):  # ours first in even rounds, torch first in odd ones
        if r % 2:
            b = timed(ref, batches, args.steps)
            rounds.append((timed(ours, batches, args.steps), b))
        else:
            rounds.append((timed(ours, batches, args.steps), timed(ref, batches, args.steps)))
    ratios = [a[0] / b[0] for a, b in rounds]
    best = max(a[0] for a, _ in rounds) / max(b[0] for _, b in rounds)
    cpu_ratio = float(np.median([a[1] / b[1] for a, b in rounds]))
    return {
        "batch": batch,
        "seq_len": args.seq_len,
        "tokenizer": tokenizer or config.data.tokenizer,
        "vocab_size": model_cfg.vocab_size,
        "dtype": dtype,
        "compute_dtype": model_cfg.compute_dtype,
        "attention": model_cfg.attention,
        "remat": model_cfg.remat,
        "scan_layers": model_cfg.scan_layers,
        "ours_tokens_per_sec": round(float(np.median([a[0] for a, _ in rounds])), 1),
        "torch_tokens_per_sec": round(float(np.median([b[0] for _, b in rounds])), 1),
        "ratio": round(float(np.median(ratios)), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "ratio_of_best": round(best, 3),
        "ours_tokens_per_cpu_sec": round(float(np.median([a[1] for a, _ in rounds])), 1),
        "torch_tokens_per_cpu_sec": round(float(np.median([b[1] for _, b in rounds])), 1),
        "cpu_ratio": round(cpu_ratio, 3),
        "rounds": args.repeats,
        "steps_per_round": args.steps,
        "ours_loss": round(ours.loss, 4),
        "torch_loss": round(ref.loss, 4),
        "compile_s": round(compile_s, 2),
        "torch_threads": args.threads,
        "single_thread": args.single_thread,
        **machine(),
    }


def machine() -> dict:
    import jax
    import torch

    from train.core.precision import cpu_flags

    flags = cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")), "")
    return {
        "cpu": model or platform.processor(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "amx_bf16"))),
        "cores": len(os.sched_getaffinity(0)),
        "load_1min": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _cpuinfo_lines() -> list[str]:
    try:
        return pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.single_thread:  # before jax starts its CPU client
        args.threads = 1
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    for tokenizer in args.tokenizer:
        for batch in args.batch:
            for dtype in args.dtype:
                print(json.dumps(compare(args, batch, dtype, tokenizer)), flush=True)


if __name__ == "__main__":
    main()
