"""``python -m train.generate SOURCE [--prompt TEXT] [--chat] [--max-new-tokens N] [--temperature T] [--top-k K]
[--top-p P] [--seed S] [--num-samples N] [--stop TOKEN ...] [--tokenizer DIR]``

Continues ``--prompt`` with a saved model (a run directory, an export directory or a Hugging Face
model directory with its tokenizer, train/checkpoints/sources.py), decoding from the KV cache
(``models.generate``). One sample is streamed to stdout as it is decoded (every 16 tokens);
several (``--num-samples``) are printed one after another once decoded, each after a
``--- sample i ---`` line. Decoders print the prompt and its continuation; T5 reads the prompt
with its encoder and prints what the decoder writes, starting from the token it was trained to start
from (``decoder_start_token_id``, 0 for T5; train/checkpoints/sources.py). ``--top-k`` above the vocabulary
keeps every token, as in transformers. A sample ends at a stop token or after
``--max-new-tokens`` (default: up to 200, as many as the model's positions leave room for). The
stop tokens are the tokenizer's eos, a Hugging Face directory's ``eos_token_id`` list
(generation_config.json, as transformers' ``generate()`` reads it), each ``--stop`` token and, with
``--chat``, the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...; train/data/chat.py).
An empty prompt starts a new document (from eos). The model runs on the devices as the run's mesh
says (all devices as fsdp otherwise). ``--chat`` (decoders) renders the conversation through the
chat template of train/data/chat.py and prints the assistant's answers only, one a line: with
``--prompt``, the answer to that one user turn (what a transformers text-generation pipeline gives
for ``[{"role": "user", "content": TEXT}]``); without, one answer per line of standard input (a
terminal or a pipe) until its end, the whole conversation so far kept. User mistakes print one
``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from collections.abc import Iterable, Iterator

import numpy as np

from train import cli
from train.config.sections import ConfigError, MeshConfig, load_config

CHUNK = 16  # tokens decoded between two writes to stdout
DEFAULT_NEW_TOKENS = 200


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.Parser(prog="python -m train.generate", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="run directory, export directory or Hugging Face model directory")
    parser.add_argument("--prompt", help="the text to continue (T5: the encoder's input; --chat: the user's turn)")
    parser.add_argument("--chat", action="store_true", help="answer through the chat template (turns from stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help=f"default: up to {DEFAULT_NEW_TOKENS}")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus: the likeliest tokens holding this mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--stop", action="append", default=[], help="also stop at this token (repeatable)")
    parser.add_argument("--tokenizer", default="", help="'byte' or a tokenizer directory (default: the source's)")
    args = parser.parse_args(argv)
    if args.prompt is None and not args.chat:
        raise ConfigError("give --prompt TEXT, --chat (user turns from stdin) or both (one chat turn)")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.num_samples < 1:
        raise ConfigError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1 and --num-samples >= 1")
    return args


def _mesh(path: str):
    """The run's mesh when it fits these devices, else every device along fsdp."""
    from sharding.mesh import make_mesh

    config_file = pathlib.Path(path) / "config.yaml"
    try:
        return make_mesh(load_config(config_file).mesh if config_file.is_file() else MeshConfig())
    except ConfigError:
        return make_mesh(MeshConfig())


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
    """The ids generation stops at (module docstring); ConfigError for a ``--stop`` that is not one token."""
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
    from train.checkpoints.sources import check_tokenizer, load_source
    from train.data.tokenizer import load_tokenizer

    mesh = _mesh(args.source)
    source = load_source(args.source, mesh=mesh)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else source.tokenizer
    if tokenizer is None:
        raise ConfigError(f"'{args.source}' holds no tokenizer; pass --tokenizer byte or a tokenizer directory")
    if args.tokenizer:
        check_tokenizer(tokenizer, source.config, f"--tokenizer '{args.tokenizer}'")
    return mesh, source, tokenizer


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


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cli.start_jax()
        if args.chat:
            for answer in answers(args, sys.stdin):
                print(answer, flush=True)
            return
        for i, text in samples(args):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---", flush=True)
                text += "\n"
            print(text, end="", flush=True)
        if args.num_samples == 1:
            print(flush=True)

    return cli.guarded(command)


if __name__ == "__main__":
    sys.exit(main())
