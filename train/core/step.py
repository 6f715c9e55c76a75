"""Pure train and eval steps, jitted with explicit in/out shardings and a donated state.

A batch is a dict of arrays with a leading batch axis, sharded over the data-parallel axes:
``targets`` (int32 [B, T] or [B]; packed classification [B, K]), optional ``weights`` (float32,
same shape), and whatever the model family's ``forward(batch)`` reads (``inputs`` for decoders),
packed rows' ``segment_ids`` / ``positions`` / ``pool_positions`` included (train/data/packing.py).
Padding and targets across segments weigh 0, so a packed batch's loss (summed weighted
cross-entropy over summed weight) is that of its examples fed one per row.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sharding.rules import RULES, Rules, activation_context, batch_sharding, replicated
from train.compress.distill_loss import TeacherSpec, summed_distill_loss
from train.config.sections import AdversarialConfig
from train.core.adversarial import PARTS, adversarial_value_and_grad
from train.core.freeze import trainable_leaves, with_leaves
from train.core.state import StateSpec, TrainState

Batch = dict[str, jax.Array]


def token_weights(batch: Batch) -> jax.Array:
    return batch["weights"] if "weights" in batch else jnp.ones(batch["targets"].shape, jnp.float32)


def summed_loss(
    graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Sum over tokens of the fp32 cross-entropy, and the summed token weight; ``rng``: dropout key (None: off)."""
    return _summed(nnx.merge(graphdef, params).forward(batch, rng=rng), batch)


def dropout_key(seed: int, step: jax.Array, micro: jax.Array | int = 0) -> jax.Array:
    """The dropout key of one micro-batch of one step, derived from (seed, step, micro) alone so a
    resumed run draws the same masks without keeping RNG state; the model folds in layers and sites."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro)


@jax.custom_vjp
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., classes] float32, integer targets [...] -> float32 [...] ``logsumexp(logits) - logits[target]``.

    As ``optax.softmax_cross_entropy_with_integer_labels``, with a hand-written gradient
    ``(softmax - one_hot) * g``: one elementwise pass over the logits instead of autodiff's
    scatter into a zeroed [..., classes] array plus a separate softmax pass (XLA:CPU).
    """
    return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1, keepdims=True))  # [..., 1]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse[..., 0] - picked, (logits, targets, lse)


def _cross_entropy_bwd(residuals, g):
    logits, targets, lse = residuals
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    d_logits = (jnp.exp(logits - lse) - hit.astype(logits.dtype)) * g[..., None]
    return d_logits, None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _summed(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """logits [*targets.shape, classes] float32 -> (summed weighted cross-entropy, summed weight)."""
    losses = cross_entropy(logits, batch["targets"])
    weights = token_weights(batch)
    return jnp.sum(losses * weights), jnp.sum(weights)


def _micro_batches(batch: Batch, n: int, mesh: Mesh) -> Batch:
    """[B, ...] -> [n, B/n, ...] with each micro-batch still spread over all data shards."""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, *batch_sharding(mesh).spec)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def make_train_step(
    spec: StateSpec,
    mesh: Mesh,
    grad_accum: int,
    seed: int = 0,
    teacher: TeacherSpec | None = None,
    adversarial: AdversarialConfig | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, {'loss', 'grad_norm'})``; the state is donated.

    Only the trainable parameters are differentiated (``spec.frozen`` get zero gradients without
    computing them); ``grad_norm`` is the global norm clipping uses: over the trainable gradients,
    with frozen layer rows and pruned weights zeroed.

    Dropout (``model.dropout`` / ``attention_dropout``) draws from ``dropout_key(seed, step, micro)``.
    With a ``teacher`` (train/compress/distill_loss.py) the step is ``step(state, batch, teacher_params)``: the
    frozen teacher runs on each micro-batch, ``loss`` is ``alpha * hard_loss + distill_loss`` and the
    metrics add both parts; the teacher's parameters get no gradient and are not returned.
    With ``adversarial.method`` (fgm, pgd; train/core/adversarial.py) ``loss`` is the clean loss plus the
    loss at the embedding perturbation (drawn with the same dropout masks), the metrics add
    ``clean_loss`` and ``adversarial_loss``; off (None or no method) the step is unchanged.
    """
    attack = adversarial if adversarial is not None and adversarial.method else None

    def loss_and_grads(params, batch, total_weight, rng, teacher_params):
        teacher_logits = None if teacher is None else teacher.logits(teacher_params, batch)

        def scaled(trainable, b, embed_delta=None):
            model = nnx.merge(spec.graphdef, with_leaves(params, trainable))
            logits = model.forward(b, rng=rng) if embed_delta is None else model.forward(b, rng, embed_delta)
            hard, _ = _summed(logits, b)
            if teacher is None:
                return hard / total_weight, {}
            soft = summed_distill_loss(teacher, logits, teacher_logits, token_weights(b)) / total_weight
            hard = hard / total_weight
            return teacher.alpha * hard + soft, {"hard_loss": hard, "distill_loss": soft}

        # only the trainable parameters are differentiated: no weight gradients of a frozen (LoRA) base
        trainable = trainable_leaves(params, spec.frozen)
        if attack is None:
            return jax.value_and_grad(scaled, has_aux=True)(trainable, batch)
        model = nnx.merge(spec.graphdef, params)
        delta_shape = (*batch[model.embedded_input].shape, model.cfg.d_model)  # [B, T, embed]
        return adversarial_value_and_grad(scaled, trainable, batch, delta_shape, attack)

    def step(state: TrainState, batch: Batch, teacher_params=None) -> tuple[TrainState, dict]:
        total_weight = jnp.sum(token_weights(batch))
        if grad_accum == 1:
            rng = dropout_key(seed, state.step)
            (loss, parts), grads = loss_and_grads(state.params, batch, total_weight, rng, teacher_params)
        else:

            def accumulate(carry, inputs):
                micro, i = inputs
                rng = dropout_key(seed, state.step, i)
                out = loss_and_grads(state.params, micro, total_weight, rng, teacher_params)
                return jax.tree.map(jnp.add, carry, out), None

            parts = {} if teacher is None else {"hard_loss": 0.0, "distill_loss": 0.0}
            parts |= {} if attack is None else dict.fromkeys(PARTS, 0.0)
            zero = jnp.zeros((), jnp.float32)
            grads = jax.tree.map(jnp.zeros_like, trainable_leaves(state.params, spec.frozen))
            zeros = ((zero, jax.tree.map(lambda _: zero, parts)), grads)
            micros = (_micro_batches(batch, grad_accum, mesh), jnp.arange(grad_accum))
            ((loss, parts), grads), _ = jax.lax.scan(accumulate, zeros, micros)
        full = with_leaves(jax.tree.map(jnp.zeros_like, state.params), grads)  # frozen: zeros, never read
        updates, opt_state = spec.tx.update(full, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(spec.clip_input(grads, opt_state)), **parts}
        return new_state, metrics | (spec.metrics(params) if spec.metrics else {})

    in_shardings = (spec.shardings, batch_sharding(mesh), *(() if teacher is None else (teacher.shardings,)))
    jitted = jax.jit(
        step, in_shardings=in_shardings, out_shardings=(spec.shardings, replicated(mesh)), donate_argnums=0
    )
    return _under_mesh(jitted, mesh, spec.rules)


def make_eval_step(spec: StateSpec, mesh: Mesh) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
    """``eval_step(params, batch) -> (summed loss, summed weight)``."""
    jitted = jax.jit(
        lambda params, batch: summed_loss(spec.graphdef, params, batch),
        in_shardings=(spec.shardings.params, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
    return _under_mesh(jitted, mesh, spec.rules)


def make_predict_step(spec: StateSpec, mesh: Mesh) -> Callable[[nnx.State, Batch], tuple[jax.Array, ...]]:
    """``predict(params, batch) -> (summed loss, summed weight, predictions)``; predictions are the
    argmax class of every target (int32, ``targets.shape``), replicated for the host to score."""

    def predict(params, batch):
        logits = nnx.merge(spec.graphdef, params).forward(batch)
        return *_summed(logits, batch), jnp.argmax(logits, axis=-1).astype(jnp.int32)

    jitted = jax.jit(
        predict,
        in_shardings=(spec.shardings.params, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
    return _under_mesh(jitted, mesh, spec.rules)


def make_score_step(
    graphdef: nnx.GraphDef, mesh: Mesh, rules: Rules = RULES
) -> Callable[[nnx.State, Batch], tuple[jax.Array, ...]]:
    """``make_predict_step`` for parameters that are already placed and keep their own shardings
    (a loaded model source, train/checkpoints/sources.py): ``score(params, batch) -> (summed loss, summed
    weight, predictions)``."""

    def score(params, batch):
        logits = nnx.merge(graphdef, params).forward(batch)
        return *_summed(logits, batch), jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return _under_mesh(jax.jit(score, out_shardings=replicated(mesh)), mesh, rules)


def make_probability_step(
    graphdef: nnx.GraphDef, mesh: Mesh, rules: Rules = RULES
) -> Callable[[nnx.State, Batch], jax.Array]:
    """``probabilities(params, batch)``: float32 softmax over the classes of a loaded classifier's
    logits ([B, num_labels], or [B, T, num_labels] per token), replicated for the host."""

    def probabilities(params, batch):
        return jax.nn.softmax(nnx.merge(graphdef, params).forward(batch).astype(jnp.float32), axis=-1)

    return _under_mesh(jax.jit(probabilities, out_shardings=replicated(mesh)), mesh, rules)


def _under_mesh(fn, mesh: Mesh, rules: Rules):
    """Traces and runs ``fn`` with the model's activation constraints bound to ``mesh`` by ``rules``."""

    def wrapped(*args):
        with activation_context(mesh, rules):
            return fn(*args)

    wrapped.lower = lambda *args: _lower(fn, mesh, rules, *args)
    return wrapped


def _lower(fn, mesh, rules, *args):
    with activation_context(mesh, rules):
        return fn.lower(*args)
