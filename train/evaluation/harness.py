"""EleutherAI's lm-evaluation-harness on meshlm decoders: the ``meshlm`` model of ``lm_eval``.

    python -m train.lm_eval --model meshlm --model_args source=runs/default --tasks hellaswag
    lm_eval.simple_evaluate(model=MeshLM("runs/default"), tasks=[...])   # from Python

``source`` is any model source (a run, an export, a Hugging Face decoder directory); ``best``,
``batch_size`` (rows per device batch, rounded up to the data-parallel size), ``max_length``
(default: the model's ``max_seq_len``) and ``tokenizer`` are optional ``--model_args``.

Scoring follows lm-eval's own conventions (its Hugging Face model): the continuation's tokens are
those of ``encode(context + continuation)`` past ``encode(context)``; an empty context is the eos
token; inputs longer than ``max_length`` keep their last tokens; rolling log-likelihoods use
lm-eval's disjoint windows with eos as the prefix. Every batch is one jitted, sharded forward at a
power-of-two length, so a task compiles a handful of programs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from models.generate import generate
from sharding.rules import BATCH_AXES, activation_context
from train.checkpoints.sources import load_source, source_mesh, source_tokenizer
from train.config.sections import ConfigError
from train.data.tasks import global_batch

DEFAULT_GEN_TOKENS = 256


@register_model("meshlm")
class MeshLM(LM):
    """lm-eval's ``LM`` over a meshlm decoder: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(
        self,
        source: str,
        best: bool = False,
        batch_size: int | str = 8,
        max_length: int = 0,
        tokenizer: str = "",
        device: str | None = None,  # lm-eval's --device and --max_batch_size: the mesh decides both here
        max_batch_size: int | None = None,
    ):
        super().__init__()
        batch_size = 8 if str(batch_size).startswith("auto") else batch_size
        self.mesh = source_mesh(source)
        self.source = load_source(source, mesh=self.mesh, best=str(best).lower() in ("true", "1"))
        if self.source.config.family != "decoder":
            raise ConfigError(
                f"lm-eval scores decoders; '{source}' is a {self.source.config.family} model; give a decoder"
            )
        self.tokenizer = source_tokenizer(self.source, tokenizer)
        self.max_length = int(max_length) or self.source.config.max_seq_len
        if self.max_length > self.source.config.max_seq_len:
            raise ConfigError(
                f"max_length={self.max_length} is longer than the model's max_seq_len="
                f"{self.source.config.max_seq_len}; lower it"
            )
        dp = math.prod(self.mesh.shape[a] for a in BATCH_AXES)
        self.batch_size = -(-int(batch_size) // dp) * dp
        graphdef, self.params = nnx.split(self.source.model)
        self._score = jax.jit(lambda params, batch: _continuation_scores(nnx.merge(graphdef, params), batch))

    # --- lm-eval's interface ---------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        return self._score_pairs(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            tokens = self.tokenizer.encode(request.args[0]).tolist()
            windows = utils.get_rolling_token_windows(tokens, self.tokenizer.eos_id, self.max_length, 1)
            pairs = [utils.make_disjoint_window(w) for w in windows]
            out.append(sum(logprob for logprob, _ in self._score_pairs(pairs)))
        return out

    def generate_until(self, requests) -> list[str]:
        settings = [_generation_settings(request.args[1]) for request in requests]
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):  # batches of requests with the same settings
            end = start + 1
            while end < min(len(requests), start + self.batch_size) and settings[end] == settings[start]:
                end += 1
            out += self._generate([r.args[0] for r in requests[start:end]], *settings[start])
        return out

    @property
    def tokenizer_name(self) -> str:
        return str(self.source.path)

    # --- scoring -------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens as lm-eval's Hugging Face model splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.tokenizer.eos_id], self.tokenizer.encode(continuation).tolist()
        whole = self.tokenizer.encode(context + continuation).tolist()
        context_tokens = self.tokenizer.encode(context).tolist()
        return whole[: len(context_tokens)], whole[len(context_tokens) :]

    def _generate(self, contexts: list[str], until: tuple[str, ...], new_tokens: int, temperature: float, seed: int):
        """Each context's continuation, cut before the first of ``until`` and at eos."""
        budget = self.max_length - new_tokens
        if budget < 1:
            raise ConfigError(f"max_gen_toks={new_tokens} leaves no room for a prompt in max_length={self.max_length}")
        eos = self.tokenizer.eos_id
        prompts = [(self.tokenizer.encode(c).tolist() or [eos])[-budget:] for c in contexts]
        prompts += [prompts[0]] * (-len(prompts) % self.batch_size)  # whole data-parallel batches
        with activation_context(self.mesh):
            tokens = generate(
                self.source.model, prompts, new_tokens, temperature=temperature, seed=seed, eos_id=eos, pad_id=eos
            ).tolist()
        texts = []
        for row in tokens[: len(contexts)]:
            text = self.tokenizer.decode(row[: row.index(eos)] if eos in row else row)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            texts.append(text)
        return texts

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether greedy decoding gives it) per pair."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            batch = continuation_batch(chunk, self.max_length, self.batch_size)
            with activation_context(self.mesh):
                logprob, greedy = self._score(self.params, global_batch(batch, self.mesh))
            results += [(float(lp), bool(g)) for lp, g in zip(np.asarray(logprob)[: len(chunk)], np.asarray(greedy))]
        return results


def _generation_settings(kwargs: dict | None) -> tuple[tuple[str, ...], int, float, int]:
    """(stop strings, new tokens, temperature, seed) from lm-eval's ``gen_kwargs``."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", True) else 0.0
    return until, int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS)), temperature, int(kwargs.get("seed", 0))


def continuation_batch(pairs: list[tuple[list[int], list[int]]], max_length: int, rows: int) -> dict[str, np.ndarray]:
    """``inputs``, ``targets`` int32 [rows, L] and ``weights`` float32 [rows, L] (1 on the continuation's
    targets), L the power of two (>= 16, <= max_length) that holds the longest pair; each pair keeps
    its last ``max_length + 1`` tokens; rows past ``len(pairs)`` are weight-0 padding."""
    sequences = [(context + continuation)[-(max_length + 1) :] for context, continuation in pairs]
    longest = max(len(s) for s in sequences) - 1
    length = min(max_length, max(16, 1 << max(longest - 1, 0).bit_length()))
    inputs = np.zeros((rows, length), np.int32)
    targets = np.zeros((rows, length), np.int32)
    weights = np.zeros((rows, length), np.float32)
    for i, (sequence, (_, continuation)) in enumerate(zip(sequences, pairs)):
        n = len(sequence) - 1
        inputs[i, :n], targets[i, :n] = sequence[:-1], sequence[1:]
        weights[i, n - min(len(continuation), n) : n] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


def _continuation_scores(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Summed log-probability [B] of the weighted targets, and whether each is every row's argmax [B]."""
    logits = model(batch["inputs"]).astype(jnp.float32)  # [B, L, vocab]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, batch["targets"][..., None], axis=-1)[..., 0]  # [B, L]
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (batch["weights"] == 0)
    return jnp.sum(picked * batch["weights"], axis=-1), jnp.all(hit, axis=-1)
