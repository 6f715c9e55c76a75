"""Analytic FLOPs, the peak table and MFU arithmetic (no timing)."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
from flax import nnx, traverse_util

from models import abstract_model
from models.config import ModelConfig
from train.config.sections import TrainConfig
from train.core import flops as metrics

GPT2_124M = ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024)
LLAMA3_8B = ModelConfig(
    vocab_size=128256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    d_ff=14336,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    tie_embeddings=False,
)


def test_gpt2_flops_per_token_is_6n_plus_12_lhqt():
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072  # q, k, v, o + two MLP matrices
    n = 12 * per_layer + 768 * 50257  # + the tied LM head
    attention = 12 * 12 * 12 * 64 * 1024  # 12 * layers * heads * head_dim * seq_len
    assert metrics.matmul_params(GPT2_124M) == n == 123_532_032
    assert metrics.flops_per_token(GPT2_124M, 1024) == 6 * n + attention == 854_438_400


def test_llama_gqa_flops_count_narrow_kv_and_three_mlp_matrices():
    attn = 4096 * 4096 * 2 + 4096 * 1024 * 2  # q, o: 32 heads; k, v: 8 kv heads of 128
    mlp = 3 * 4096 * 14336  # gate, up, down
    n = 32 * (attn + mlp) + 4096 * 128256  # + the untied head
    assert metrics.matmul_params(LLAMA3_8B) == n
    norms = 32 * 2 * 4096 + 4096
    assert n + 4096 * 128256 + norms == 8_030_261_248  # Llama-3-8B's published parameter count
    attention = 12 * 32 * 32 * 128 * 2048
    assert metrics.flops_per_token(LLAMA3_8B, 2048) == 6 * n + attention


TINY_T5_V11 = ModelConfig(  # configs/tiny-t5.yaml
    family="encoder_decoder",
    vocab_size=384,
    d_model=64,
    n_layers=2,
    n_decoder_layers=2,
    n_heads=4,
    d_ff=128,
    position="relative",
    norm="rmsnorm",
    mlp="gated_gelu",
    use_bias=False,
    scale_attention=False,
    tie_embeddings=False,
)
TINY_LLAMA = dataclasses.replace(LLAMA3_8B, vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192)


def kernel_sizes(cfg: ModelConfig) -> int:
    """Every matmul weight of the built model: the kernels of all layers, and the untied head."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(abstract_model(cfg)[1]))
    return sum(math.prod(x.shape) for path, x in flat.items() if path[-1] in ("kernel", "head"))


def test_tiny_t5_v11_counts_both_stacks_cross_attention_and_three_mlp_matrices():
    d, heads, hd, d_ff, vocab, seq, target = 64, 4, 16, 128, 384, 32, 8
    attn, kv, mlp = 4 * d * d, 2 * d * d, 3 * d * d_ff  # q, k, v, o; cross k, v; gated GELU: wg, wi, wo
    encoder_layer = attn + mlp
    decoder_layer = attn + attn + mlp  # self-attention, cross-attention, MLP
    head = d * vocab
    assert 2 * encoder_layer + 2 * decoder_layer + head == kernel_sizes(TINY_T5_V11)  # the inventory is the model's
    per_encoder_token = 6 * (2 * encoder_layer + 2 * kv) + 12 * 2 * heads * hd * seq
    per_decoder_token = 6 * (2 * (decoder_layer - kv) + head) + 12 * 2 * heads * hd * (target + seq)
    expected = per_encoder_token + per_decoder_token * target / seq
    assert expected == 838_656
    assert metrics.flops_per_token(TINY_T5_V11, seq, target) == expected
    # without a target length the decoder reads as many tokens as the encoder
    assert metrics.flops_per_token(TINY_T5_V11, seq) == per_encoder_token + 6 * 2 * (decoder_layer - kv) + 6 * head + (
        12 * 2 * heads * hd * 2 * seq
    )


def test_tiny_llama_counts_narrow_kv_and_three_mlp_matrices():
    d, kv_width, d_ff, vocab, seq = 64, 2 * 16, 192, 384, 64
    layer = 2 * d * d + 2 * d * kv_width + 3 * d * d_ff  # q, o; k, v over 2 kv heads; wg, wi, wo
    n = 2 * layer + d * vocab
    assert n == kernel_sizes(TINY_LLAMA) == metrics.matmul_params(TINY_LLAMA)
    assert metrics.flops_per_token(TINY_LLAMA, seq) == 6 * n + 12 * 2 * 4 * 16 * seq


def test_span_corruption_decodes_t5s_target_length():
    assert metrics.decoder_tokens(TrainConfig(objective="span_corruption", seq_len=512)) == 114  # T5's 512 -> 114
    assert metrics.decoder_tokens(TrainConfig(objective="seq2seq", target_len=48)) == 48


def test_head_counts_whether_tied_or_not():
    untied = dataclasses.replace(GPT2_124M, tie_embeddings=False)
    assert metrics.flops_per_token(untied, 256) == metrics.flops_per_token(GPT2_124M, 256)


def test_unresolved_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        metrics.flops_per_token(dataclasses.replace(GPT2_124M, vocab_size=0), 256)


def test_mfu_is_achieved_over_peak():
    assert metrics.mfu(tokens_per_sec=1000.0, flops_per_token=1e9, peak=4e12) == pytest.approx(0.25)
    assert metrics.mfu(1000.0, 1e9, peak=0.0) == 0.0


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
    ],
)
def test_peak_table_matches_device_kind(kind, peak):
    assert metrics.device_peak_flops(kind) == peak


def _devices(n: int, platform: str, kind: str) -> list:
    return [types.SimpleNamespace(platform=platform, device_kind=kind)] * n


def test_accelerator_peak_multiplies_by_device_count():
    peak, source = metrics.peak_flops(_devices(8, "tpu", "TPU v5 lite"))
    assert peak == 8 * 197e12
    assert "TPU v5 lite" in source


def test_unknown_accelerator_has_zero_peak():
    peak, source = metrics.peak_flops(_devices(1, "gpu", "Mystery GPU 9000"))
    assert peak == 0.0 and "unknown" in source


def test_cpu_peak_is_one_probe_for_the_whole_host_in_the_compute_dtype(monkeypatch):
    monkeypatch.setattr(metrics, "cpu_matmul_peak", {"float32": 80e9, "bfloat16": 600e9}.get)
    assert metrics.peak_flops(_devices(8, "cpu", "cpu"), "float32") == (80e9, "cpu float32 matmul probe")
    assert metrics.peak_flops(_devices(8, "cpu", "cpu"), "bfloat16") == (600e9, "cpu bfloat16 matmul probe")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_probe_measures_a_positive_rate(dtype):
    rate = metrics.cpu_matmul_peak(dtype, size=128, seconds=0.01)
    assert math.isfinite(rate) and rate > 0
