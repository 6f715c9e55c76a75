"""The distillation loss: KL divergence from a frozen teacher's softened distribution to the student's.

Per scored position (``weights`` > 0: every causal-LM token, the masked tokens of a masked LM, each
example of a classifier), with ``p = softmax(teacher / T)`` (optionally only the teacher's top k
classes, renormalised) and ``q = softmax(student / T)``:

    distill = T^2 * sum_v p_v (log p_v - log q_v)        loss = alpha * cross_entropy + distill

``T^2`` keeps the soft term's gradient (``T * (q - p)`` per logit) on the scale of the hard one as T
changes (Hinton et al., 2015). Both terms are averaged over the same summed weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """What the jitted train step needs to run the teacher; its parameters are a separate argument."""

    graphdef: nnx.GraphDef
    shardings: nnx.State  # NamedSharding per teacher parameter (the run's rules on its mesh)
    temperature: float
    alpha: float
    top_k: int = 0  # 0: the whole distribution

    def logits(self, params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        """The teacher's float32 logits for ``batch['targets']``, without dropout and without gradients."""
        return jax.lax.stop_gradient(nnx.merge(self.graphdef, params).forward(batch))


def teacher_probs(teacher_logits: jax.Array, temperature: float, top_k: int = 0) -> jax.Array:
    """logits [..., classes] -> float32 ``softmax(logits / T)`` [..., classes]; with ``top_k`` the
    classes below the k-th largest logit get probability 0 and the rest are renormalised (classes
    tied with the k-th are all kept)."""
    scaled = teacher_logits.astype(jnp.float32) / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    return jax.nn.softmax(scaled, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def soft_cross_entropy(logits: jax.Array, probs: jax.Array, temperature: float) -> jax.Array:
    """logits [..., classes] float32, target probabilities [..., classes] -> float32 [...]
    ``-sum_v probs_v log softmax(logits / T)_v``, with the hand-written gradient ``(q - probs) / T``
    (one elementwise pass, as train/core/step.py's cross_entropy); ``probs`` gets none."""
    return _soft_fwd(logits, probs, temperature)[0]


def _soft_fwd(logits, probs, temperature):
    scaled = logits / temperature
    log_q = jax.nn.log_softmax(scaled, axis=-1)
    return -jnp.sum(probs * log_q, axis=-1), (log_q, probs)


def _soft_bwd(temperature, residuals, g):
    log_q, probs = residuals
    return (jnp.exp(log_q) - probs) * (g / temperature)[..., None], None


soft_cross_entropy.defvjp(_soft_fwd, _soft_bwd)


def kl_per_position(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float, top_k: int = 0
) -> jax.Array:
    """[..., classes] twice -> float32 [...] ``T^2 * KL(p_teacher || q_student)``."""
    probs = teacher_probs(teacher_logits, temperature, top_k)
    neg_entropy = jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)  # 0 log 0 = 0 (top-k zeros)
    return temperature**2 * (soft_cross_entropy(student_logits, probs, temperature) + neg_entropy)


def summed_distill_loss(
    teacher: TeacherSpec, student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array
) -> jax.Array:
    """Sum over the scored positions (``weights`` [...]) of the weighted ``T^2 * KL``."""
    kl = kl_per_position(student_logits, teacher_logits, teacher.temperature, teacher.top_k)
    return jnp.sum(kl * weights)
