"""Packed vs padded tasks: padding fraction and real tokens (and examples) per second.

    PYTHONPATH=. python benchmarks/packing.py                                   # speakers + genre, MiniLM
    PYTHONPATH=. python benchmarks/packing.py --configs configs/speakers-minilm.yaml --steps 5 --seq-len 128
    PYTHONPATH=. python benchmarks/packing.py --configs configs/sft-gpt.yaml,configs/sft-llama.yaml --steps 8
    PYTHONPATH=. python benchmarks/packing.py --configs configs/default.yaml,configs/tiny-t5.yaml   # text windows
    PYTHONPATH=. python benchmarks/packing.py --configs configs/speakers-minilm.yaml --seq-len 128 \
        data.format=conll data.train_files=/tmp/conll/train.conll data.val_files=/tmp/conll/val.conll  # CoNLL sentences

For each task config, builds the task twice (``data.packing`` true / false, train/data/tasks.py),
measures the padding fraction of its first training batches, then times ``--steps`` train steps
(after one compiling step) of the config's model from a fresh init (throughput does not depend on
the weights), ``--rounds`` times with packed and padded taking turns (the median round counts).
Prints one JSON object per (config, packing): ``padding_fraction``, ``real_tokens_per_s`` (tokens of examples, not padding), ``examples_per_s``, ``s_per_step`` and
``epoch_s`` (the training examples over examples_per_s). Text-window tasks (causal LM, span
corruption) count a window as an example and its tokens as real (span corruption: its encoder
inputs). Run packed and padded in one process: only their ratio means something on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CONFIGS = "configs/speakers-minilm.yaml,configs/genre-minilm.yaml"


def real_tokens(batch: dict, windows: bool = False) -> tuple[int, int]:
    """(tokens of examples, examples) in a batch, packed or padded; ``windows``: of text windows."""
    if windows:
        key = next((k for k in ("encoder_segment_ids", "encoder_mask") if k in batch), "")
        rows = len(next(iter(batch.values())))
        return (int((batch[key] > 0).sum()) if key else int(batch["inputs"].size)), rows
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        return int((segments > 0).sum()), int(((batch["positions"] == 0) & (segments > 0)).sum())
    return int(batch["attention_mask"].sum()), len(batch["attention_mask"])


def prepare(config_path: str, packing: bool, steps: int, overrides: list[str]) -> dict:
    """The task's first ``steps + 1`` batches and its compiled train step (run once on the first)."""
    import jax

    from sharding.mesh import make_mesh
    from train.config.sections import load_config
    from train.core.state import init_state, make_state_spec
    from train.core.step import make_train_step
    from train.data.tasks import StreamTask, make_task, vocab_needed
    from train.data.tokenizer import load_tokenizer
    from train.run.loop import resolve_model

    config = load_config(REPO_ROOT / config_path, [*overrides, f"data.packing={str(packing).lower()}"])
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg = resolve_model(config.model, vocab_needed(config, tokenizer))
    task = make_task(config, model_cfg, tokenizer)
    mesh = make_mesh(config.mesh)
    spec = make_state_spec(model_cfg, config.optimizer, config.train.steps, mesh)
    run = {"config": config, "task": task, "mesh": mesh, "windows": isinstance(task, StreamTask)}
    run["step"] = make_train_step(spec, mesh, config.train.grad_accum, config.seed)
    run["batches"] = [task.batch(next(task.batches), i) for i in range(steps + 1)]
    run["state"], metrics = run["step"](init_state(spec, model_cfg, config.seed), _global(run, 0))  # compiles
    jax.block_until_ready(metrics)
    return run


def _global(run: dict, i: int):
    from train.data.tasks import global_batch

    return global_batch(run["batches"][i], run["mesh"])


def timed_round(run: dict) -> float:
    """Seconds for the train steps on batches 1..steps."""
    import jax

    start = time.perf_counter()
    for i in range(1, len(run["batches"])):
        run["state"], metrics = run["step"](run["state"], _global(run, i))
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def report(config_path: str, packing: bool, run: dict, seconds: list[float]) -> dict:
    from train.data import packing as packer

    batches, steps = run["batches"], len(run["batches"]) - 1
    elapsed = statistics.median(seconds)
    tokens, examples = map(sum, zip(*(real_tokens(b, run["windows"]) for b in batches[1:])))
    t = run["config"].train
    return {
        "config": config_path,
        "packing": packing,
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "padding_fraction": round(packer.padding_fraction(batches), 4),
        "examples_per_step": examples / steps,
        "s_per_step": round(elapsed / steps, 3),
        "s_per_step_rounds": [round(s / steps, 3) for s in seconds],
        "real_tokens_per_s": round(tokens / elapsed, 1),
        "examples_per_s": round(examples / elapsed, 2),
        "epoch_s": round(run["task"].train_examples / (examples / elapsed), 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=CONFIGS, help="comma-separated task configs (example objectives)")
    p.add_argument("--steps", type=int, default=3, help="timed train steps per round")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds, packed and padded taking turns (median)")
    p.add_argument("--seq-len", type=int, default=0, help="override train.seq_len (0: the config's)")
    p.add_argument("--batch-size", type=int, default=0, help="override train.batch_size (0: the config's)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every config")
    args = p.parse_args(argv)
    overrides = ["checkpoint.init_from=", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", *args.overrides]
    overrides += [f"train.seq_len={args.seq_len}"] * bool(args.seq_len)
    overrides += [f"train.batch_size={args.batch_size}"] * bool(args.batch_size)
    for path in args.configs.split(","):
        runs = {packing: prepare(path, packing, args.steps, overrides) for packing in (True, False)}
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for packing, run in runs.items():
                seconds[packing].append(timed_round(run))
        for packing, run in runs.items():
            print(json.dumps(report(path, packing, run, seconds[packing])), flush=True)


if __name__ == "__main__":
    main()
