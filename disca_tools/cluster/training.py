"""Training YOPO under any ``tf.distribute`` strategy: :class:`Trainer` and the BatchNorm sync.

Without a strategy and under MirroredStrategy :class:`Trainer` calls Keras' ``model.fit``. Keras 3's
``fit`` fails under MultiWorkerMirroredStrategy with more than one worker, so there it runs the
standard TensorFlow custom training loop instead: the dataset distributed by the strategy,
``strategy.run`` of a ``tf.GradientTape`` step (per-example categorical hinge loss averaged over
the global batch), the optimizer's ``apply_gradients`` summing the gradients over all replicas.
Under ``mixed_bfloat16`` the head outputs float32 and bfloat16 needs no loss scaling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..model.distribute import is_multiworker
from ..runtime.log import logger


class Trainer:
    """The training model compiled once (Nadam, categorical hinge), its optimizer state reset at
    every :meth:`fit`. Build it in ``strategy``'s scope, like the model."""

    def __init__(
        self, model: keras.Model, lr: float, strategy: tf.distribute.Strategy | None = None
    ) -> None:
        self.model = model
        model.compile(optimizer=keras.optimizers.Nadam(lr), loss=keras.losses.CategoricalHinge())
        model.optimizer.build(model.trainable_variables)
        self.initial = [np.array(v.numpy()) for v in model.optimizer.variables]
        # the custom step only where Keras' fit fails: fit elsewhere keeps seeded runs unchanged
        multiworker = strategy is not None and is_multiworker(strategy)
        self._multiworker = strategy if multiworker else None
        self._steps: dict[Any, Callable] = {}  # compiled steps by type of distributed batch

    def fit(self, dataset: tf.data.Dataset, epochs: int, lr: float) -> float:
        """Train ``epochs`` passes over ``dataset`` (global batches of ``(x, y)``) at learning rate
        ``lr`` from the initial optimizer state; return the last epoch's mean loss."""
        opt = self.model.optimizer
        for v, init in zip(opt.variables, self.initial, strict=True):
            v.assign(init)
        opt.learning_rate.assign(lr)
        if self._multiworker is None:
            hist = self.model.fit(dataset, epochs=epochs, verbose=0, shuffle=False)
            return float(hist.history["loss"][-1])
        distributed = self._multiworker.experimental_distribute_dataset(dataset)
        spec = distributed.element_spec
        if spec not in self._steps:
            logger.debug("multi-worker training: compiling the distributed step for %s", spec)
            self._steps[spec] = _distributed_step(self.model, self._multiworker, spec)
        step = self._steps[spec]
        loss = float("nan")
        for _ in range(epochs):
            # the sums stay tensors until the epoch ends: reading them every step would wait for
            # each step to finish before the next one is dispatched
            total, count = tf.constant(0.0, tf.float64), tf.constant(0, tf.int64)
            for batch in distributed:
                s, n = step(batch)
                total, count = total + tf.cast(s, tf.float64), count + n
            loss = float(total) / int(count) if int(count) else float("nan")
        return loss


def _distributed_step(model: keras.Model, strategy: tf.distribute.Strategy, spec: Any) -> Callable:
    """A training step on one distributed batch ``(x, y)`` of type ``spec``, compiled once (the
    batch size is left open); returns the sum of the per-example losses and the number of
    examples, over all replicas."""
    optimizer = model.optimizer
    weights = model.trainable_variables

    def replica_step(x, y):
        n = tf.shape(y, out_type=tf.int64)[0]
        n_global = tf.distribute.get_replica_context().all_reduce("SUM", n)  # last batch: partial
        with tf.GradientTape() as tape:
            per_example = keras.losses.categorical_hinge(y, model(x, training=True))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=n_global)
        optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights, strict=True))
        return tf.reduce_sum(per_example), n

    @tf.function(input_signature=[spec])
    def step(batch):
        total, n = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", total, axis=None), strategy.reduce("SUM", n, axis=None)

    return step


def sync_batchnorm_statistics(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Average the BatchNormalization moving statistics over all replicas (and workers).

    Each replica updates its own copy of the moving mean and variance from its part of the batch;
    features are computed in inference mode from those statistics, so they are averaged (one
    all-reduce) after each training round, before the checkpoint and the next feature pass: every
    replica, and every worker, then holds the same network and computes the same features.
    """
    bn = [x for x in model.layers if isinstance(x, keras.layers.BatchNormalization)]
    variables = [v for x in bn for v in (x.moving_mean, x.moving_variance)]
    if not variables:
        return

    @tf.function
    def averaged():
        per_replica = strategy.run(lambda: [tf.identity(v.value) for v in variables])
        return [strategy.reduce("MEAN", t, axis=None) for t in per_replica]

    for v, m in zip(variables, averaged(), strict=True):
        v.assign(m)
