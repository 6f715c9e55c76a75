"""The serving export (train/checkpoints/serving.py): jax.export programs that equal the live model,
for any batch size, and load in a Python that has never seen meshlm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import build_model
from models.config import ModelConfig
from models.generate import generate
from train.checkpoints.serving import export_serving, load_weights

TINY = {
    "vocab_size": 300,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "d_ff": 64,
    "max_seq_len": 32,
    "compute_dtype": "float32",
}
LLAMA = {"position": "rope", "norm": "rms", "mlp": "swiglu", "n_kv_heads": 2, "tie_embeddings": False}


def _load(path):
    return jax.export.deserialize(bytearray(path.read_bytes()))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    cfg = ModelConfig(family="decoder", **TINY, **LLAMA)
    model = build_model(cfg, seed=0)
    out = tmp_path_factory.mktemp("serving") / "llama"
    export_serving(model, cfg, out, eos_id=256)
    return model, out


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder"])
def test_the_exported_forward_equals_the_model_at_two_batch_sizes(family, tmp_path):
    cfg = ModelConfig(family=family, **TINY)
    model = build_model(cfg, seed=1)
    export_serving(model, cfg, tmp_path, eos_id=256)
    forward, weights = _load(tmp_path / "forward.jaxexport"), load_weights(tmp_path)
    for batch in (1, 3):
        length = 32 if family == "encoder_decoder" else 12
        x = np.random.RandomState(batch).randint(0, 256, (batch, length)).astype(np.int32)
        mask = np.ones_like(x)
        if family == "decoder":
            want, got = model(x), forward.call(weights, x)
        elif family == "encoder":
            want, got = model(x, mask), forward.call(weights, x, mask)
        else:
            want, got = model.decode(x, model.encode(x, mask), mask), forward.call(weights, x, mask, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert json.loads((tmp_path / "serving.json").read_text())["family"] == family


def test_exported_prefill_and_decode_give_generates_greedy_tokens_on_ragged_prompts(llama):
    model, out = llama
    prefill, decode, weights = _load(out / "prefill.jaxexport"), _load(out / "decode.jaxexport"), load_weights(out)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5]]
    tokens = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], np.int32)  # left-padded
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    logits, k, v, valid, index, positions = prefill.call(weights, tokens, mask)
    greedy = []
    for _ in range(6):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        greedy.append(np.asarray(token))
        logits, k, v, valid, index = decode.call(weights, token, positions, k, v, valid, index)
        positions = positions + 1
    np.testing.assert_array_equal(np.stack(greedy, axis=1), generate(model, prompts, 6))


@pytest.mark.slow
def test_the_export_runs_in_a_python_without_meshlm(llama, tmp_path):
    model, out = llama
    script = (  # meshlm's packages cannot be imported in the child, installed or not
        "import sys\n"
        "class NoMeshlm:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('models', 'sharding', 'train'): raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoMeshlm())\n"
        "import jax, numpy as np\n"
        "d = sys.argv[1]\n"
        "exp = jax.export.deserialize(bytearray(open(d + '/forward.jaxexport', 'rb').read()))\n"
        "w = np.load(d + '/weights.npz'); x = np.arange(10, dtype=np.int32).reshape(2, 5)\n"
        "np.save(sys.argv[2], np.asarray(exp.call([w[k] for k in sorted(w.files)], x)))\n"
        "assert not {'models', 'sharding', 'train'} & {m.split('.')[0] for m in sys.modules}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "y.npy")], cwd=tmp_path, env=env, check=True)
    want = model(np.arange(10, dtype=np.int32).reshape(2, 5))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(want), atol=1e-5)


@pytest.mark.slow
def test_train_export_format_stablehlo_writes_a_serving_export_of_a_model_source(tmp_path):
    import torch
    import transformers

    from train import export
    from train.checkpoints.sources import load_source

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=260, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    assert export.main([str(tmp_path / "hf"), str(tmp_path / "out"), "--format", "stablehlo"]) == 0
    forward, weights = _load(tmp_path / "out" / "forward.jaxexport"), load_weights(tmp_path / "out")
    x = np.arange(20, dtype=np.int32).reshape(2, 10)
    want = load_source(tmp_path / "hf").model(x)
    np.testing.assert_allclose(np.asarray(forward.call(weights, x)), np.asarray(want), atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:3] == [
        "decode.jaxexport",
        "forward.jaxexport",
        "prefill.jaxexport",
    ]
