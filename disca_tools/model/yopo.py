"""YOPO ("You Only Pool Once"): the DISCA feature extractor and its classification head.

Architecture (METHOD.md, as in the reference): input S³×1 (S ≥ 21) → GaussianDropout(0.5, or
``input_dropout``) →
10 blocks [Conv3D 3×3×3 'valid' with widths 64, 80, …, 208, ELU, BatchNormalization], each block
tapped by a GlobalMaxPooling3D → concatenate the 10 taps (1360 values) → BatchNormalization →
Dense(1024), linear: the features → Dense(K, softmax): the training head. Orthogonal kernels,
zero biases. About 6.3 M parameters at full width. BatchNormalization uses momentum 0.9 (Keras'
default 0.99 leaves the moving statistics, used to extract features in inference mode, mostly at
their initial values after the few dozen steps of one EM iteration on a small data set).

``width_scale`` multiplies every convolution width (rounded, at least 1) so the network fits a CPU;
``feature_dim`` (1024 by default) is the width of the feature layer and is *not* scaled
automatically: pass a smaller one with small widths (the tests use width_scale 0.1, feature_dim 64).

Precision: ``"mixed_bfloat16"`` computes in bfloat16 with float32 weights; the softmax head always
computes in float32 and the features are returned as float32. ``resolve_precision("auto")`` picks
mixed bfloat16 where the hardware has native bfloat16 (x86 AVX512-BF16/AMX, or a GPU of compute
capability ≥ 8.0), float32 otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np
from keras import layers

from ..runtime.provenance import cpu_info
from . import MIN_BOX

PRECISIONS = ("auto", "float32", "mixed_bfloat16")
BASE_WIDTHS = tuple(64 + 16 * i for i in range(10))
FEATURES_LAYER = "features"
HEAD_LAYER = "classifier"
DROPOUT_LAYER = "input_dropout"
BN_MOMENTUM = 0.9


@dataclass(frozen=True)
class YopoConfig:
    """Everything needed to rebuild a YOPO network (saved beside trained models)."""

    box: int
    n_classes: int
    width_scale: float = 1.0
    feature_dim: int = 1024
    precision: str = "float32"
    input_dropout: float = 0.5  # GaussianDropout rate on the input (training only; 0: none)

    def to_dict(self) -> dict:
        return asdict(self)


def conv_widths(width_scale: float = 1.0) -> list[int]:
    """The 10 convolution widths (64..208 step 16) times ``width_scale`` (at least 1 each)."""
    return [max(1, int(round(w * float(width_scale)))) for w in BASE_WIDTHS]


def _cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["flags"]))


def _gpu_has_bf16() -> bool:
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if cc and tuple(cc) >= (8, 0):
            return True
    return False


def resolve_precision(precision: str = "auto") -> str:
    """``auto`` → ``mixed_bfloat16`` when the hardware computes bfloat16 natively, else ``float32``.

    The environment variable ``DISCA_PRECISION`` overrides ``auto``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    env = os.environ.get("DISCA_PRECISION")
    if env in ("float32", "mixed_bfloat16"):
        return env
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_bfloat16" if _gpu_has_bf16() else "float32"
    return "mixed_bfloat16" if _cpu_has_bf16() else "float32"


def _seed(seed: int, i: int) -> int:
    return (int(seed) * 1009 + i * 7919) % (2**31 - 1)


def build_yopo(config: YopoConfig, seed: int = 0) -> keras.Model:
    """Build the training model (subtomogram → softmax over ``config.n_classes``).

    Layer names: ``input_dropout``, ``conv_i``/``bn_i``/``pool_i`` (i = 0..9), ``taps``,
    ``features_bn``, ``features`` (the feature vector), ``classifier`` (the head).
    """
    if config.box < MIN_BOX:
        raise ValueError(f"YOPO needs a box of at least {MIN_BOX} voxels, got {config.box}")
    if config.precision not in ("float32", "mixed_bfloat16"):
        raise ValueError(f"resolve the precision first, got {config.precision!r}")
    dtype = config.precision
    s = int(config.box)
    inp = keras.Input((s, s, s, 1), name="subtomogram")
    x = layers.GaussianDropout(
        config.input_dropout, seed=_seed(seed, 100), name=DROPOUT_LAYER, dtype=dtype
    )(inp)
    taps = []
    for i, w in enumerate(conv_widths(config.width_scale)):
        x = layers.Conv3D(
            w,
            3,
            padding="valid",
            activation="elu",
            kernel_initializer=keras.initializers.Orthogonal(seed=_seed(seed, i)),
            bias_initializer="zeros",
            name=f"conv_{i}",
            dtype=dtype,
        )(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn_{i}", dtype=dtype)(x)
        taps.append(layers.GlobalMaxPooling3D(name=f"pool_{i}", dtype=dtype)(x))
    h = layers.Concatenate(name="taps", dtype=dtype)(taps)
    h = layers.BatchNormalization(momentum=BN_MOMENTUM, name="features_bn", dtype=dtype)(h)
    feats = layers.Dense(
        int(config.feature_dim),
        kernel_initializer=keras.initializers.Orthogonal(seed=_seed(seed, 50)),
        bias_initializer="zeros",
        name=FEATURES_LAYER,
        dtype=dtype,
    )(h)
    out = _head(config.n_classes, seed)(feats)
    return keras.Model(inp, out, name="yopo")


def _head(n_classes: int, seed: int) -> layers.Dense:
    return layers.Dense(
        int(n_classes),
        activation="softmax",
        kernel_initializer=keras.initializers.Orthogonal(seed=_seed(seed, 60)),
        bias_initializer="zeros",
        name=HEAD_LAYER,
        dtype="float32",  # the softmax head stays float32 under mixed precision
    )


def replace_head(model: keras.Model, n_classes: int, seed: int = 0) -> keras.Model:
    """A model sharing every extractor layer of ``model`` with a fresh ``n_classes`` softmax head."""
    feats = model.get_layer(FEATURES_LAYER).output
    out = _head(n_classes, seed)(feats)
    return keras.Model(model.inputs, out, name="yopo")


def head_layer(model: keras.Model) -> layers.Dense:
    return model.get_layer(HEAD_LAYER)


def feature_extractor(model: keras.Model) -> keras.Model:
    """The inference model subtomogram → float32 features (shares weights with ``model``)."""
    feats = model.get_layer(FEATURES_LAYER).output
    out = layers.Activation("linear", dtype="float32", name="features_float32")(feats)
    return keras.Model(model.inputs[0], out, name="yopo_features")


def kept_on(model: keras.Model, name: str, make: Callable[[], Any]) -> Any:
    """``make()``, made once per ``model`` and kept on it as attribute ``name`` (outside Keras'
    attribute tracking, so not a sub-layer or weight): what an EM loop would otherwise rebuild and
    retrace every iteration for the same network (compiled functions, wrapper models)."""
    kept = getattr(model, name, None)
    if kept is None:
        kept = make()
        object.__setattr__(model, name, kept)  # not a tracked sub-layer
    return kept


_COPY_MEANS = "_disca_copy_means"


class _CopyMean(keras.Model):
    """``(B, C, S, S, S, 1)`` → the mean over the C copies of ``extractor``'s features, (B, F)."""

    def __init__(self, extractor: keras.Model, copies: int) -> None:
        super().__init__(dtype="float32", name="yopo_features_copy_mean")
        self.extractor = extractor
        self.copies = int(copies)
        self.size = int(extractor.output.shape[-1])

    def call(self, x):
        flat = keras.ops.reshape(x, (-1, *x.shape[2:]))
        feats = keras.ops.cast(self.extractor(flat, training=False), "float32")
        return keras.ops.mean(keras.ops.reshape(feats, (-1, self.copies, self.size)), axis=1)


def copy_mean_model(extractor: keras.Model, copies: int) -> keras.Model:
    """A model from ``(B, copies, S, S, S, 1)`` (each volume and its copies, as
    :func:`disca_tools.model.data.inference_dataset` gives them) to the mean of ``extractor``'s
    features over the copies, (B, F) float32. It shares ``extractor``'s weights and its
    ``tf.distribute`` strategy; the copies of a volume stay on one replica. Kept on ``extractor``
    (one per ``copies``), so each EM iteration's prediction reuses its traced function."""
    cache = kept_on(extractor, _COPY_MEANS, dict)
    if copies not in cache:
        with extractor.distribute_strategy.scope():
            cache[copies] = _CopyMean(extractor, copies)
    return cache[copies]


def n_classes_of(model: keras.Model) -> int:
    return int(head_layer(model).units)


_BN_PROBES = "_disca_batchnorm_probes"


def _batchnorm_probes(model: keras.Model) -> list[tuple[layers.BatchNormalization, Any]]:
    """Each BatchNormalization layer of ``model`` with a compiled function from the model's input
    to that layer's input (inference mode); built once per model (the EM loop calibrates the same
    network every iteration; kept on the model, outside Keras' attribute tracking)."""
    import tensorflow as tf

    def make() -> list[tuple[layers.BatchNormalization, Any]]:
        probes = []
        for layer in [m for m in model.layers if isinstance(m, layers.BatchNormalization)]:
            probe = keras.Model(model.inputs, layer.input)
            step = tf.function(
                lambda v, probe=probe: probe(v, training=False), reduce_retracing=True
            )
            probes.append((layer, step))
        return probes

    return kept_on(model, _BN_PROBES, make)


def calibrate_batchnorm(model: keras.Model, volumes: np.ndarray, batch_size: int = 64) -> None:
    """Set every BatchNormalization layer's moving mean and variance to the statistics of its input
    on ``volumes`` (normalised subtomograms ``(n, S, S, S)``), layer by layer in inference mode.

    A freshly built network's moving statistics are their initial values (mean 0, variance 1), so in
    inference mode its normalisation layers normalise nothing and the untrained features that start
    the EM loop are dominated by whichever taps happen to be largest. Calibrated, the untrained
    network's features carry much more class information (benchmarks/probe_initial_features.py).
    Each layer is calibrated after the layers before it, so it sees the inputs it will see later.
    """
    x = np.asarray(volumes, dtype=np.float32)[..., None]
    for layer, step in _batchnorm_probes(model):
        total = total_sq = None
        count = 0
        for start in range(0, len(x), batch_size):
            a = np.asarray(step(x[start : start + batch_size]), dtype=np.float64)
            a = a.reshape(-1, a.shape[-1])
            total = a.sum(0) if total is None else total + a.sum(0)
            total_sq = (a * a).sum(0) if total_sq is None else total_sq + (a * a).sum(0)
            count += a.shape[0]
        mean = total / count
        var = np.maximum(total_sq / count - mean * mean, 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))


def reset_dropout_seed(model: keras.Model, seed: int) -> None:
    """Set the input GaussianDropout's random state (so each EM iteration's noise is reproducible)."""
    layer = model.get_layer(DROPOUT_LAYER)
    gen = getattr(layer, "seed_generator", None)
    if gen is not None:
        gen.state.assign(np.array([_seed(seed, 1), 0], dtype=gen.state.dtype))
