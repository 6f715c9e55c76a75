"""Adversarial training on the input token embeddings: FGM (Miyato et al., 2017) and PGD (Madry et al., 2018).

The model's ``forward(batch, rng, embed_delta)`` adds a perturbation ``delta`` [B, T, embed] (float32)
to the token embeddings of ``batch[model.embedded_input]`` (the encoder's inputs for T5). The attack
climbs the loss along its gradient with respect to ``delta``, normalised per row (each row's
[T, embed] block has L2 length ``alpha``) and projected back onto each row's L2 ball of radius
``epsilon``: PGD takes ``steps`` such steps from 0, FGM is one step of length ``epsilon``
(``r = epsilon * g / ||g||``). The training loss is ``clean + adversarial`` (the loss at the final
``delta``, a constant for the weights' gradient). Per-row norms make a row's perturbation
independent of the other rows, so micro-batches and data shards see the perturbation of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from train.config.sections import AdversarialConfig

# (trainable params, batch, delta [B, T, embed] float32) -> (scalar loss, dict of scalar parts)
LossFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]
PARTS = ("clean_loss", "adversarial_loss")  # the metrics an adversarial step adds
_TINY = 1e-20  # a row whose gradient is exactly 0 (all padding) gets no perturbation


def _row_norm(x: jax.Array) -> jax.Array:
    """[B, T, embed] -> [B, 1, 1]: the L2 length of each row."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True))


def ascend(delta: jax.Array, grad: jax.Array, alpha: float, epsilon: float) -> jax.Array:
    """One projected ascent step on [B, T, embed]: ``delta + alpha * grad / ||grad||`` per row, scaled
    back onto the row's L2 ball of radius ``epsilon`` where it leaves it."""
    delta = delta + alpha * grad / jnp.maximum(_row_norm(grad), _TINY)
    return delta * jnp.minimum(1.0, epsilon / jnp.maximum(_row_norm(delta), _TINY))


def perturbation(
    loss_fn: LossFn, trainable: dict, batch: dict, grad: jax.Array, config: AdversarialConfig
) -> jax.Array:
    """The attack's final ``delta`` [B, T, embed] (no gradient flows through it), starting from the
    clean loss's gradient ``grad`` with respect to ``delta`` at 0."""
    if config.method == "fgm":
        return jax.lax.stop_gradient(ascend(jnp.zeros_like(grad), grad, config.epsilon, config.epsilon))
    attack = jax.grad(lambda d: loss_fn(trainable, batch, d)[0])  # the weights are not differentiated here

    def climb(_, delta):
        return ascend(delta, attack(delta), config.alpha, config.epsilon)

    delta = ascend(jnp.zeros_like(grad), grad, config.alpha, config.epsilon)
    return jax.lax.stop_gradient(jax.lax.fori_loop(1, config.steps, climb, delta))


def adversarial_value_and_grad(
    loss_fn: LossFn, trainable: dict, batch: dict, delta_shape: tuple[int, ...], config: AdversarialConfig
) -> tuple[tuple[jax.Array, dict], dict]:
    """``jax.value_and_grad(loss_fn, has_aux=True)`` of ``clean + adversarial`` with respect to
    ``trainable``; the parts add ``clean_loss`` and ``adversarial_loss``. ``delta_shape``: [B, T, embed]."""
    zero = jnp.zeros(delta_shape, jnp.float32)
    clean_fn = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)
    (clean, parts), (grads, grad_delta) = clean_fn(trainable, batch, zero)
    delta = perturbation(loss_fn, trainable, batch, grad_delta, config)
    (adversarial, _), adversarial_grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch, delta)
    total = jax.tree.map(jnp.add, grads, adversarial_grads)
    return (clean + adversarial, {**parts, "clean_loss": clean, "adversarial_loss": adversarial}), total
