"""Training throughput and MFU of the real train step: one JSON object per line per (preset, mesh).

    PYTHONPATH=. python benchmarks/train_throughput.py                  # gpt-10m on 1 device and on 2x4 fake devices
    PYTHONPATH=. python benchmarks/train_throughput.py --preset gpt-10m llama-10m --mesh 1,1,1 --batch 16
    PYTHONPATH=. python benchmarks/train_throughput.py --preset configs/default.yaml --steps 3

Each run builds the state and the jitted step, times lower + compile, warms up, then times
``--steps`` steps on random tokens (median step time). A CPU mesh with more devices than this
process has runs in a subprocess with ``--xla_force_host_platform_device_count``.
On CPU the XLA flags in ``CPU_XLA_FLAGS`` are added to ``XLA_FLAGS`` unless ``--no-cpu-flags``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# XLA:CPU flags added on CPU. Empty: none of the flags measured in benchmarks/README.md beat the defaults.
CPU_XLA_FLAGS: tuple[str, ...] = ()


def _merge_flags(existing: str, extra: tuple[str, ...]) -> str:
    """``existing`` XLA_FLAGS plus each of ``extra`` whose flag name is not already set."""
    names = {f.split("=")[0] for f in existing.split()}
    return " ".join([existing, *(f for f in extra if f.split("=")[0] not in names)]).strip()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=["gpt-10m"], help="preset names (see PRESETS) or YAML config paths")
    p.add_argument("--mesh", nargs="+", default=None, help="data,fsdp,tensor sizes, e.g. 1,1,1 2,4,1 (default both)")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default: the preset's)"
    )
    p.add_argument("--remat", choices=["none", "full", "save_dots"], default=None)
    p.add_argument("--attention", choices=["xla", "recompute", "cudnn", "splash"], default=None)
    p.add_argument("--scan", choices=["on", "off"], default=None, help="scan over layers (default: the preset's)")
    p.add_argument("--no-cpu-flags", action="store_true", help="do not add CPU_XLA_FLAGS to XLA_FLAGS")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if not args.no_cpu_flags:
        os.environ["XLA_FLAGS"] = _merge_flags(os.environ.get("XLA_FLAGS", ""), CPU_XLA_FLAGS)

    import jax  # after XLA_FLAGS is final

    meshes = args.mesh or (["1,1,1", "2,4,1"] if jax.default_backend() == "cpu" else [f"1,{jax.device_count()},1"])
    for mesh_text in meshes:
        sizes = _mesh_sizes(mesh_text)
        n = math.prod(s for s in sizes if s > 0)
        if jax.default_backend() == "cpu" and -1 not in sizes and n != jax.device_count():
            _run_in_subprocess(argv if argv is not None else sys.argv[1:], mesh_text, n)
            continue
        for preset in args.preset:
            print(json.dumps(run_one(preset, sizes, args)), flush=True)


def _mesh_sizes(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        sys.exit(f"error: --mesh {text!r} must be three comma-separated sizes data,fsdp,tensor, e.g. 2,4,1")
    return sizes


def _run_in_subprocess(argv: list[str], mesh_text: str, devices: int) -> None:
    """Re-runs this script for one mesh in a fresh process that has ``devices`` fake CPU devices."""
    rest, skip = [], False
    for a in argv:  # drop the parent's --mesh values
        if a == "--mesh":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        rest.append(a)
    env = dict(os.environ)
    env["XLA_FLAGS"] = _merge_flags(env.get("XLA_FLAGS", ""), (f"--xla_force_host_platform_device_count={devices}",))
    done = subprocess.run([sys.executable, __file__, *rest, "--mesh", mesh_text], env=env, check=False)
    if done.returncode:
        sys.exit(done.returncode)


# --- presets ---------------------------------------------------------------------------------


def presets() -> dict:
    """Name -> (ModelConfig, default batch, default seq_len). Byte vocabulary: 257 padded to 384."""
    from models.config import ModelConfig

    # recompute: the fastest attention on CPU (benchmarks/README.md); --attention xla for jax.nn's
    gpt = ModelConfig(
        vocab_size=384, d_model=384, n_layers=6, n_heads=6, d_ff=1536, max_seq_len=256, attention="recompute"
    )
    llama = dataclasses.replace(
        gpt,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
        n_kv_heads=2,
        d_ff=1024,
    )
    tiny = ModelConfig(vocab_size=384, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=64)
    return {"gpt-10m": (gpt, 8, 256), "llama-10m": (llama, 8, 256), "tiny": (tiny, 16, 64)}


def load_preset(name: str):
    table = presets()
    if name in table:
        return table[name]
    path = pathlib.Path(name)
    if not path.is_file() and (REPO_ROOT / "configs" / f"{name}.yaml").is_file():
        path = REPO_ROOT / "configs" / f"{name}.yaml"
    if not path.is_file():
        sys.exit(f"error: preset '{name}' is neither one of {', '.join(table)} nor a YAML config; pick one of those")
    from train.config.sections import load_config
    from train.core.precision import resolve_compute_dtype
    from train.data.tokenizer import load_tokenizer

    cfg = load_config(path)
    model = resolve_compute_dtype(cfg.model)
    if not model.vocab_size:
        vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
        model = dataclasses.replace(model, vocab_size=-(-vocab // 128) * 128)
    return model, cfg.train.batch_size, cfg.train.seq_len


# --- one measurement -------------------------------------------------------------------------


def model_for(preset: str, args: argparse.Namespace):
    """(model config, batch, seq_len) of ``preset`` with the command line's overrides applied."""
    model_cfg, batch, seq_len = load_preset(preset)
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    overrides = {"max_seq_len": max(model_cfg.max_seq_len, seq_len)}
    if args.dtype:
        overrides["compute_dtype"] = args.dtype
    if args.remat:
        overrides["remat"] = args.remat
    if args.attention:
        overrides["attention"] = args.attention
    if args.scan:
        overrides["scan_layers"] = args.scan == "on"
    return dataclasses.replace(model_cfg, **overrides), batch, seq_len


def run_one(preset: str, sizes: tuple[int, int, int], args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from sharding.fit import check_fits
    from sharding.mesh import make_mesh
    from sharding.rules import batch_sharding
    from train.config.sections import ConfigError, MeshConfig, OptimizerConfig
    from train.core import flops as metrics
    from train.core.state import count_params, init_state, make_state_spec
    from train.core.step import make_train_step

    model_cfg, batch, seq_len = model_for(preset, args)
    mesh = make_mesh(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]))
    try:
        check_fits(model_cfg, mesh.shape, batch_size=batch, seq_len=seq_len)
    except ConfigError as e:
        sys.exit(f"error: {e} (train.batch_size is --batch here)")
    spec = make_state_spec(model_cfg, OptimizerConfig(warmup_steps=0), args.steps + args.warmup, mesh)
    state = init_state(spec, model_cfg, seed=0)
    step = make_train_step(spec, mesh, grad_accum=1)

    peak, peak_source = metrics.peak_flops(
        mesh.devices.flatten().tolist(), model_cfg.compute_dtype
    )  # before the step's threads spin
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    device_batch = jax.device_put(host_batch, batch_sharding(mesh))

    start = time.perf_counter()
    compiled = step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start

    for _ in range(args.warmup):
        state, out = compiled(state, device_batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, out = compiled(state, device_batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))

    tokens_per_sec = batch * seq_len / step_s
    per_token = metrics.flops_per_token(model_cfg, seq_len)
    return {
        "preset": preset,
        "mesh": dict(mesh.shape),
        "params": count_params(state.params),
        "batch": batch,
        "seq_len": seq_len,
        "compute_dtype": model_cfg.compute_dtype,
        "remat": model_cfg.remat,
        "attention": model_cfg.attention,
        "scan_layers": model_cfg.scan_layers,
        "tokens_per_sec": round(tokens_per_sec, 1),
        "step_ms": round(step_s * 1e3, 1),
        "step_ms_min": round(min(times) * 1e3, 1),
        "compile_s": round(compile_s, 2),
        "mfu": round(metrics.mfu(tokens_per_sec, per_token, peak), 4),
        "flops_per_token": per_token,
        "peak_flops": peak,
        "peak_source": peak_source,
        "device_kind": jax.devices()[0].device_kind,
        "loss": round(float(out["loss"]), 4),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


if __name__ == "__main__":
    main()
