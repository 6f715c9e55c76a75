"""Post-training int8 quantisation of a model source into a new export: the work of ``python -m train.quantize``
(its --help describes the selection); the int8 layers are models/quant.py's."""

from __future__ import annotations

import dataclasses
import pathlib

from models.config import ConfigError

BITS = (8,)


def quantize_source(
    src: pathlib.Path, out_dir: pathlib.Path, bits: int = 8, skip: str | None = None, embeddings: bool | None = None
) -> tuple[str, list[str]]:
    """Writes the int8 export of ``src`` to ``out_dir``; returns (what was read, the quantised paths).

    ``skip`` / ``embeddings`` None: '' / False, or a QAT source's own selection."""
    from flax import nnx

    from models.config import regex_problem
    from models.quant import float_weights, quantize_model
    from train.checkpoints.exporting import new_out_dir, write_params
    from train.checkpoints.sources import load_source

    if bits not in BITS:
        raise ConfigError(f"--bits {bits} is not supported; only --bits 8 (weight-only int8) is")
    if skip and regex_problem(skip):
        raise ConfigError(f"--skip '{skip}' is not a regex ({regex_problem(skip)}); fix it")
    out_dir = new_out_dir(out_dir)
    source = load_source(src)
    if source.config.quant == "int8":
        raise ConfigError(f"SOURCE '{src}' is already quantised ({source.config.quant}); give a float model")
    if source.config.quant == "qat":
        skip, embeddings = _qat_selection(source.config, skip, embeddings, src)
        float_weights(source.model)
    skip, embeddings = skip or "", bool(embeddings)
    done = quantize_model(source.model, skip, embeddings)
    if not done:
        raise ConfigError(f"--skip '{skip}' matches every layer, so nothing would be quantised; narrow it")
    cfg = dataclasses.replace(source.config, quant="int8", quant_skip=skip, quant_embeddings=embeddings)
    write_params(nnx.state(source.model, nnx.Param), cfg, out_dir, source.tokenizer, source.labels)
    return source.description, done


def _qat_selection(cfg, skip: str | None, embeddings: bool | None, src: pathlib.Path) -> tuple[str, bool]:
    """A QAT run's (quant_skip, quant_embeddings); ConfigError when --skip / --embeddings ask for others."""
    if skip not in (None, cfg.quant_skip) or embeddings not in (None, cfg.quant_embeddings):
        raise ConfigError(
            f"SOURCE '{src}' trained with model.quant=qat for quant_skip='{cfg.quant_skip}', quant_embeddings="
            f"{cfg.quant_embeddings}; drop --skip / --embeddings so the export rounds what the run rounded"
        )
    return cfg.quant_skip, cfg.quant_embeddings
