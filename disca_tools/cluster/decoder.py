"""Decoding cluster centres into volumes (paper, Supplementary Note 3).

A small decoder is trained to reconstruct each subtomogram from its DISCA feature vector; the mean
feature of every cluster (its centre) is then decoded, giving a quick picture of what each class is
before any averaging. Keras 3 on TensorFlow: Normalization → Dense → reshape to (s₀)³ × C →
UpSampling3D + Conv3D (twice, ×4 in all) → Conv3D to one channel → crop to S³. The features are
standardised inside the model (adapted to the training features), so raw features go in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..runtime.log import logger

VolumeSource = Callable[[np.ndarray], np.ndarray] | Any


def _take(volumes: VolumeSource, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of an array-like (memmap fine) or a callable ``f(indices) -> (n, S, S, S)``."""
    if callable(volumes) and not hasattr(volumes, "shape"):
        out = volumes(idx)
    else:
        order = np.argsort(idx)
        block = np.asarray(volumes[idx[order]])  # sorted reads are kinder to memmaps
        out = np.empty_like(block)
        out[order] = block
    return np.asarray(out, dtype=np.float32)


def _normalise(vols: np.ndarray) -> np.ndarray:
    """Per-volume zero mean and unit standard deviation (as the network's input pipeline)."""
    axes = tuple(range(1, vols.ndim))
    m = vols.mean(axis=axes, keepdims=True)
    s = vols.std(axis=axes, keepdims=True)
    return (vols - m) / np.where(s > 0, s, 1.0)


def build_decoder(feature_dim: int, box: int, width_scale: float = 1.0, seed: int = 0) -> Any:
    """The decoder network: ``(F,)`` features → ``(S, S, S, 1)`` volume."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(int(seed))
    s0 = math.ceil(box / 4)
    c0 = max(4, int(round(64 * width_scale)))
    c1 = max(4, int(round(32 * width_scale)))
    c2 = max(2, int(round(16 * width_scale)))
    inp = keras.Input((feature_dim,), name="features")
    h = layers.Normalization(name="standardise")(inp)
    h = layers.Dense(s0**3 * c0, activation="elu")(h)
    h = layers.Reshape((s0, s0, s0, c0))(h)
    h = layers.UpSampling3D(2)(h)
    h = layers.Conv3D(c1, 3, padding="same", activation="elu")(h)
    h = layers.UpSampling3D(2)(h)
    h = layers.Conv3D(c2, 3, padding="same", activation="elu")(h)
    h = layers.Conv3D(1, 3, padding="same")(h)
    extra = 4 * s0 - box
    if extra:
        h = layers.Cropping3D(((extra // 2, extra - extra // 2),) * 3)(h)
    return keras.Model(inp, h, name="disca_decoder")


def train_decoder(
    features: np.ndarray,
    volumes: VolumeSource,
    box: int,
    seed: int = 0,
    epochs: int = 10,
    width_scale: float = 1.0,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    normalise: bool = True,
) -> Any:
    """Train a decoder from ``features`` (N, F) to ``volumes`` (N, S, S, S) and return it.

    ``volumes`` is an array-like indexed by particle (a memmap is streamed batch by batch) or a
    callable returning the volumes of an index array. Mean-squared-error loss, Adam, shuffled
    batches (seeded). With ``normalise`` every volume is brought to zero mean and unit standard
    deviation first, so decodings are on that scale. Memory beyond the features is one batch.
    """
    import keras

    feats = np.asarray(features, dtype=np.float32)
    n, f = feats.shape
    model = build_decoder(f, int(box), width_scale, seed)
    model.get_layer("standardise").adapt(feats)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")

    class _Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(n)

        def __len__(self) -> int:
            return math.ceil(n / batch_size)

        def __getitem__(self, i: int):
            idx = self.order[i * batch_size : (i + 1) * batch_size]
            vols = _take(volumes, idx)
            if normalise:
                vols = _normalise(vols)
            if vols.shape[1:] != (box, box, box):
                raise ValueError(f"volumes have shape {vols.shape[1:]}, expected box {box}")
            return feats[idx], vols[..., None]

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(n)

    history = model.fit(_Batches(), epochs=int(epochs), verbose=0)
    losses = history.history.get("loss", [])
    if losses:
        logger.info("Decoder trained: %d epochs, loss %.4g -> %.4g", epochs, losses[0], losses[-1])
    return model


def cluster_centers(
    features: np.ndarray, labels: np.ndarray, closest: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Mean feature of every cluster (sorted labels), or with ``closest`` the member nearest to it."""
    feats = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels).ravel()
    values = np.unique(labels)
    centers = np.stack([feats[labels == v].mean(axis=0) for v in values])
    if closest:
        picked = []
        for c, v in zip(centers, values, strict=True):
            members = feats[labels == v]
            picked.append(members[np.argmin(np.sum((members - c) ** 2, axis=1))])
        centers = np.stack(picked)
    return values, centers


def decode_centers(
    decoder: Any, features: np.ndarray, labels: np.ndarray, closest: bool = False
) -> np.ndarray:
    """Decode each cluster's mean feature: ``(K, S, S, S)`` float32, clusters in sorted label order."""
    _, centers = cluster_centers(features, labels, closest)
    out = decoder.predict(centers, verbose=0, batch_size=max(1, len(centers)))
    return np.asarray(out[..., 0], dtype=np.float32)
