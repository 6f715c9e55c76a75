"""Instruction / chat fine-tuning (``train.objective: sft``): JSONL rows -> templated, loss-masked arrays.

    arrays, skipped = sft_arrays(rows, cfg.data, tokenizer, seq_len=128, loss_on="assistant")
    # {'inputs', 'targets': int32[N, seq_len], 'weights': float32[N, seq_len]}; skipped: bad rows left out

A row is ``{"prompt", "completion"}`` (a user turn and an assistant turn) or ``{"messages": [{"role",
"content"}, ...]}`` with roles system / user / assistant; a file may mix both. The conversation is
rendered by the tokenizer's own chat template (``apply_chat_template`` of a Hugging Face tokenizer
directory that has one), else by the built-in template (byte tokenizer, our BPEs)::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<eos>

where ``<eos>`` is the tokenizer's end-of-sequence id and ends every assistant turn. ``end_of_turn``
names the token that ends an assistant turn (``train.generate --chat`` stops there): that eos, or the
added token a Hugging Face template puts right after the assistant's content (``<|im_end|>``).
``train.loss_on``: ``assistant`` / ``completion`` weigh only the assistant contents and their
end-of-turn token, ``all`` every real token. Rows longer than ``seq_len + 1`` tokens are cut; a row whose first assistant token lies past ``seq_len`` is a bad row,
as is one with no assistant turn or an unknown role: a ConfigError naming the file and line, or,
with ``data.skip_bad: true``, left out and counted.

    python -m train.data.chat --out data/sft     # the instruction set from the plays (Hamlet held out)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import string
import sys
from collections.abc import Sequence

import numpy as np

from train.config.sections import ConfigError, DataConfig
from train.data.files import Row
from train.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
Turn = tuple[str, str]  # (role, content)


def turns(row: Row) -> list[Turn]:
    """The row's conversation as (role, content) turns; ConfigError (naming file:line) when it is bad."""
    r = row.record
    if "messages" in r:
        msgs = r["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ConfigError(f"{row.where}: 'messages' must be a list of {{role, content}} objects; fix that line")
        out = [(m.get("role"), m.get("content")) for m in msgs]
    elif "prompt" in r and "completion" in r:
        out = [("user", r["prompt"]), ("assistant", r["completion"])]
    else:
        raise ConfigError(f"{row.where} has neither 'messages' nor 'prompt' and 'completion'; fix that line")
    for role, content in out:
        if role not in ROLES:
            raise ConfigError(f"{row.where} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConfigError(f"{row.where} has a {role} turn whose content is not a string; fix that line")
    if not any(role == "assistant" for role, _ in out):
        raise ConfigError(f"{row.where} has no assistant turn; add one (or a 'completion')")
    return out


def _hf_template(tokenizer: Tokenizer):
    hf = getattr(tokenizer, "tokenizer", None)
    return hf if hf is not None and getattr(hf, "chat_template", None) else None


def render(conversation: Sequence[Turn], tokenizer: Tokenizer) -> list[tuple[np.ndarray, bool]]:
    """(token ids, is assistant content) pieces whose concatenation is the templated conversation."""
    hf = _hf_template(tokenizer)
    if hf is None:
        pieces: list[tuple[np.ndarray, bool]] = []
        for role, content in conversation:
            if role == "assistant":
                pieces.append((tokenizer.encode("<|assistant|>\n"), False))
                ids = np.append(tokenizer.encode(content), tokenizer.eos_id).astype(np.int32)
                pieces.append((ids, True))
            else:
                pieces.append((tokenizer.encode(f"<|{role}|>\n{content}\n"), False))
        return pieces
    # the template's text, cut where each assistant turn's content begins and ends
    msgs = [{"role": r, "content": c} for r, c in conversation]
    cuts, done = [], 0
    for i, (role, _) in enumerate(conversation):
        if role == "assistant":
            start = len(hf.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True))
            cuts.append((start, len(hf.apply_chat_template(msgs[: i + 1], tokenize=False))))
    text = hf.apply_chat_template(msgs, tokenize=False)
    pieces = []
    for start, end in cuts:
        pieces += [(tokenizer.encode(text[done:start]), False), (tokenizer.encode(text[start:end]), True)]
        done = end
    return pieces + [(tokenizer.encode(text[done:]), False)]


PROBE = "PROBE"  # an assistant content whose end the template's text is searched for


def end_of_turn(tokenizer: Tokenizer) -> int:
    """The id that ends an assistant turn: the first token after the assistant's content in the
    tokenizer's chat template when it is one of the tokenizer's added tokens (ChatML's ``<|im_end|>``,
    Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``), else the eos (the built-in template's)."""
    hf = _hf_template(tokenizer)
    if hf is None:
        return tokenizer.eos_id
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
    text = hf.apply_chat_template(msgs, tokenize=False)
    after = tokenizer.encode(text[text.rfind(PROBE) + len(PROBE) :]) if PROBE in text else []
    added = set(hf.added_tokens_decoder)
    return int(after[0]) if len(after) and int(after[0]) in added else tokenizer.eos_id


def prompt_ids(conversation: Sequence[Turn], tokenizer: Tokenizer) -> np.ndarray:
    """int32 [L]: the conversation so far, templated, then the start of the assistant's next turn."""
    hf = _hf_template(tokenizer)
    if hf is not None:
        msgs = [{"role": r, "content": c} for r, c in conversation]
        return np.asarray(
            tokenizer.encode(hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)), np.int32
        )
    pieces = [ids for ids, _ in render(conversation, tokenizer)] + [tokenizer.encode("<|assistant|>\n")]
    return np.concatenate(pieces).astype(np.int32)


def example(conversation: Sequence[Turn], tokenizer: Tokenizer, loss_on: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [L], weights float32 [L]) of one conversation: weight 1 on the tokens the loss reads."""
    pieces = [(ids, assistant) for ids, assistant in render(conversation, tokenizer) if len(ids)]
    ids = np.concatenate([p for p, _ in pieces]).astype(np.int32)
    weights = np.concatenate([np.full(len(p), a or loss_on == "all", np.float32) for p, a in pieces])
    return ids, weights


def sft_arrays(
    rows: Sequence[Row], cfg: DataConfig, tokenizer: Tokenizer, seq_len: int, loss_on: str
) -> tuple[dict[str, np.ndarray], int]:
    """``inputs`` / ``targets`` int32 [N, seq_len] (targets: inputs shifted left by one), ``weights``
    float32 [N, seq_len] (1 where the target is a scored token, 0 on the prompt and the padding),
    ``attention_mask`` int32 [N, seq_len] (1 on the example's tokens: what packing keeps), and the
    number of bad rows left out (``data.skip_bad``)."""
    inputs, targets, weights, masks, skipped = [], [], [], [], 0
    for row in rows:
        try:
            conversation = turns(row)
            ids, w = example(conversation, tokenizer, loss_on)
            first = int(np.argmax(example(conversation, tokenizer, "assistant")[1]))
            if first > seq_len:
                raise ConfigError(
                    f"{row.where}: its prompt is {first} tokens, longer than train.seq_len={seq_len}; "
                    "shorten it or raise train.seq_len"
                )
        except ConfigError:
            if not cfg.skip_bad:
                raise
            skipped += 1
            continue
        ids, w = ids[: seq_len + 1], w[: seq_len + 1]
        masks.append(np.arange(seq_len) < len(ids) - 1)
        pad = seq_len + 1 - len(ids)
        ids = np.pad(ids, (0, pad), constant_values=tokenizer.eos_id)
        w = np.pad(w, (0, pad))
        inputs.append(ids[:-1])
        targets.append(ids[1:])
        weights.append(w[1:])
    if not inputs:
        raise ConfigError(f"no usable example in data.train_files='{cfg.train_files}'; fix the rows")
    arrays = {"inputs": np.stack(inputs), "targets": np.stack(targets), "weights": np.stack(weights)}
    return arrays | {"attention_mask": np.stack(masks).astype(np.int32)}, skipped


# --- the instruction set from the plays --------------------------------------------------------


def play_examples(path: pathlib.Path, per_play: int, rng: random.Random) -> list[dict]:
    """``per_play`` rows from one play: "Who speaks the line ...?" (prompt/completion) and
    "Continue the speech of ..." (messages, with a system turn)."""
    from train.data.speakers import _name_part, speaker_names

    lines = path.read_text().splitlines()
    title = string.capwords(lines[0].strip()) if lines else path.stem
    names = speaker_names(lines)
    speeches, i = [], 0
    while i < len(lines):
        name = _name_part(lines[i])
        if name in names and (i == 0 or not lines[i - 1].strip()):
            j = i + 1
            while j < len(lines) and lines[j].strip():
                j += 1
            body = [s.strip() for s in lines[i + 1 : j] if s.strip() and not s.strip().startswith("[")]
            if body:
                speeches.append((name.rstrip(".").strip(), body))
            i = j
        i += 1
    rows = []
    for name, body in rng.sample(speeches, min(per_play, len(speeches))):
        if len(body) >= 2 and rng.random() < 0.5:
            user = f"Continue the speech of {name} in {title}: {body[0]}"
            rows.append({"messages": [
                {"role": "system", "content": "You know Shakespeare's plays."},
                {"role": "user", "content": user},
                {"role": "assistant", "content": " ".join(body[1:4])[:240]},
            ], "play": path.stem})  # fmt: skip
        else:
            line = rng.choice(body)
            rows.append({"prompt": f'Who speaks the line "{line}" in {title}?', "completion": name, "play": path.stem})
    return rows


def main(argv: list[str] | None = None) -> int:
    from train.data.speakers import PLAYS

    parser = argparse.ArgumentParser(prog="python -m train.data.chat", description="Write the SFT set of the plays.")
    parser.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    parser.add_argument("--plays", default=str(PLAYS), help="directory of one .txt file per play")
    parser.add_argument("--per-play", type=int, default=120, help="examples per play")
    parser.add_argument("--val-play", default="hamlet", help="the play held out for val.jsonl")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    for path in sorted(pathlib.Path(args.plays).glob("*.txt")):
        (val if path.stem == args.val_play else train).extend(play_examples(path, args.per_play, rng))
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} train / {len(val)} val examples in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
