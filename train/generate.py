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
import sys

from train import cli
from train.config.sections import ConfigError
from train.generation.sampling import DEFAULT_NEW_TOKENS, answers, samples


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
