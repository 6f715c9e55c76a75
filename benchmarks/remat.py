"""Rematerialisation policies: the compiler's temporary memory against step time, one JSON object per line.

    PYTHONPATH=. python benchmarks/remat.py                              # gpt2-124m, batch 4 x 256, host CPU
    PYTHONPATH=. python benchmarks/remat.py --topology v5e-8 --batch 64 --seq-len 1024   # compile only, TPU

For each ``model.remat`` policy (none, full, save_dots) the real train step is compiled and
``compiled.memory_analysis()`` read (temporaries are the activations kept for the backward pass,
gradients and workspace). On the host the step then runs ``--steps`` times on random tokens; for a
TPU topology nothing runs and only the memory figures are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MIB = 2**20


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-124m", help="preset of benchmarks/train_throughput.py or a YAML config")
    p.add_argument("--policies", nargs="+", default=["none", "full", "save_dots"])
    p.add_argument("--batch", type=int, default=4, help="global batch in sequences")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps (host only)")
    p.add_argument("--topology", default="", help="compile for this TPU slice (e.g. v5e-8): memory only")
    p.add_argument("--attention", default=None, help="model.attention (default: the preset's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.topology:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices come from libtpu, not a backend
    from benchmarks.common import compile_step, devices_for, machine
    from benchmarks.train_throughput import load_preset

    base, _, _ = load_preset(args.preset)
    devices = devices_for(args.topology)
    for policy in args.policies:
        model_cfg = dataclasses.replace(
            base,
            remat=policy,
            max_seq_len=max(base.max_seq_len, args.seq_len),
            attention=args.attention or base.attention,
        )
        result = compile_step(model_cfg, args.batch, args.seq_len, devices)
        mem = result.compiled.memory_analysis()
        record = {
            "preset": args.preset,
            "remat": policy,
            "layers": model_cfg.n_layers,
            "scan_layers": model_cfg.scan_layers,
            "compute_dtype": model_cfg.compute_dtype,
            "attention": model_cfg.attention,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "topology": args.topology or "host",
            "devices": len(devices),
            "temp_mib": round(mem.temp_size_in_bytes / MIB, 1),  # per device
            "argument_mib": round(mem.argument_size_in_bytes / MIB, 1),
            "compile_s": round(result.compile_s, 2),
        }
        if not args.topology:
            record.update(_time_steps(result, model_cfg, args))
        print(json.dumps({**record, **machine()}), flush=True)


def _time_steps(result, model_cfg, args) -> dict:
    """Median and min wall time of ``args.steps`` steps on random tokens, after one warm-up step."""
    import jax
    import numpy as np

    from sharding.rules import batch_sharding
    from train.core.state import init_state

    state = init_state(result.spec, model_cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (args.batch, args.seq_len + 1), np.int32)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_sharding(result.mesh))
    state, out = result.compiled(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, out = result.compiled(state, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return {"step_ms": round(float(np.median(times)) * 1e3, 1), "step_ms_min": round(min(times) * 1e3, 1)}


if __name__ == "__main__":
    main()
