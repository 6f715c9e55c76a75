"""Compile time of the train step against depth, with the layer scan on and off: one JSON object per line.

    PYTHONPATH=. python benchmarks/compile_time.py                          # gpt2-124m width, 2 and 48 layers, CPU
    PYTHONPATH=. python benchmarks/compile_time.py --topology v5e-8         # for a TPU slice, from this host (libtpu)
    PYTHONPATH=. python benchmarks/compile_time.py --layers 2 12 48 --scan on

Each (layers, scan) compiles in a fresh process, so no compilation cache or warm-up favours a later
one. The last line compares each scan setting's deepest compile with its shallowest; the target is
that the scanned 48-layer step compiles within 1.5x of the 2-layer one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-124m", help="preset of benchmarks/train_throughput.py or a YAML config")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 48])
    p.add_argument("--scan", choices=["on", "off"], nargs="+", default=["on", "off"])
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--topology", default="", help="compile for this TPU slice (e.g. v5e-8) instead of the host")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one compile
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.one:
        print(json.dumps(compile_one(args)), flush=True)
        return
    records = []
    for scan in args.scan:
        for layers in args.layers:
            child = [sys.executable, __file__, "--one", "--preset", args.preset, "--layers", str(layers)]
            child += ["--scan", scan, "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
            child += ["--topology", args.topology] if args.topology else []
            done = subprocess.run(child, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(records[-1]), flush=True)
    summary = {}
    for scan in args.scan:
        by_depth = {r["layers"]: r["compile_s"] for r in records if r["scan_layers"] == (scan == "on")}
        lo, hi = min(by_depth), max(by_depth)
        summary[f"scan_{scan}_compile_ratio_{hi}_over_{lo}_layers"] = round(by_depth[hi] / by_depth[lo], 2)
    print(json.dumps(summary), flush=True)


def compile_one(args: argparse.Namespace) -> dict:
    if args.topology:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices come from libtpu, not a backend
    from benchmarks.common import compile_step, devices_for, machine
    from benchmarks.train_throughput import load_preset

    model_cfg, _, _ = load_preset(args.preset)
    model_cfg = dataclasses.replace(
        model_cfg,
        n_layers=args.layers[0],
        scan_layers=args.scan[0] == "on",
        max_seq_len=max(model_cfg.max_seq_len, args.seq_len),
    )
    result = compile_step(model_cfg, args.batch, args.seq_len, devices_for(args.topology))
    return {
        "preset": args.preset,
        "layers": model_cfg.n_layers,
        "scan_layers": model_cfg.scan_layers,
        "d_model": model_cfg.d_model,
        "remat": model_cfg.remat,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "topology": args.topology or "host",
        "lower_s": round(result.lower_s, 2),
        "compile_s": round(result.compile_s, 2),
        **machine(),
    }


if __name__ == "__main__":
    main()
