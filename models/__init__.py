"""Transformer models with logical axis names on every parameter."""

from __future__ import annotations

from flax import nnx

from models.config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, seed: int) -> nnx.Module:
    """Constructs the model of ``cfg.family`` (concretely, or abstractly under ``nnx.eval_shape``).

    Eager sharding is off: shardings are applied by the caller from the logical names. With
    ``cfg.quant='int8'`` its Dense layers hold int8 kernels; with ``'qat'`` the same weights stay float
    and read as their int8 round trip (``models.quant``); with ``cfg.lora_rank`` the targeted ones
    (int8 or not) get LoRA adapters (``models.lora``); with ``adapter_size``, ``prefix_length`` or
    ``prompt_length`` the stacks get bottleneck adapters, prefixes or a prompt (``models.peft``).
    """
    from models.decoder import DecoderLM
    from models.encoder import EncoderLM
    from models.encoder_decoder import EncoderDecoderLM

    families = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoderLM}
    with nnx.use_eager_sharding(False):
        rngs = nnx.Rngs(params=seed)
        model = families[cfg.family](cfg, rngs=rngs)
        if cfg.quant == "int8":
            from models.quant import quantize_model

            quantize_model(model, cfg.quant_skip, cfg.quant_embeddings)
        elif cfg.quant == "qat":
            from models.quant import add_fake_quant

            if not add_fake_quant(model, cfg.quant_skip, cfg.quant_embeddings):
                raise ConfigError(
                    f"model.quant_skip='{cfg.quant_skip}' matches every layer, so model.quant=qat would round "
                    "nothing; narrow it"
                )
        if cfg.lora_rank:  # beside the int8 kernels too (QLoRA)
            from models.lora import add_adapters

            add_adapters(model, cfg, rngs)
        if cfg.peft_method in ("adapter", "prefix", "prompt"):
            from models.peft import add_peft

            add_peft(model, cfg, rngs)
        return model


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and ShapeDtypeStruct parameters (with their logical axes) of the model, allocating nothing."""
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=0)))
