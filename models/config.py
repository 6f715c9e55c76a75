"""Model configuration: the one small dataclass every model module receives, and ``ConfigError``."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key and the fix.

    Raised by every layer (models, sharding, train); the CLIs print it as one ``error:`` line.
    """


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Transformer.

    GPT-2 style: ``position='learned', norm='layernorm', mlp='gelu', use_bias=True,
    tie_embeddings=True``. Llama style: ``position='rope', norm='rmsnorm', mlp='swiglu',
    use_bias=False, tie_embeddings=False`` with ``n_kv_heads < n_heads`` for GQA.
    BERT (``family='encoder'``): ``position='learned', norm='layernorm', norm_eps=1e-12,
    mlp='gelu_exact', post_norm=True, type_vocab_size=2``. T5 (``family='encoder_decoder'``):
    ``position='relative', norm='rmsnorm', norm_eps=1e-6, use_bias=False, scale_attention=False``
    with ``mlp='relu', tie_embeddings=True`` (v1.0) or ``mlp='gated_gelu', tie_embeddings=False`` (v1.1).
    """

    family: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    vocab_size: int = 0  # 0: the tokenizer's size rounded up to a multiple of 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no grouping)
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 1024
    max_seq_len: int = 1024
    position: Literal["learned", "rope", "relative"] = "learned"  # relative: T5 buckets
    rope_theta: float = 10000.0
    # scaled rotary frequencies of long-context checkpoints (models.layers.rope_frequencies; HF rope_parameters):
    # linear / dynamic (NTK, exact up to max_seq_len) / llama3 (Llama 3.1+) / yarn; none: plain theta ** (-2i/d)
    rope_scaling: Literal["none", "linear", "dynamic", "llama3", "yarn"] = "none"
    rope_factor: float = 1.0
    rope_original_max_len: int = 0  # llama3 / yarn: the pre-training context length
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float = 0.0  # yarn: cos/sin multiplier; 0: 0.1 ln(rope_factor) + 1
    sliding_window: int = 0  # decoder: a query attends to the sliding_window newest keys only (Mistral); 0: all
    qkv_bias: bool = False  # biases on the q, k, v projections even when use_bias is false (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim of queries and keys before rope (Qwen3)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    # gelu: tanh approximation (GPT-2, HF 'gelu_new'); gelu_exact: erf (BERT, HF 'gelu');
    # relu (T5 v1.0); gated_gelu: gelu_new(wg x) * wi x (T5 v1.1); swiglu: silu(wg x) * wi x (Llama)
    mlp: Literal["gelu", "gelu_exact", "relu", "gated_gelu", "swiglu"] = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    # auto: resolved by the run (train.precision) to the dtype fast on its hardware before any model is built
    compute_dtype: Literal["bfloat16", "float32", "auto"] = "bfloat16"
    scan_layers: bool = True
    remat: Literal["none", "full", "save_dots"] = "none"
    # xla: jax.nn.dot_product_attention; recompute: XLA attention that recomputes the probabilities in
    # the backward pass (models/dot_attention.py); cudnn: flash attention on NVIDIA GPUs; splash: Pallas, TPU
    attention: Literal["xla", "recompute", "cudnn", "splash"] = "xla"
    # encoder / encoder-decoder families (defaults leave the decoder unchanged)
    post_norm: bool = False  # x = norm(x + f(x)) as BERT, instead of x + f(norm(x))
    scale_attention: bool = True  # False: no 1/sqrt(head_dim) on scores (T5 folds it into the query init)
    type_vocab_size: int = 0  # encoder: token-type (segment) embeddings; 0: none
    relative_buckets: int = 32  # position='relative': T5 relative_attention_num_buckets
    relative_max_distance: int = 128  # position='relative': T5 relative_attention_max_distance
    n_decoder_layers: int = 0  # encoder_decoder: decoder depth; 0: same as n_layers
    # encoder: MLM logits [B, T, V], class logits [B, C] or per-token class logits [B, T, C] (token_classification)
    head: Literal["lm", "classification", "token_classification"] = "lm"
    num_labels: int = 2  # head='classification' / 'token_classification': number of classes
    pooling: Literal["cls", "mean"] = "cls"  # head='classification': the [CLS] state (BERT) or the mean over tokens
    # training only (a forward given an rng key); off in eval, generation and parity
    dropout: float = 0.0  # on the embeddings and every residual branch (and BERT's pooled output)
    attention_dropout: float = 0.0  # on the attention probabilities; needs attention='recompute'
    # LoRA adapters (models/lora.py), set from the run's ``lora:`` section; 0: none
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "(.*/)?(attn|cross)/(q|k|v|o)"
    lora_dropout: float = 0.0  # on the adapters' input inside the blocks (training only)
    # the other parameter-efficient methods (models/peft.py), set from the run's ``peft:`` section; 0: off
    adapter_size: int = 0  # bottleneck adapters after every attention and MLP sub-layer
    prefix_length: int = 0  # learned keys/values per self-attention, behind a zero-initialised gate
    prefix_hidden: int = 0  # prefix_length: width of their reparameterisation MLP (0: none); exports fold it
    prompt_length: int = 0  # learned input embeddings of the (encoder) stack, behind the same gate
    # weight-only int8 (models/quant.py): every Dense whose path (e.g. 'stack/blocks/mlp/wi') does not match
    # the regex quant_skip holds an int8 kernel (int8: written by python -m train.quantize), or, for
    # quantisation-aware training (qat), a float kernel the forward pass reads rounded to int8
    quant: Literal["none", "int8", "qat"] = "none"
    quant_skip: str = ""
    quant_embeddings: bool = False  # token tables and LM heads (tied or not) too

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the saved model config") -> ModelConfig:
        """The config a saved dict describes (model.json, a checkpoint's run config, an export).

        Raises ConfigError naming ``where`` on keys this version does not know or impossible values.
        """
        if not isinstance(values, dict):
            raise ConfigError(f"{where} is not a mapping of model fields; point at a meshlm run or export")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{where} has model fields this version does not know ({', '.join(unknown)}); "
                "use the meshlm version that wrote it"
            )
        cfg = cls(**values)
        problems = cfg.problems()
        if problems:
            raise ConfigError(f"{where}: {problems[0]}")
        return cfg

    @property
    def peft_method(self) -> str:
        """'lora', 'adapter', 'prefix', 'prompt' (the first whose size is set) or 'none'."""
        sizes = {"lora": self.lora_rank, "adapter": self.adapter_size, "prefix": self.prefix_length}
        return next((name for name, n in (sizes | {"prompt": self.prompt_length}).items() if n), "none")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

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
        out.extend(self._decoder_problems())
        if self.position == "rope" and self.dim_per_head % 2:
            out.append("rotary positions need an even head dimension; change model.head_dim")
        if (self.position == "relative") != (self.family == "encoder_decoder"):
            out.append(
                f"model.position='{self.position}' does not fit model.family='{self.family}'; "
                "use position='relative' for encoder_decoder (T5) and 'learned' or 'rope' otherwise"
            )
        if self.position == "relative" and self.relative_buckets < 4:
            out.append(f"model.relative_buckets={self.relative_buckets} must be >= 4; T5 uses 32")
        if self.position == "relative" and self.relative_max_distance <= self.relative_buckets // 2:
            out.append(
                f"model.relative_max_distance={self.relative_max_distance} must exceed relative_buckets // 2 = "
                f"{self.relative_buckets // 2}; T5 uses 128"
            )
        if self.attention == "splash" and self.family != "decoder":
            out.append(
                f"model.attention='splash' supports family='decoder' only (no padding masks or score biases); "
                f"use model.attention='xla' for family='{self.family}'"
            )
        if self.n_decoder_layers < 0:
            out.append("model.n_decoder_layers must be >= 0 (0 takes model.n_layers)")
        if self.type_vocab_size < 0:
            out.append("model.type_vocab_size must be >= 0 (0: no token-type embeddings)")
        if self.type_vocab_size and self.family != "encoder":
            out.append("model.type_vocab_size is only used by family='encoder'; set it to 0")
        if self.head != "lm" and self.family != "encoder":
            out.append(f"model.head='{self.head}' needs family='encoder'; set model.head='lm'")
        if self.quant_skip and regex_problem(self.quant_skip):
            out.append(
                f"model.quant_skip='{self.quant_skip}' is not a regex ({regex_problem(self.quant_skip)}); fix it"
            )
        if self.quant == "none" and (self.quant_skip or self.quant_embeddings):
            out.append(
                "model.quant_skip and model.quant_embeddings apply to model.quant=qat or int8; set model.quant=qat"
            )
        if self.pooling != "cls" and self.head != "classification":
            out.append("model.pooling only applies to head='classification'; leave it at 'cls'")
        if self.head != "lm" and self.num_labels < 2:
            out.append(f"model.num_labels={self.num_labels} must be >= 2 for cross-entropy classification")
        out.extend(self._dropout_problems())
        if self.lora_rank < 0:
            out.append(f"lora.rank={self.lora_rank} must be >= 0; 0 turns LoRA off")
        if not 0.0 <= self.lora_dropout < 1.0:
            out.append(f"lora.dropout={self.lora_dropout} must be in [0, 1); 0 turns it off")
        return out + self._peft_problems()

    def _peft_problems(self) -> list[str]:
        sizes = {"lora.rank": self.lora_rank, "peft.adapter.size": self.adapter_size}
        sizes |= {"peft.prefix.length": self.prefix_length, "peft.prompt.length": self.prompt_length}
        out = [f"{key}={n} must be >= 0; 0 turns it off" for key, n in list(sizes.items())[1:] if n < 0]
        if self.prefix_hidden < 0 or (self.prefix_hidden and not self.prefix_length):
            out.append(f"peft.prefix.hidden={self.prefix_hidden} needs peft.method=prefix and must be >= 0")
        on = [key for key, n in sizes.items() if n > 0]
        if len(on) > 1:
            out.append(f"{' and '.join(on)} are set; a model trains one PEFT method, keep one (peft.method)")
        return out

    def _decoder_problems(self) -> list[str]:
        out = []
        if self.rope_scaling != "none" and self.position != "rope":
            out.append(f"model.rope_scaling='{self.rope_scaling}' needs model.position='rope'; set it to 'none'")
        if self.rope_scaling != "none" and self.rope_factor < 1.0:
            out.append(f"model.rope_factor={self.rope_factor} must be >= 1 (how far the context was stretched)")
        if self.rope_scaling in ("llama3", "yarn") and self.rope_original_max_len <= 0:
            out.append(f"model.rope_scaling='{self.rope_scaling}' needs model.rope_original_max_len > 0")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            out.append("model.rope_high_freq_factor must exceed model.rope_low_freq_factor (Llama 3.1: 4 and 1)")
        if self.sliding_window < 0:
            out.append("model.sliding_window must be >= 0 (0: every earlier key)")
        if self.sliding_window and (self.family != "decoder" or self.attention == "splash"):
            out.append("model.sliding_window needs family='decoder' and attention xla, recompute or cudnn; set it to 0")
        return out

    def _dropout_problems(self) -> list[str]:
        out = []
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                out.append(f"model.{name}={getattr(self, name)} must be in [0, 1); 0 turns it off")
        if self.attention_dropout > 0 and self.attention != "recompute":
            out.append(
                f"model.attention_dropout={self.attention_dropout} needs the attention probabilities, which "
                f"model.attention='{self.attention}' does not expose; set model.attention=recompute "
                "or model.attention_dropout=0"
            )
        return out


def regex_problem(pattern: str) -> str:
    """Why ``pattern`` does not compile, or ''."""
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return ""
