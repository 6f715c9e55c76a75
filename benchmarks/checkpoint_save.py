"""How long a checkpoint save blocks training: one JSON object per (preset, mode) on stdout.

    PYTHONPATH=. python benchmarks/checkpoint_save.py                      # gpt2-124m, async and sync
    PYTHONPATH=. python benchmarks/checkpoint_save.py --preset llama-1b --mesh 1,8,1 --repeats 3

Builds the real train state of a preset (fp32 parameters + AdamW moments, sharded on the mesh),
then saves it with ``train.checkpoint.Checkpoints`` as the loop does. ``blocking_s`` is the time
``save()`` takes to return, which is all a training step waits for; ``commit_s`` is the time until
the step directory is committed on disk. Each repeat saves a new step into a fresh directory
under ``--dir`` (default: a temporary directory, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-124m", help="a config name in configs/ or a YAML path")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor sizes (fake CPU devices are made to match)")
    p.add_argument("--repeats", type=int, default=3, help="saves per mode (the median is reported)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    sizes = tuple(int(s) for s in args.mesh.split(","))
    devices = sizes[0] * sizes[1] * sizes[2]
    if devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"

    import jax
    import numpy as np

    from sharding.mesh import make_mesh
    from train.checkpoints.store import Checkpoints
    from train.config.sections import CheckpointConfig, MeshConfig, load_config
    from train.core.state import count_params, init_state, make_state_spec

    path = pathlib.Path(args.preset)
    if not path.is_file():
        path = REPO_ROOT / "configs" / f"{args.preset}.yaml"
    config = load_config(path)
    mesh = make_mesh(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]))
    spec = make_state_spec(config.model, config.optimizer, config.train.steps, mesh)
    state = init_state(spec, config.model, config.seed)
    jax.block_until_ready(state)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="meshlm-ckpt-"))
    try:
        for async_save in (True, False):
            blocking, commit = [], []
            for repeat in range(args.repeats):
                directory = root / f"{'async' if async_save else 'sync'}-{repeat}"
                checkpoints = Checkpoints(directory, CheckpointConfig(async_save=async_save, keep=1))
                start = time.perf_counter()
                checkpoints.save(1, state, {"position": 1}, config.to_dict())
                blocking.append(time.perf_counter() - start)
                checkpoints.wait()
                commit.append(time.perf_counter() - start)
                checkpoints.close()
                shutil.rmtree(directory)
            record = {
                "preset": args.preset,
                "mesh": dict(mesh.shape),
                "params": count_params(state.params),
                "state_gib": round(state_bytes / 2**30, 3),
                "async_save": async_save,
                "blocking_s": round(float(np.median(blocking)), 3),
                "blocking_s_max": round(max(blocking), 3),
                "commit_s": round(float(np.median(commit)), 3),
                "write_gib_per_s": round(state_bytes / 2**30 / float(np.median(commit)), 3),
                "repeats": args.repeats,
            }
            print(json.dumps(record), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
