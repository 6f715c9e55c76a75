"""Model FLOPs utilisation: analytic training FLOPs per token, peak FLOP/s per device kind, MFU.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs counted analytically (as in
PaLM / nanoGPT): recomputation under remat and padding do not count as useful work.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from models.attention import attention_flops_per_token
from models.config import ModelConfig
from train.config.sections import TrainConfig

# bf16 dense peak FLOP/s of one device, by a substring of ``device.device_kind``.
# Ordered: the first match wins, so the longer names come before their prefixes.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports itself as plain 'TPU v5'
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def _attention_params(cfg: ModelConfig) -> int:
    """q, o: heads; k, v: kv_heads."""
    return cfg.d_model * cfg.dim_per_head * (2 * cfg.n_heads + 2 * cfg.kv_heads)


def _mlp_params(cfg: ModelConfig) -> int:
    """Gated MLPs (swiglu, gated_gelu) have a third matrix."""
    return (3 if cfg.mlp in ("swiglu", "gated_gelu") else 2) * cfg.d_model * cfg.d_ff


def _head_params(cfg: ModelConfig) -> int:
    """The LM head, tied or not, and BERT's dense transform before it; a classification head reads
    one token per sequence and is not counted, a token-classification head reads every token."""
    if cfg.head == "token_classification":
        return cfg.d_model * cfg.num_labels
    if cfg.head != "lm":
        return 0
    transform = cfg.d_model * cfg.d_model if cfg.family == "encoder" else 0
    return cfg.d_model * cfg.vocab_size + transform


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token of a one-stack model (decoder, encoder).

    The embedding lookup, learned positions, norms and biases are not counted.
    """
    return cfg.n_layers * (_attention_params(cfg) + _mlp_params(cfg)) + _head_params(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int, target_len: int = 0) -> float:
    """Training (forward + backward) FLOPs per input token: 6 × matmul weights + attention scores/values.

    Encoder-decoders (T5) count per encoder token (``seq_len`` of them per sequence) the encoder
    stack, plus the decoder stack (self-attention, cross-attention, MLP, head) for its
    ``target_len`` tokens (0: ``seq_len``) scaled by ``target_len / seq_len``; the cross-attention
    keys and values are projected once per encoder token. ``cfg.vocab_size`` must be resolved.
    """
    if cfg.vocab_size <= 0:
        raise ValueError("flops_per_token needs a resolved vocab_size; set model.vocab_size first")
    if cfg.family != "encoder_decoder":
        return 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
    target_len = target_len or seq_len
    attn, kv = _attention_params(cfg), cfg.d_model * cfg.dim_per_head * 2 * cfg.kv_heads
    encoder = 6.0 * cfg.n_layers * (attn + _mlp_params(cfg)) + attention_flops_per_token(cfg, seq_len)
    encoder += 6.0 * cfg.decoder_layers * kv  # cross-attention k, v of each encoder token
    decoder_weights = cfg.decoder_layers * (2 * attn - kv + _mlp_params(cfg)) + _head_params(cfg)
    decoder_layers = dataclasses.replace(cfg, n_layers=cfg.decoder_layers)
    scores = attention_flops_per_token(decoder_layers, target_len) + attention_flops_per_token(decoder_layers, seq_len)
    return encoder + (6.0 * decoder_weights + scores) * target_len / seq_len


def decoder_tokens(train: TrainConfig) -> int:
    """Decoder tokens per sequence of an encoder-decoder objective (``flops_per_token``'s target_len)."""
    if train.objective == "span_corruption":
        from train.data.objectives import span_corruption_lengths

        return span_corruption_lengths(train.seq_len, train.noise_density, train.mean_span)[1]
    return train.target_len


def device_peak_flops(device_kind: str) -> float | None:
    """bf16 dense peak FLOP/s of one accelerator of this kind, or None when not in the table."""
    for name, peak in PEAK_FLOPS:
        if name in device_kind:
            return peak
    return None


@functools.cache
def cpu_matmul_peak(dtype: str = "float32", size: int = 1536, seconds: float = 0.3) -> float:
    """FLOP/s of the host's fastest [size, size] matmul in ``dtype`` over about ``seconds`` of tries.

    The probe multiplies the way the model does: operands in the compute dtype, float32 results
    (``models.layers.matmul``). On CPUs with AMX or AVX512-BF16 a bf16 matmul is several times
    faster than a float32 one, so MFU is only fair against the probe of the compute dtype.
    Measured once per process and dtype. This is the whole host's peak: fake CPU devices share the cores.
    """
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()  # compile + wake the thread pool
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
        if start > deadline:
            return 2.0 * size**3 / best


def peak_flops(devices: list | None = None, compute_dtype: str = "bfloat16") -> tuple[float, str]:
    """Total peak FLOP/s of ``devices`` (default: all) and where the number comes from.

    Accelerators: the bf16 table × the device count. CPU: one measured matmul probe in
    ``compute_dtype`` for the host, whatever the (fake) device count. Unknown accelerators: 0.0.
    """
    devices = list(jax.devices() if devices is None else devices)
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return cpu_matmul_peak(compute_dtype), f"cpu {compute_dtype} matmul probe"
    peak = device_peak_flops(kind)
    if peak is None:
        return 0.0, f"unknown device kind {kind!r}"
    return peak * len(devices), f"table bf16: {len(devices)} x {kind}"


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float) -> float:
    """Fraction of ``peak`` FLOP/s achieved; 0.0 when the peak is unknown (<= 0)."""
    return tokens_per_sec * flops_per_token / peak if peak > 0 else 0.0
