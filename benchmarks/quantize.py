"""Post-training int8 against float32: disk and parameter memory, held-out eval_bpb, decode tokens/s;
one JSON object per line per (model, dtype).

    PYTHONPATH=. python benchmarks/quantize.py SOURCE --files F1,F2 [--tokenizer T]   # a run or export
    PYTHONPATH=. python benchmarks/quantize.py                                      # gpt-10m, random weights
    PYTHONPATH=. python benchmarks/quantize.py SOURCE --files F1,F2 --also RUN1,RUN2 --repeats 0  # + bpb of more runs
    PYTHONPATH=. python benchmarks/quantize.py CLASSIFIER_RUN --classifier --work DIR           # accuracy, macro-F1

``--also``: more runs (e.g. a quantisation-aware fine-tune of SOURCE and a float one of the same
steps): eval_bpb of each as it runs (a QAT run: its fake-quantised forward) and of its int8 export
(``train.quantize``, a QAT run with its own selection). ``--classifier``: SOURCE is a classification
run; its float32, int8 and int8 + ``--embeddings`` exports (written under ``--work``, never into
SOURCE) are scored on the run's whole validation split with ``train.scoring`` (accuracy, macro-F1).

With SOURCE, ``python -m train.export`` and ``python -m train.quantize`` (without and with
``--embeddings``) write the exports to a
temporary directory and ``train.evaluate`` scores each on ``--files`` (skipped without them).
Without SOURCE, ``gpt-10m`` of ``benchmarks/train_throughput.py`` (random weights) is quantised in
memory and only sizes and speed are measured. Decoding: ``models.generate`` with the KV cache,
greedy, batch ``--batch``, prompt 64, ``--new-tokens`` tokens; the three models' calls alternate,
the first of each compiles, the median of ``--repeats`` gives ``tokens_per_sec``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import pathlib
import statistics
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="", help="a run or export (default: gpt-10m, random weights)")
    p.add_argument("--files", default="", help="held-out text files for eval_bpb")
    p.add_argument("--tokenizer", default="", help="train.evaluate --tokenizer (default: the source's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed decode calls per model (0: no decoding)")
    p.add_argument("--also", default="", help="comma-separated runs: eval_bpb float and int8 (see above)")
    p.add_argument("--classifier", action="store_true", help="SOURCE is a classification run (see above)")
    p.add_argument("--work", default="", help="directory for the exports (default: a temporary one)")
    return p.parse_args(argv)


def _bpb(export_dir: pathlib.Path, args) -> float | None:
    from train import evaluate

    if not args.files:
        return None
    argv = [str(export_dir), "--files", args.files] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate.main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])["eval_bpb"]


def _disk(export_dir: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in (export_dir / "params").rglob("*") if f.is_file())


def _exports(source: pathlib.Path, tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """float32, int8 and int8 + --embeddings exports of ``source`` under ``tmp``."""
    from train.checkpoints.exporting import export
    from train.compress.quantizing import quantize_source

    export(source, tmp / "float32")
    quantize_source(source, tmp / "int8")
    quantize_source(source, tmp / "int8+emb", embeddings=True)
    return {name: tmp / name for name in ("float32", "int8", "int8+emb")}


def _also(args, tmp: pathlib.Path) -> None:
    """Prints eval_bpb of each ``--also`` run and of its int8 export."""
    from train.checkpoints.sources import load_source
    from train.compress.quantizing import quantize_source

    for i, run in enumerate(filter(None, args.also.split(","))):
        out = tmp / f"also-{i}"
        quantize_source(pathlib.Path(run), out)
        quant = load_source(run).config.quant
        for weights, where in ((quant if quant != "none" else "float32", pathlib.Path(run)), ("int8", out)):
            record = {"model": run, "weights": weights, "eval_bpb": _bpb(where, args)}
            print(json.dumps({**record, "disk_bytes": _disk(out) if weights == "int8" else None}), flush=True)


def _classifier(args, tmp: pathlib.Path) -> None:
    """Prints accuracy and macro-F1 on SOURCE's whole validation split for its float32 and int8 exports."""
    import jax
    from flax import nnx

    from train import evaluate
    from train.checkpoints.sources import load_source
    from train.evaluation import evaluating, scoring

    setup = evaluating.setup(evaluate.parse_args([args.source]))
    rows = evaluating.rows(setup, "", "val")
    for name, export_dir in _exports(pathlib.Path(args.source), tmp).items():
        source = load_source(export_dir, mesh=setup.mesh)
        config = dataclasses.replace(setup.config, model=source.config)
        scored = dataclasses.replace(setup, source=dataclasses.replace(setup.source, model=source.model), config=config)
        result = scoring.score_examples(scored, rows, "val", export_dir)
        params = jax.tree.leaves(nnx.state(source.model, nnx.Param))
        record = {"model": args.source, "weights": name, "param_bytes": int(sum(x.nbytes for x in params)),
                  "disk_bytes": _disk(export_dir), "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
                  "eval_loss": result["eval_loss"], "examples": result["examples"]}  # fmt: skip
        print(json.dumps(record), flush=True)


def _models(args, tmp: pathlib.Path) -> dict[str, tuple]:
    """weights -> (model, disk bytes of params/ or None, eval_bpb or None); 'int8+emb': token tables too."""
    from models import build_model
    from models.quant import quantize_model
    from train.checkpoints.sources import load_source

    if not args.source:
        from benchmarks.train_throughput import presets

        cfg = dataclasses.replace(presets()["gpt-10m"][0], compute_dtype="float32")
        fp32, int8, both = build_model(cfg, seed=0), build_model(cfg, seed=0), build_model(cfg, seed=0)
        quantize_model(int8)
        quantize_model(both, embeddings=True)
        return {"float32": (fp32, None, None), "int8": (int8, None, None), "int8+emb": (both, None, None)}
    return {name: (load_source(d).model, _disk(d), _bpb(d, args)) for name, d in _exports(args.source, tmp).items()}


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.common import machine
    from models.generate import generate

    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(args.work or tmp)
        if args.classifier:
            return _classifier(args, work)
        models = _models(args, work)
        _also(args, work)
    vocab = models["float32"][0].cfg.vocab_size
    prompts = np.random.default_rng(0).integers(0, vocab, (args.batch, 64))
    times = {name: [] for name in models}
    for _ in range(args.repeats + 1 if args.repeats else 0):  # alternate, so both see the same CPU load
        for name, (model, _, _) in models.items():
            start = time.perf_counter()
            generate(model, prompts, args.new_tokens)
            times[name].append(time.perf_counter() - start)
    for name, (model, disk, bpb) in models.items():
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        record = {
            "model": args.source or "gpt-10m (random)",
            "weights": name,
            "param_bytes": int(sum(x.nbytes for x in params)),
            "disk_bytes": disk,
            "eval_bpb": bpb,
            "decode_tokens_per_sec": round(args.batch * args.new_tokens / statistics.median(times[name][1:]), 1)
            if args.repeats
            else None,
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            **machine(),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
