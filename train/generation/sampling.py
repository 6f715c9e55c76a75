"""Sampling text from a model source: the work of ``python -m train.generate`` (its --help describes the
options). ``samples`` streams a prompt's continuations, ``answers`` a chat's turns; both decode from the KV
cache (models/generate.py) on the source's mesh (train/checkpoints/sources.py ``source_mesh``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Iterator

import numpy as np

from train.config.sections import ConfigError

CHUNK = 16  # tokens decoded between two writes to stdout
DEFAULT_NEW_TOKENS = 200


def _prompt_and_budget(args: argparse.Namespace, source, tokenizer) -> tuple[np.ndarray, int]:
    """The prompt's token ids and how many tokens to generate; ConfigError when they cannot fit."""
    cfg = source.config
    if cfg.family == "encoder" or cfg.head != "lm":
        raise ConfigError(
            f"'{args.source}' is a {cfg.family} model with a {cfg.head} head, which cannot generate text; "
            "give a decoder (GPT-2, Llama) or T5"
        )
    prompt = np.asarray(tokenizer.encode(args.prompt), np.int32)
    if cfg.family == "decoder" and len(prompt) == 0:
        prompt = np.asarray([tokenizer.eos_id], np.int32)
    room = cfg.max_seq_len - (len(prompt) if cfg.family == "decoder" else 0)
    if len(prompt) > cfg.max_seq_len or room < 1:
        raise ConfigError(
            f"the prompt has {len(prompt)} tokens but the model has {cfg.max_seq_len} positions; shorten --prompt"
        )
    if args.max_new_tokens > room or args.max_new_tokens < 0:
        raise ConfigError(
            f"--max-new-tokens={args.max_new_tokens} does not fit: the model's {cfg.max_seq_len} positions "
            f"leave room for {room} after the prompt; ask for 1 to {room}"
        )
    return prompt, args.max_new_tokens or min(DEFAULT_NEW_TOKENS, room)


def samples(args: argparse.Namespace) -> Iterator[tuple[int, str]]:
    """(sample index, text to print next): a decoder's prompt, then each sample's text as it is decoded."""
    from models.generate import stream
    from sharding.rules import BATCH_AXES, activation_context

    mesh, source, tokenizer = _load(args)
    prompt, new_tokens = _prompt_and_budget(args, source, tokenizer)
    dp = math.prod(mesh.shape[a] for a in BATCH_AXES)
    rows = -(-args.num_samples // dp) * dp  # the batch shards over the data-parallel devices
    kwargs = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    stops = stop_ids(args, source, tokenizer)
    kwargs |= {"eos_id": stops, "pad_id": tokenizer.eos_id, "start_id": source.decoder_start_id}
    shown = args.prompt if source.config.family == "decoder" else ""
    with activation_context(mesh):
        pieces = stream(source.model, [prompt] * rows, new_tokens, chunk=CHUNK, **kwargs)
        yield from _texts(pieces, tokenizer, stops, args.num_samples, shown)


def stop_ids(args: argparse.Namespace, source, tokenizer) -> list[int]:
    """The ids generation stops at (train/generate.py's docstring); ConfigError for a ``--stop`` that is not
    one token."""
    from train.data.chat import end_of_turn

    ids = [tokenizer.eos_id, *source.eos_ids] + ([end_of_turn(tokenizer)] if args.chat else [])
    for text in args.stop:
        token = tokenizer.encode(text)
        if len(token) != 1:
            raise ConfigError(
                f"--stop {text!r} is {len(token)} tokens of the tokenizer; give one token (e.g. <|im_end|>)"
            )
        ids.append(int(token[0]))
    return list(dict.fromkeys(ids))


def answers(args: argparse.Namespace, turns: Iterable[str]) -> Iterator[str]:
    """``--chat``: the model's answer to each user turn (blank lines skipped), the conversation kept;
    ``turns`` is the one ``--prompt`` when given."""
    from models.generate import stream
    from sharding.rules import BATCH_AXES, activation_context
    from train.data.chat import prompt_ids

    mesh, source, tokenizer = _load(args)
    if source.config.family != "decoder":
        raise ConfigError(f"--chat needs a decoder; '{args.source}' is a {source.config.family} model")
    dp = math.prod(mesh.shape[a] for a in BATCH_AXES)
    kwargs = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    stops, conversation = stop_ids(args, source, tokenizer), []
    for turn in [args.prompt] if args.prompt is not None else turns:
        if not turn.strip():
            continue
        conversation.append(("user", turn.rstrip("\n")))
        prompt = prompt_ids(conversation, tokenizer)
        room = source.config.max_seq_len - len(prompt)
        if room < 1:
            raise ConfigError(
                f"the conversation has {len(prompt)} tokens, the model {source.config.max_seq_len} positions; "
                "start a new one"
            )
        with activation_context(mesh):
            pieces = stream(source.model, [prompt] * dp, min(args.max_new_tokens or DEFAULT_NEW_TOKENS, room),
                            chunk=CHUNK, eos_id=stops, pad_id=tokenizer.eos_id, **kwargs)  # fmt: skip
            answer = tokenizer.decode(_until_stop([int(t) for piece in pieces for t in piece[0]], stops))
        conversation.append(("assistant", answer))
        yield answer


def _load(args: argparse.Namespace):
    """(mesh, source, tokenizer) of ``args.source`` (``--tokenizer`` replacing the source's)."""
    from train.checkpoints.sources import load_source, source_mesh, source_tokenizer

    mesh = source_mesh(args.source)
    source = load_source(args.source, mesh=mesh)
    return mesh, source, source_tokenizer(source, args.tokenizer)


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """``tokens`` up to (without) the first stop id."""
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


def _texts(
    pieces: Iterator[np.ndarray], tokenizer, stops: list[int], num_samples: int, prefix: str
) -> Iterator[tuple[int, str]]:
    """Each sample's text as it grows: one sample streams, several come out whole at the end."""
    tokens: list[list[int]] = [[] for _ in range(num_samples)]
    if num_samples == 1:
        yield 0, prefix
    shown = [""] * num_samples
    for piece in pieces:
        for i in range(num_samples):
            tokens[i].extend(int(t) for t in piece[i])
        if num_samples == 1:
            yield 0, _unseen(tokens[0], shown, 0, tokenizer, stops, final=False)
    for i in range(num_samples):
        text = _unseen(tokens[i], shown, i, tokenizer, stops, final=True)
        yield i, text if num_samples == 1 else prefix + text


def _unseen(tokens: list[int], shown: list[str], i: int, tokenizer, stops: list[int], *, final: bool) -> str:
    """The text of ``tokens`` (up to a stop) past what was shown; an unfinished UTF-8 character waits."""
    text = tokenizer.decode(_until_stop(tokens, stops))
    if not final:
        text = text.rstrip("\ufffd")
    new, shown[i] = text[len(shown[i]) :], text
    return new
