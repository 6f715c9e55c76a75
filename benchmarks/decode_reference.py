"""KV-cache greedy decoding: ours (fp32 and int8 weights) against transformers' ``generate()``, in one process.

    PYTHONPATH=. python benchmarks/decode_reference.py                          # batch 1 and 8, all cores
    PYTHONPATH=. python benchmarks/decode_reference.py --batch 1 --single-thread --repeats 7

The model is ``gpt-10m`` of ``benchmarks/train_throughput.py`` (GPT-2 style: 6 layers, 384 wide,
6 heads, learned positions, tied head; random weights, fp32). The reference is
``transformers.GPT2LMHeadModel`` with our weights (``models.hf.export``, so both emit
the same tokens), eager PyTorch, ``generate(do_sample=False)`` with its KV cache and no eos.
``int8`` is the same model after ``models.quant.quantize_model`` (int8 matrices, per-column
scales). Each call decodes ``--new-tokens`` tokens per row after a ``--prompt-len`` prompt
(prefill included); after one untimed call each, ``--repeats`` rounds call every side once in a
rotating order. One JSON line per batch: median ms per call and per token of each side, and the
median per-round ratios (theirs / ours: > 1 means ours is faster) with their spread, and the
ratios of the median process CPU seconds per call (steadier than wall time on a shared CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--single-thread", action="store_true", help="one thread each (torch and XLA)")
    return p.parse_args(argv)


def _models(max_len: int):
    """(our fp32 model, our int8 model, the HF GPT2LMHeadModel with the fp32 weights)."""
    import tempfile

    import transformers

    from benchmarks.train_throughput import presets
    from models import build_model
    from models.hf import export
    from models.quant import quantize_model

    base, _, _ = presets()["gpt-10m"]
    cfg = dataclasses.replace(base, max_seq_len=max(base.max_seq_len, max_len), compute_dtype="float32")
    fp32, int8 = build_model(cfg, seed=0), build_model(cfg, seed=0)
    quantize_model(int8)
    with tempfile.TemporaryDirectory() as tmp:
        export(fp32, cfg, tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return fp32, int8, hf


def compare(args: argparse.Namespace, batch: int, models) -> dict:
    import torch

    from benchmarks.common import machine
    from models.generate import generate

    fp32, int8, hf = models
    prompts = np.random.default_rng(batch).integers(0, 256, (batch, args.prompt_len)).astype(np.int32)
    torch_prompts = torch.from_numpy(prompts).long()
    new = args.new_tokens

    def theirs():
        with torch.inference_mode():
            out = hf.generate(
                torch_prompts,
                attention_mask=torch.ones_like(torch_prompts),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
            )
        return out[:, args.prompt_len :].numpy()

    sides = {"ours": lambda: generate(fp32, prompts, new), "int8": lambda: generate(int8, prompts, new), "hf": theirs}
    first = {name: fn() for name, fn in sides.items()}  # compiles ours
    times = {name: [] for name in sides}
    cpu = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.repeats):
        for name in names[r % 3 :] + names[: r % 3]:
            start, start_cpu = time.perf_counter(), time.process_time()
            sides[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = {name: float(np.median(t)) for name, t in times.items()}
    med_cpu = {name: float(np.median(t)) for name, t in cpu.items()}
    hf_over_ours = [h / o for h, o in zip(times["hf"], times["ours"])]
    ours_over_int8 = [o / q for o, q in zip(times["ours"], times["int8"])]
    return {
        "model": "gpt-10m (6 x 384)",
        "batch": batch,
        "prompt_len": args.prompt_len,
        "new_tokens": new,
        "ours_ms": round(1000 * med["ours"], 1),
        "int8_ms": round(1000 * med["int8"], 1),
        "hf_ms": round(1000 * med["hf"], 1),
        "ours_ms_per_token": round(1000 * med["ours"] / new, 2),
        "hf_ms_per_token": round(1000 * med["hf"] / new, 2),
        "speedup_vs_hf": round(float(np.median(hf_over_ours)), 3),
        "speedup_vs_hf_min": round(min(hf_over_ours), 3),
        "speedup_vs_hf_max": round(max(hf_over_ours), 3),
        "int8_speedup": round(float(np.median(ours_over_int8)), 3),
        "int8_speedup_min": round(min(ours_over_int8), 3),
        "int8_speedup_max": round(max(ours_over_int8), 3),
        "ours_cpu_s": round(med_cpu["ours"], 2),
        "int8_cpu_s": round(med_cpu["int8"], 2),
        "hf_cpu_s": round(med_cpu["hf"], 2),
        "cpu_speedup_vs_hf": round(med_cpu["hf"] / med_cpu["ours"], 3),
        "cpu_int8_speedup": round(med_cpu["ours"] / med_cpu["int8"], 3),
        "same_tokens_as_hf": bool((first["ours"] == first["hf"]).all()),
        "rounds": args.repeats,
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
    import torch

    torch.set_num_threads(args.threads)
    models = _models(args.prompt_len + args.new_tokens)
    for batch in args.batch:
        print(json.dumps(compare(args, batch, models)), flush=True)


if __name__ == "__main__":
    main()
