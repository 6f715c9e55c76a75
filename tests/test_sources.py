"""The one reader of model directories (train/checkpoints/sources.py): every export carries its tokenizer, and
every command that takes a model source reads a run and an export of every kind alike."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import jax
import numpy as np
import pytest
from cli_runs import REPO, in_this_process
from flax import nnx, traverse_util

from models import build_model
from models.config import ModelConfig
from train import evaluate, export, generate, prune, quantize
from train.checkpoints import exporting, sources
from train.data.tokenizer import ByteTokenizer, HFTokenizer

TOKENIZER = "data/tokenizers/shakespeare-bpe-1024"
FAST = [
    "configs/tiny-gpt2.yaml",
    f"data.tokenizer={TOKENIZER}",
    "data.train_files=data/shakespeare/tempest.txt",  # not all the plays: BPE-encoding those takes seconds
    "data.val_files=data/shakespeare/macbeth.txt",
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=0",
    "train.seq_len=32",
    "train.batch_size=16",
    "train.steps=2",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6
# model source -> the command that makes it from the base run (or from the LoRA run: lora-adapters). Pruning
# writes both methods' output alike; a magnitude-pruned export also loads and runs as "params" does (the same
# shapes), so the neuron-pruned one (a smaller d_ff) stands for both.
EXPORTS = {
    "params": (export.main, []),
    "hf": (export.main, ["--format", "hf"]),
    "checkpoint": (export.main, ["--format", "checkpoint"]),
    "int8": (quantize.main, []),
    "neurons": (prune.main, ["--method", "neurons", "--sparsity", "0.5"]),
}
SAME_MODEL = ("run", "params", "hf", "checkpoint")  # the base run's parameters, unchanged


def cli(command, argv: list[str]) -> tuple[int, str, str]:
    """(status, stdout, stderr) of a ``python -m train.*`` main run here, from the repository root."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = command(argv)
    return status, out.getvalue(), err.getvalue()


def scores(source: pathlib.Path, text: pathlib.Path) -> dict:
    status, out, err = cli(evaluate.main, [str(source), "--files", str(text), "--seq-len", "32", "--batch", "8"])
    assert status == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def sources_dir(tmp_path_factory) -> dict:
    """A tiny GPT-2 run with a BPE tokenizer, a LoRA run on it, and an export of every kind."""
    root = tmp_path_factory.mktemp("sources")
    dirs = {"root": root, "run": root / "run", "lora-run": root / "lora-run", "text": root / "text.txt"}
    dirs["text"].write_text(TEXT)
    assert in_this_process([*FAST, f"run.dir={dirs['run']}"]).rc == 0
    lora = [*FAST, f"run.dir={dirs['lora-run']}", "lora.rank=2", f"checkpoint.init_from={dirs['run']}"]
    assert in_this_process(lora).rc == 0
    for name, (command, flags) in EXPORTS.items():
        dirs[name] = root / name
        assert cli(command, [str(dirs["run"]), str(dirs[name]), *flags])[0] == 0, name
    dirs["lora-adapters"] = root / "lora-adapters"
    assert cli(export.main, [str(dirs["lora-run"]), str(dirs["lora-adapters"])])[0] == 0
    dirs["scores"] = scores(dirs["run"], dirs["text"])
    return dirs


def flat_params(model) -> dict:
    return traverse_util.flatten_dict(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["run", *EXPORTS, "lora-run", "lora-adapters"])
def test_every_export_carries_the_tokenizer_and_is_evaluated_exported_and_generated_from(sources_dir, tmp_path, kind):
    source = sources_dir[kind]
    loaded = sources.load_source(source)
    assert isinstance(loaded.tokenizer, HFTokenizer) and loaded.tokenizer.vocab_size == 1024

    got = scores(source, sources_dir["text"])
    reference = sources_dir["scores"]
    assert got["tokens"] == reference["tokens"] > 0
    if kind in SAME_MODEL:  # a Hugging Face directory does not keep compute_dtype: it computes in the default
        assert got["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-3 if kind == "hf" else 1e-5)
    elif kind == "int8":
        assert got["eval_loss"] == pytest.approx(reference["eval_loss"], rel=0.02)
    else:
        assert np.isfinite(got["eval_loss"])

    status, out, err = cli(export.main, [str(source), str(tmp_path / "again")])
    assert status == 0 and out.startswith("exported "), err
    again = sources.load_source(tmp_path / "again")
    assert again.config == loaded.config and isinstance(again.tokenizer, HFTokenizer)
    theirs, ours = flat_params(again.model), flat_params(loaded.model)
    assert theirs.keys() == ours.keys()
    for path in ours:
        np.testing.assert_array_equal(theirs[path], ours[path], err_msg=str(path))

    status, out, err = cli(generate.main, [str(source), "--prompt", "To be", "--max-new-tokens", "4", "--top-k", "1"])
    assert status == 0 and out.startswith("To be") and len(out) > len("To be"), err


def test_an_export_of_a_byte_tokenizer_model_reads_back_the_byte_tokenizer(tmp_path):
    cfg = ModelConfig(family="decoder", vocab_size=257, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
    exporting.write_params(nnx.state(build_model(cfg, 0), nnx.Param), cfg, tmp_path / "out", ByteTokenizer())
    assert json.loads((tmp_path / "out" / "byte_tokenizer.json").read_text())["tokenizer"] == "byte"
    source = sources.load_source(tmp_path / "out")
    assert isinstance(source.tokenizer, ByteTokenizer) and source.kind == "export"
