"""The knobs fine-tuners expect: warm-up as a share of the steps, layer-wise learning-rate decay, no
weight decay on embeddings, norms or biases, and steps from train.epochs."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from train.config.sections import Config, OptimizerConfig, TrainConfig, load_config
from train.core.freeze import NOTHING
from train.core.optimizer import make_optimizer, schedule, warmup_steps
from train.run.loop import epoch_steps

L = 3  # layers of the stacked parameters below
SPECS = {
    "embed": {"embedding": P("vocab", "embed")},
    "pos_embed": P(None, "embed"),
    "embed_norm": {"scale": P("norm")},
    "stack": {"blocks": {"mlp": {"wi": {"kernel": P("layers", "embed", "mlp"), "bias": P("layers", "mlp")}}}},
    "classifier": {"kernel": P("embed", None), "bias": P(None)},
}
SHAPES = {
    "embed": {"embedding": (8, 4)},
    "pos_embed": (6, 4),
    "embed_norm": {"scale": (4,)},
    "stack": {"blocks": {"mlp": {"wi": {"kernel": (L, 4, 5), "bias": (L, 5)}}}},
    "classifier": {"kernel": (4, 2), "bias": (2,)},
}
SGD = {
    "name": "sgd",
    "momentum": 0.0,
    "weight_decay": 0.0,
    "schedule": "constant",
    "warmup_steps": 0,
    "clip_norm": 0.0,
    "lr": 1.0,
}


def _params(fill: float) -> dict:
    return jax.tree.map(lambda s: jnp.full(s, fill, jnp.float32), SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _update(grad: float, **overrides) -> dict:
    params = _params(1.0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx, _ = make_optimizer(OptimizerConfig(**{**SGD, **overrides}), 10, abstract, SPECS, NOTHING)
    u, _ = tx.update(_params(grad), tx.init(params), params)
    return u


def test_warmup_ratio_sets_the_warmup_from_the_steps_and_wins_over_warmup_steps():
    cfg = OptimizerConfig(lr=1.0, schedule="constant", warmup_steps=50, warmup_ratio=0.1)
    assert warmup_steps(cfg, 200) == 20 and warmup_steps(OptimizerConfig(warmup_steps=50), 200) == 50
    lr = schedule(cfg, 200)
    assert float(lr(10)) == pytest.approx(0.5) and float(lr(20)) == pytest.approx(1.0)


def test_layer_decay_scales_each_layer_row_and_the_embeddings_below_the_head():
    u = _update(1.0, layer_decay=0.5)  # sgd, lr 1: the update is -scale * gradient
    wi = np.asarray(u["stack"]["blocks"]["mlp"]["wi"]["kernel"])
    np.testing.assert_allclose(wi[:, 0, 0], [-(0.5**3), -(0.5**2), -0.5])  # layer i of 3: 0.5 ** (3 - i)
    np.testing.assert_allclose(np.asarray(u["stack"]["blocks"]["mlp"]["wi"]["bias"])[:, 0], wi[:, 0, 0])
    for path in (("embed", "embedding"), ("pos_embed",), ("embed_norm", "scale")):
        leaf = u
        for key in path:
            leaf = leaf[key]
        np.testing.assert_allclose(np.asarray(leaf), -(0.5**4))  # below the first layer
    np.testing.assert_allclose(np.asarray(u["classifier"]["kernel"]), -1.0)  # the head learns at lr
    without = _update(1.0)
    assert all(np.all(np.asarray(x) == -1.0) for x in jax.tree.leaves(without))


def test_weight_decay_spares_embedding_tables_norms_and_biases():
    u = _update(0.0, weight_decay=0.5)  # zero gradient: only the decay -lr * wd * w is left
    decayed = {k for k, v in jax.tree_util.tree_leaves_with_path(u) if np.any(np.asarray(v) != 0)}
    names = {"/".join(str(p.key) for p in path) for path in decayed}
    assert names == {"stack/blocks/mlp/wi/kernel", "classifier/kernel"}


def test_epochs_set_the_steps_from_the_training_examples_and_batch():
    config = Config(train=TrainConfig(steps=1000, batch_size=8, epochs=2.5))
    assert epoch_steps(config, 100).train.steps == math.ceil(2.5 * 100 / 8) == 32
    assert epoch_steps(Config(train=TrainConfig(steps=7)), 100).train.steps == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.warmup_ratio=1.5", "optimizer.warmup_ratio must be in [0, 1)"),
        ("optimizer.layer_decay=0", "optimizer.layer_decay must be in (0, 1]"),
        ("train.epochs=-1", "train.epochs must be >= 0"),
    ],
)
def test_impossible_knob_values_are_refused(override, message):
    from train.config.sections import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
