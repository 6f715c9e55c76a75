"""Generation speed with the KV cache against the full-recompute path: one JSON object per line per
(cache, new_tokens).

    PYTHONPATH=. python benchmarks/generate.py                                 # gpt-10m, batch 1, prompt 64
    PYTHONPATH=. python benchmarks/generate.py --batch 8 --new-tokens 256 --recompute-max 256

The model is ``gpt-10m`` of ``benchmarks/train_throughput.py`` (random weights, float32, learned
positions widened to fit the longest sequence). Each configuration is run ``--repeats + 1`` times:
the first call compiles (``compile_s`` = first call minus the median of the others), the median
of the others gives ``tokens_per_sec`` (new tokens of the whole batch per second) and
``ms_per_token`` (wall time per decoding step, prefill included). Greedy, no eos: every run makes
exactly ``new_tokens`` tokens per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--recompute-max", type=int, default=256, help="skip the recompute path above this many tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the compiling one")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.common import machine
    from benchmarks.train_throughput import presets
    from models import build_model
    from models.generate import generate

    base, _, _ = presets()["gpt-10m"]
    longest = args.prompt_len + max(args.new_tokens)
    cfg = dataclasses.replace(base, max_seq_len=max(base.max_seq_len, longest), compute_dtype=args.dtype)
    model = build_model(cfg, seed=0)
    prompts = np.random.default_rng(0).integers(0, 257, (args.batch, args.prompt_len))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for cache in (True, False):
        for new in args.new_tokens:
            if not cache and new > args.recompute_max:
                continue
            times = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                generate(model, prompts, new, cache=cache)
                times.append(time.perf_counter() - start)
            run_s = statistics.median(times[1:])
            record = {
                "cache": cache,
                "batch": args.batch,
                "prompt_len": args.prompt_len,
                "new_tokens": new,
                "tokens_per_sec": round(args.batch * new / run_s, 1),
                "ms_per_token": round(1000 * run_s / new, 3),
                "compile_s": round(max(times[0] - run_s, 0.0), 2),
                "params": int(params),
                "compute_dtype": args.dtype,
                **machine(),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
