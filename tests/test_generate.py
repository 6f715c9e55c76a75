"""Generation: greedy tokens equal transformers' generate() on GPT-2, Llama (GQA) and T5 v1.0/v1.1,
with and without the KV cache; ragged batches, eos, sampling, streaming and sharded decoding; post-norm
stacks; the position limit of every family. (The CLI against transformers: tests/test_generate_cli.py.)

Reference models are tiny, random, built here from configs and saved with save_pretrained.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import build_model, hf
from models.config import ModelConfig
from models.generate import Sampling, _prefill, generate, pad_prompts, sample, stream

NEW = 8  # new tokens per test
T5 = {"vocab_size": 96, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4}
T5 |= {"relative_attention_num_buckets": 8, "relative_attention_max_distance": 20, "decoder_start_token_id": 0}
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "llama-gqa": lambda: transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "t5-v1.0": lambda: transformers.T5Config(**T5, feed_forward_proj="relu"),
    "t5-v1.1": lambda: transformers.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
PROMPT_LENGTHS = (3, 9, 6)  # ragged: left-padded to a bucket of 16 for decoders


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, torch model, our fp32 model, ragged prompts)."""
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    auto = transformers.AutoModelForSeq2SeqLM if request.param.startswith("t5") else transformers.AutoModelForCausalLM
    theirs = auto.from_config(config).eval()
    path = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(path)
    ours, _ = hf.load(path, compute_dtype="float32")
    rng = np.random.default_rng(1)
    return request.param, theirs, ours, [rng.integers(2, 90, n) for n in PROMPT_LENGTHS]


def hf_generate(name: str, model, prompts: list, new: int, eos: int | None = None, pad: int = 0) -> np.ndarray:
    """transformers' greedy tokens on the same padded batch (left for decoders), pad after eos, [B, new]."""
    seq2seq = name.startswith("t5")
    tokens, mask = pad_prompts(prompts, None, pad, left=not seq2seq)
    with torch.no_grad():
        out = model.generate(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            use_cache=not seq2seq,  # transformers' T5 cache assumes as many decoder layers as encoder layers
        ).numpy()
    out = out[:, 1:] if seq2seq else out[:, tokens.shape[1] :]
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=pad)  # it stops when all rows ended


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "recompute"])
def test_greedy_tokens_equal_transformers_generate_on_a_ragged_batch(pair, cache):
    name, theirs, ours, prompts = pair
    np.testing.assert_array_equal(generate(ours, prompts, NEW, cache=cache), hf_generate(name, theirs, prompts, NEW))


@pytest.mark.parametrize("pair", ["gpt2", "llama-gqa"], indirect=True)
def test_each_row_of_a_ragged_batch_gets_the_tokens_it_gets_alone(pair):
    _, _, ours, prompts = pair
    alone = np.concatenate([generate(ours, [p], NEW) for p in prompts])
    np.testing.assert_array_equal(generate(ours, prompts, NEW), alone)


@pytest.mark.parametrize("pair", ["gpt2"], indirect=True)
def test_a_padded_array_with_a_mask_equals_the_ragged_list(pair):
    _, _, ours, prompts = pair
    right = np.zeros((3, 9), np.int64)
    mask = np.zeros((3, 9), np.int64)
    for i, p in enumerate(prompts):
        right[i, : len(p)], mask[i, : len(p)] = p, 1  # right padding: the mask says where
    np.testing.assert_array_equal(generate(ours, right, NEW, mask=mask), generate(ours, prompts, NEW))


@pytest.mark.parametrize("pair", ["gpt2", "t5-v1.1"], indirect=True)
def test_rows_are_padding_after_eos_as_in_transformers(pair):
    name, theirs, ours, prompts = pair
    greedy = generate(ours, prompts, NEW, start_id=0)
    end = next((j for j in range(1, NEW) if greedy[0, j] not in greedy[0, :j]), 0)
    eos = int(greedy[0, end])  # row 0 ends there
    got = generate(ours, prompts, NEW, eos_id=eos, pad_id=5, start_id=0)  # T5 starts from 0 as its config says
    np.testing.assert_array_equal(got, hf_generate(name, theirs, prompts, NEW, eos=eos, pad=5))
    assert list(got[0, : end + 1]) == list(greedy[0, : end + 1]) and (got[0, end + 1 :] == 5).all()


@pytest.mark.parametrize("pair", ["llama-gqa"], indirect=True)
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "recompute"])
def test_any_of_several_stop_ids_ends_a_row_as_an_eos_token_id_list_does_in_transformers(pair, cache):
    name, theirs, ours, prompts = pair
    greedy = generate(ours, prompts, NEW)
    fresh = [[j for j in range(1, NEW) if greedy[i, j] not in greedy[i, :j]] for i in range(2)]
    stops = [int(greedy[0, fresh[0][0]]), int(greedy[1, fresh[1][-1]])]  # row 0 ends early, row 1 late
    got = generate(ours, prompts, NEW, eos_id=stops, pad_id=5, cache=cache)
    np.testing.assert_array_equal(got, hf_generate(name, theirs, prompts, NEW, eos=stops, pad=5))
    assert (got[0, fresh[0][0] + 1 :] == 5).all() and got[1, fresh[1][-1]] == stops[1]


@pytest.mark.parametrize("pair", ["llama-gqa"], indirect=True)
def test_cached_and_recomputed_sampling_draw_the_same_tokens(pair):
    _, _, ours, prompts = pair
    kwargs = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 3}
    sampled = generate(ours, prompts, NEW, **kwargs)
    np.testing.assert_array_equal(sampled, generate(ours, prompts, NEW, cache=False, **kwargs))
    assert not np.array_equal(sampled, generate(ours, prompts, NEW, **(kwargs | {"seed": 4})))


@pytest.mark.parametrize("pair", ["gpt2"], indirect=True)
def test_streamed_pieces_join_into_the_generated_tokens(pair):
    _, _, ours, prompts = pair
    pieces = list(stream(ours, prompts, NEW + 2, chunk=4, temperature=0.7, seed=1))
    assert [p.shape[1] for p in pieces] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(pieces, 1), generate(ours, prompts, NEW + 2, temperature=0.7, seed=1))


def test_sampling_keeps_only_the_top_k_and_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 400)

    def draws(temperature, top_k, top_p):
        s = Sampling(np.float32(temperature), np.float32(top_p), np.int32(-1), np.int32(0))
        fn = jax.vmap(lambda k: sample(logits, k, s, top_k=top_k, greedy=False, nucleus=top_p < 1)[0])
        return set(np.asarray(fn(keys)).tolist())

    assert draws(1.0, 0, 1.0) == {0, 1, 2, 3}
    assert draws(1.0, 2, 1.0) == {0, 1}
    assert draws(1.0, 0, 0.5) == {0}  # token 0 alone reaches 0.5
    assert draws(1.0, 0, 0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8: token 2 is outside the nucleus
    assert draws(1.0, 3, 0.9) == {0, 1, 2}


def test_sharded_generation_equals_one_device_and_the_cache_is_sharded(tmp_path):
    from sharding.mesh import make_mesh
    from sharding.rules import RULES, activation_context
    from train.config.sections import MeshConfig

    assert jax.device_count() >= 8, "conftest asks for 8 fake CPU devices"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(CONFIGS["llama-gqa"]()).save_pretrained(tmp_path / "llama")
    transformers.AutoModelForSeq2SeqLM.from_config(CONFIGS["t5-v1.1"]()).save_pretrained(tmp_path / "t5")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    prompts = [np.arange(2, 2 + n) for n in (3, 9, 6, 5)]  # 4 rows over data x fsdp
    kv = P(None, ("data", "fsdp"), "tensor", None, None)  # [layers, B, kv_heads, S, head_dim]
    for name in ("llama", "t5"):
        single, _ = hf.load(tmp_path / name, compute_dtype="float32")
        sharded, _ = hf.load(tmp_path / name, mesh=mesh, rules=RULES, compute_dtype="float32")
        with activation_context(mesh):
            got = generate(sharded, prompts, NEW)
            tokens, mask = pad_prompts(prompts, None, 0, left=name == "llama")
            decoding = _prefill(*nnx.split(sharded), tokens, mask, 0, 24)
        np.testing.assert_array_equal(got, generate(single, prompts, NEW), err_msg=name)
        for array, spec in [
            (decoding.cache.k, kv),
            (decoding.cache.v, kv),
            (decoding.cache.valid, P(("data", "fsdp"))),
        ]:
            assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), (name, array.sharding)
        if name == "t5":
            assert decoding.cache.cross_k.sharding.is_equivalent_to(NamedSharding(mesh, kv), 5)


@pytest.mark.parametrize("pair", ["gpt2"], indirect=True)
def test_generation_refuses_encoders_and_sequences_past_learned_positions(pair):
    _, _, ours, prompts = pair
    encoder = build_model(ModelConfig(family="encoder", vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64), 0)
    with pytest.raises(ValueError, match="cannot generate"):
        generate(encoder, prompts, NEW)
    with pytest.raises(ValueError, match="exceeds the model's 32 positions; generate at most 23"):
        generate(ours, prompts, 24)  # gpt2: 32 learned positions, the longest prompt has 9 tokens


@pytest.mark.parametrize("pair", ["llama-gqa", "t5-v1.0"], indirect=True)
def test_rope_and_t5_models_refuse_sequences_past_max_seq_len_as_the_cli_does(pair):
    name, _, ours, prompts = pair
    n = ours.cfg.max_seq_len  # llama: 64 rope positions; T5: 512 (n_positions) for its relative buckets
    if name == "llama-gqa":  # the longest prompt has 9 tokens
        refused = {"9 tokens plus 56 new ones exceeds the model's 64 positions; generate at most 55": (prompts, 56)}
    else:
        refused = {
            f"{n + 1} new tokens exceed the decoder's {n} positions; generate at most {n}": (prompts, n + 1),
            f"a prompt of {n + 1} tokens exceeds the encoder's {n} positions": ([np.full(n + 1, 5)], 1),
        }
    for message, (rows, new) in refused.items():
        with pytest.raises(ValueError, match=message):
            generate(ours, rows, new)


@pytest.mark.parametrize("pair", ["llama-gqa"], indirect=True)
def test_top_k_above_the_vocabulary_keeps_every_token_as_transformers_clamps_it(pair):
    _, _, ours, prompts = pair
    kwargs = {"temperature": 1.5, "seed": 3}
    every_token = generate(ours, prompts, NEW, **kwargs)
    np.testing.assert_array_equal(generate(ours, prompts, NEW, top_k=10**6, **kwargs), every_token)
    assert not np.array_equal(generate(ours, prompts, NEW, top_k=1, **kwargs), every_token)  # top-k matters here


def test_post_norm_decoders_decode_from_the_cache_as_a_full_forward_does():
    shape = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_seq_len": 32}
    model = build_model(ModelConfig(**shape, post_norm=True, compute_dtype="float32", init_std=0.5), 0)
    prompts = [np.arange(2, 2 + n) for n in PROMPT_LENGTHS]
    cached = generate(model, prompts, NEW)
    forward = jax.jit(lambda tokens: model(tokens))  # the plain causal forward: what follows a slot cannot change it
    n = PROMPT_LENGTHS[1]
    tokens = np.zeros((1, n + NEW), np.int32)
    tokens[0, :n] = prompts[1]
    for i in range(n, n + NEW):  # the longest row, greedily extended
        tokens[0, i] = np.argmax(forward(tokens)[0, i - 1])
    np.testing.assert_array_equal(cached[1], tokens[0, n:])
    assert len(set(cached[1].tolist())) > 1  # not a constant row


def test_the_compiled_decode_loop_copies_no_weights_and_transposes_no_cache():
    """Per token, XLA:CPU copies what the loop slices: a scanned stack's weights (models.transformer.split_layers
    slices them once, before the loop) and, with slots before heads, each layer's cache transposed for the
    score matmul (models/cache.py keeps heads before slots)."""
    from models import generate as decoding

    cfg = ModelConfig(
        vocab_size=50, d_model=24, n_layers=3, n_heads=2, d_ff=40, max_seq_len=32, compute_dtype="float32"
    )
    model, batch, slots = build_model(cfg, 0), 3, 16
    tokens, mask = pad_prompts([np.arange(2, 6)] * batch, None, 0, left=True)
    graphdef, state = nnx.split(model)
    start = decoding._prefill(graphdef, state, tokens, mask, 0, slots)
    greedy = Sampling(np.float32(1.0), np.float32(1.0), np.array([-1], np.int32), np.int32(0))
    static = {"steps": 4, "top_k": 0, "greedy": True, "nucleus": False}
    hlo = decoding._decode.lower(graphdef, state, start, jax.random.key(0), greedy, **static).compile().as_text()
    in_loop = [line for line in hlo.splitlines() if "jit(_decode)/while/body" in line and " = " in line]
    kernels = ("f32[24,40]", "f32[40,24]", "f32[24,24]")  # a layer's MLP and attention kernels
    slices = [line for line in in_loop if "slice" in line and any(f" = {k}" in line for k in kernels)]
    layer_cache = f"f32[{batch},2,{slots},12]"  # [B, kv_heads, S, head_dim]
    transposes = [line for line in in_loop if "transpose" in line.split("metadata")[0] and layer_cache in line]
    assert not slices, slices[:2]
    assert not transposes, transposes[:2]
    assert any(layer_cache in line for line in in_loop)  # the search looks at the right shapes


@pytest.mark.slow
def test_cli_streams_the_greedy_continuation_and_refuses_bad_sources(tmp_path, capsys):
    from train.data.tokenizer import ByteTokenizer
    from train.generate import main

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=257, n_positions=40, n_embd=32, n_layer=2, n_head=4)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    bert = transformers.BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    transformers.BertForMaskedLM(bert).save_pretrained(tmp_path / "bert")
    byte = ByteTokenizer()
    ours, _ = hf.load(tmp_path / "gpt2")
    expected = generate(ours, [byte.encode("To be")], 35, eos_id=byte.eos_id, pad_id=byte.eos_id)[0]
    expected = byte.decode(expected[: list(expected).index(byte.eos_id)] if byte.eos_id in expected else expected)

    args = [str(tmp_path / "gpt2"), "--prompt", "To be", "--tokenizer", "byte", "--temperature", "0"]
    assert main(args) == 0
    assert capsys.readouterr().out == "To be" + expected + "\n"  # the default fills the 40 positions
    bad = {
        "nowhere": [str(tmp_path / "nowhere"), "--prompt", "x"],
        "encoder": [str(tmp_path / "bert"), "--prompt", "x", "--tokenizer", "byte"],
        "long prompt": [*args[:2], "x" * 41, *args[3:]],
        "no tokenizer": [str(tmp_path / "gpt2"), "--prompt", "x"],
    }
    for name, argv in bad.items():
        assert main(argv) == 2, name
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == len(bad) and all(line.startswith("error: ") for line in lines), lines
    assert "cannot generate text" in lines[1] and "has 41 tokens but the model has 40 positions" in lines[2]
