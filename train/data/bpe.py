"""Training a byte-level BPE tokenizer (Hugging Face ``tokenizers``) for ``data.tokenizer=DIR``: the work of
``python -m train.train_tokenizer``. Every string encodes (no unknown token) and decodes back exactly; the only
special token is ``<|endoftext|>``, the eos the packer puts after every document."""

from __future__ import annotations

import os

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + eos


def train_bpe(files: list[str], vocab_size: int, out_dir: str) -> None:
    """Trains BPE with ``vocab_size`` ids (eos included) on ``files``; writes ``out_dir``.

    Deterministic: the same files (in any order) and vocab size give the same vocabulary.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab size {vocab_size} is below {MIN_VOCAB} (256 bytes + eos); raise it")
    if not files:
        raise ValueError("no training files given; pass --files with a glob that matches text files")
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(sorted(files), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
