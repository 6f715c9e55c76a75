"""Model configuration: the one small dataclass every model module receives."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Transformer.

    GPT-2 style: ``position='learned', norm='layernorm', mlp='gelu', use_bias=True,
    tie_embeddings=True``. Llama style: ``position='rope', norm='rmsnorm', mlp='swiglu',
    use_bias=False, tie_embeddings=False`` with ``n_kv_heads < n_heads`` for GQA.
    """

    family: Literal["decoder"] = "decoder"
    vocab_size: int = 0  # 0: the tokenizer's size rounded up to a multiple of 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no grouping)
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 1024
    max_seq_len: int = 1024
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    scan_layers: bool = True
    remat: Literal["none", "full", "save_dots"] = "none"
    attention: Literal["xla", "cudnn"] = "xla"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def problems(self) -> list[str]:
        """Impossible combinations, each as 'what is wrong; how to fix it'."""
        out = []
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                out.append(f"model.{name} must be positive; set it to a value > 0")
        if self.vocab_size < 0:
            out.append("model.vocab_size must be >= 0 (0 takes the tokenizer's size)")
        if self.n_heads > 0 and not self.head_dim and self.d_model % self.n_heads:
            out.append(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "change one of them or set model.head_dim"
            )
        if self.n_heads > 0 and self.kv_heads > 0 and self.n_heads % self.kv_heads:
            out.append(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}; "
                "pick n_kv_heads that divides n_heads"
            )
        if self.position == "rope" and self.dim_per_head % 2:
            out.append("rotary positions need an even head dimension; change model.head_dim")
        return out
