"""BERT (``BertForMaskedLM``, ``BertForSequenceClassification``, ``BertForTokenClassification``,
``BertModel``) <-> our encoder.

Post-norm blocks, learned positions and token types, exact-erf GELU ('gelu'). A bare
``BertModel`` checkpoint (e.g. sentence-transformers/all-MiniLM-L6-v2) has no head: it loads
with a freshly initialised MLM head, as ``from_pretrained`` does, and ``hidden_states`` gives
its ``last_hidden_state``. Torch ``Linear`` weights are [out, in]; ours [in, out].
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.hf.common import Params, Path, Weights, require, unstack

MODEL_TYPES = ("bert",)
PREFIXES = ("bert.",)
IGNORE = (r"position_ids$", r"^pooler\.", r"^cls\.predictions\.decoder\.(weight|bias)$", r"^cls\.seq_relationship\.")
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
HEADS = {"BertForSequenceClassification": "classification", "BertForTokenClassification": "token_classification"}
ARCHITECTURES = {"lm": "BertForMaskedLM", **{head: arch for arch, head in HEADS.items()}}

# (our path under stack.blocks, HF name under encoder.layer.{i}, is a torch Linear weight)
LAYER_WEIGHTS = (
    (("attn", "q", "kernel"), "attention.self.query.weight", True),
    (("attn", "q", "bias"), "attention.self.query.bias", False),
    (("attn", "k", "kernel"), "attention.self.key.weight", True),
    (("attn", "k", "bias"), "attention.self.key.bias", False),
    (("attn", "v", "kernel"), "attention.self.value.weight", True),
    (("attn", "v", "bias"), "attention.self.value.bias", False),
    (("attn", "o", "kernel"), "attention.output.dense.weight", True),
    (("attn", "o", "bias"), "attention.output.dense.bias", False),
    (("attn_norm", "scale"), "attention.output.LayerNorm.weight", False),
    (("attn_norm", "bias"), "attention.output.LayerNorm.bias", False),
    (("mlp", "wi", "kernel"), "intermediate.dense.weight", True),
    (("mlp", "wi", "bias"), "intermediate.dense.bias", False),
    (("mlp", "wo", "kernel"), "output.dense.weight", True),
    (("mlp", "wo", "bias"), "output.dense.bias", False),
    (("mlp_norm", "scale"), "output.LayerNorm.weight", False),
    (("mlp_norm", "bias"), "output.LayerNorm.bias", False),
)
# (our path, HF name, is a torch Linear weight) outside the layers
EMBEDDINGS = (
    (("embed", "embedding"), "embeddings.word_embeddings.weight", False),
    (("pos_embed",), "embeddings.position_embeddings.weight", False),
    (("type_embed",), "embeddings.token_type_embeddings.weight", False),
    (("embed_norm", "scale"), "embeddings.LayerNorm.weight", False),
    (("embed_norm", "bias"), "embeddings.LayerNorm.bias", False),
)
MLM_HEAD = (
    (("mlm", "dense", "kernel"), "cls.predictions.transform.dense.weight", True),
    (("mlm", "dense", "bias"), "cls.predictions.transform.dense.bias", False),
    (("mlm", "norm", "scale"), "cls.predictions.transform.LayerNorm.weight", False),
    (("mlm", "norm", "bias"), "cls.predictions.transform.LayerNorm.bias", False),
    (("mlm", "bias"), "cls.predictions.bias", False),
)
CLASSIFIER_HEAD = (
    (("pooler", "kernel"), "pooler.dense.weight", True),
    (("pooler", "bias"), "pooler.dense.bias", False),
    (("classifier", "kernel"), "classifier.weight", True),
    (("classifier", "bias"), "classifier.bias", False),
)
BLOCKS = ("stack", "blocks")


def config_from_hf(hf: dict, w: Weights | None = None) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    require(act in ACTIVATIONS, f"BERT hidden_act '{act}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    kind = hf.get("position_embedding_type", "absolute")
    require(kind == "absolute", f"BERT position_embedding_type '{kind}' is not supported; only 'absolute' is")
    require(not hf.get("is_decoder", False), "BERT as a decoder (is_decoder=true) is not supported")
    heads = [HEADS[a] for a in hf.get("architectures") or () if a in HEADS]
    return ModelConfig(
        family="encoder",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        mlp=ACTIVATIONS[act],
        use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
        post_norm=True,
        type_vocab_size=hf.get("type_vocab_size", 2),
        head=heads[0] if heads else "lm",
        num_labels=len(hf.get("id2label") or {0: 0, 1: 1}),
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
    )


def _encoder_params(w: Weights, cfg: ModelConfig) -> Iterator[tuple[Path, np.ndarray]]:
    """Embeddings and blocks, one parameter at a time (blocks stacked [layers, ...])."""
    for ours, theirs, linear in EMBEDDINGS:
        yield ours, w.get(theirs, transpose=linear)
    for ours, theirs, linear in LAYER_WEIGHTS:
        yield (
            BLOCKS + ours,
            np.stack([w.get(f"encoder.layer.{i}.{theirs}", transpose=linear) for i in range(cfg.n_layers)]),
        )


def present_params(w: Weights, cfg: ModelConfig, hf: dict) -> Iterator[tuple[Path, np.ndarray]]:
    """Every parameter the checkpoint holds, whatever ``cfg.head``: the encoder, then the pooler,
    the classifier and the MLM head each only when present (a bare BertModel gives its pooler)."""
    yield from _encoder_params(w, cfg)
    mlm_decoder = (("mlm", "decoder"), "cls.predictions.decoder.weight", True)
    untied = [mlm_decoder] if not cfg.tie_embeddings else []
    for head in (CLASSIFIER_HEAD[:2], CLASSIFIER_HEAD[2:], MLM_HEAD + tuple(untied)):
        if head[0][1] in w:
            for ours, theirs, linear in head:
                yield ours, w.get(theirs, transpose=linear)


def params_from_hf(w: Weights, cfg: ModelConfig, hf: dict) -> Iterator[tuple[Path, np.ndarray]]:
    """Our parameters one at a time (stacked [layers, ...]), so at most one is on the host at once."""
    yield from _encoder_params(w, cfg)
    if cfg.head != "lm":  # token classification: no pooler (BertForTokenClassification has none)
        for ours, theirs, linear in CLASSIFIER_HEAD[2 if cfg.head == "token_classification" else 0 :]:
            yield ours, w.get(theirs, transpose=linear)
    elif MLM_HEAD[0][1] in w:
        for ours, theirs, linear in MLM_HEAD:
            yield ours, w.get(theirs, transpose=linear)
        if not cfg.tie_embeddings:
            yield (
                ("mlm", "decoder"),
                w.get("cls.predictions.decoder.weight", transpose=True),
            )  # [vocab, embed] -> [embed, vocab]
    else:
        yield from _fresh_mlm_head(cfg)


def _fresh_mlm_head(cfg: ModelConfig) -> Iterator[tuple[Path, np.ndarray]]:
    """A bare BertModel has no head: initialise one as BertForMaskedLM.from_pretrained would."""
    print(
        "warning: the checkpoint has no MLM head; it is initialised randomly (hidden_states are exact)", file=sys.stderr
    )
    rng = np.random.default_rng(0)
    d, v = cfg.d_model, cfg.vocab_size
    yield ("mlm", "dense", "kernel"), rng.normal(0.0, cfg.init_std, (d, d))
    yield ("mlm", "dense", "bias"), np.zeros(d)
    yield ("mlm", "norm", "scale"), np.ones(d)
    yield ("mlm", "norm", "bias"), np.zeros(d)
    yield ("mlm", "bias"), np.zeros(v)
    if not cfg.tie_embeddings:
        yield ("mlm", "decoder"), rng.normal(0.0, cfg.init_std, (d, v))


def hidden_states(
    model: nnx.Module, tokens: jax.Array, attention_mask: jax.Array | None = None, token_types: jax.Array | None = None
) -> jax.Array:
    """BertModel's ``last_hidden_state`` [B, T, embed] from our encoder, whatever its head.

    tokens, attention_mask (1 = token, 0 = padding), token_types: [B, T] int.
    """
    return model.encode(tokens, attention_mask, token_types)


def matches(cfg: ModelConfig) -> bool:
    return (
        cfg.family == "encoder"
        and (cfg.position, cfg.norm, cfg.use_bias, cfg.post_norm, cfg.scale_attention)
        == ("learned", "layernorm", True, True, True)
        and cfg.mlp in ACTIVATIONS.values()
        and cfg.kv_heads == cfg.n_heads
        and cfg.dim_per_head * cfg.n_heads == cfg.d_model
        and cfg.pooling == "cls"  # BertForSequenceClassification pools the [CLS] state
    )


def config_to_hf(cfg: ModelConfig):
    import transformers

    classifier = cfg.head != "lm"
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        hidden_act={ours: theirs for theirs, ours in reversed(ACTIVATIONS.items())}[cfg.mlp],
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=max(cfg.type_vocab_size, 1),
        layer_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        num_labels=cfg.num_labels if classifier else 2,
        pad_token_id=None,
        architectures=[ARCHITECTURES[cfg.head]],
    )


def params_to_hf(p: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    def out(array: np.ndarray, linear: bool) -> np.ndarray:
        return array.T if linear else array

    pre = PREFIXES[0]
    for ours, theirs, linear in EMBEDDINGS:
        if ours == ("type_embed",) and not cfg.type_vocab_size:  # HF always adds a type: make it zero
            yield pre + theirs, np.zeros((1, cfg.d_model), np.float32)
            continue
        yield pre + theirs, out(p[ours], linear)
    for ours, theirs, linear in LAYER_WEIGHTS:
        array = p[BLOCKS + ours]
        yield from unstack(pre + "encoder.layer.{i}." + theirs, np.swapaxes(array, 1, 2) if linear else array)
    if cfg.head != "lm":
        for ours, theirs, linear in CLASSIFIER_HEAD[2 if cfg.head == "token_classification" else 0 :]:
            yield (pre if theirs.startswith("pooler") else "") + theirs, out(p[ours], linear)
        return
    for ours, theirs, linear in MLM_HEAD:
        yield theirs, out(p[ours], linear)
    if not cfg.tie_embeddings:
        yield "cls.predictions.decoder.weight", p["mlm", "decoder"].T
