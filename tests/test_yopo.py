"""YOPO network and its data pipeline: architecture, translation invariance, rotation augmentation."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from disca_tools.geometry import random_rotations, rotate_volume, rotation_angle_deg
from disca_tools.io.store import SubtomogramStore
from disca_tools.model import yopo as Y
from disca_tools.model.data import (
    batch_bounds,
    compiled_rotation,
    gather,
    predict_features,
    prediction_rotations,
    rotate_volumes,
    train_batches,
    train_dataset,
)


def test_full_network_matches_the_paper():
    model = Y.build_yopo(Y.YopoConfig(box=24, n_classes=5))
    convs = [model.get_layer(f"conv_{i}") for i in range(10)]
    assert [c.filters for c in convs] == list(range(64, 209, 16))
    assert all(c.padding == "valid" and c.kernel_size == (3, 3, 3) for c in convs)
    assert model.get_layer("taps").output.shape[-1] == 1360
    feats = model.get_layer("features")
    assert feats.units == 1024 and feats.activation.__name__ == "linear"
    extractor_params = model.count_params() - Y.head_layer(model).count_params()
    assert 6.2e6 < extractor_params < 6.4e6  # "about 6.3 M parameters"
    assert Y.head_layer(model).activation.__name__ == "softmax"


def test_width_scale_and_box_limits():
    assert Y.conv_widths(0.1) == [6, 8, 10, 11, 13, 14, 16, 18, 19, 21]
    assert min(Y.conv_widths(0.001)) == 1
    with pytest.raises(ValueError):
        Y.build_yopo(Y.YopoConfig(box=20, n_classes=2))
    m = Y.build_yopo(Y.YopoConfig(box=21, n_classes=3, width_scale=0.05, feature_dim=8))
    assert m.get_layer("conv_9").output.shape[1:4] == (1, 1, 1)


def test_mixed_precision_keeps_head_and_features_float32():
    m = Y.build_yopo(Y.YopoConfig(24, 3, 0.05, 8, "mixed_bfloat16"))
    assert m.get_layer("conv_0").compute_dtype == "bfloat16"
    assert m.get_layer("conv_0").variable_dtype == "float32"
    assert Y.head_layer(m).compute_dtype == "float32"
    assert str(Y.feature_extractor(m).output.dtype).endswith("float32")
    assert Y.resolve_precision("float32") == "float32"
    assert Y.resolve_precision("auto") in ("float32", "mixed_bfloat16")
    with pytest.raises(ValueError):
        Y.resolve_precision("float16")


def test_features_of_shifted_content_equal_in_inference_mode():
    """What is exactly true: global max pooling over 'valid' convolutions makes the features equal
    for an integer shift of zero-padded content as long as, at every layer, every window that
    touches the content lies inside the box in both positions (receptive field 2L+1 ≤ 21 here):
    then both inputs produce the same set of window contents, hence the same maxima. A 64³ box
    leaves room for that; content touching the border breaks it (the negative control)."""
    rng = np.random.default_rng(3)
    s = 64
    model = Y.build_yopo(Y.YopoConfig(s, 3, 0.05, 16), seed=1)
    # non-trivial BatchNorm statistics so the test covers them too
    for layer in model.layers:
        if isinstance(layer, Y.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    ext = Y.feature_extractor(model)
    content = rng.normal(size=(8, 8, 8)).astype(np.float32)

    def placed(z, y, x):
        v = np.zeros((s, s, s), np.float32)
        v[z : z + 8, y : y + 8, x : x + 8] = content
        return v

    vols = np.stack([placed(20, 20, 20), placed(25, 29, 33), placed(36, 21, 30), placed(5, 20, 20)])
    f = ext.predict(vols[..., None], verbose=0)
    np.testing.assert_allclose(f[1], f[0], rtol=1e-5, atol=1e-5 * np.abs(f[0]).max())
    np.testing.assert_allclose(f[2], f[0], rtol=1e-5, atol=1e-5 * np.abs(f[0]).max())
    assert np.abs(f[3] - f[0]).max() > 1e-3 * np.abs(f[0]).max()  # content near the border: differs
    # training mode (Gaussian dropout) is stochastic: not the same
    g = ext(vols[:1, ..., None], training=True).numpy()
    assert np.abs(g - f[:1]).max() > 1e-4


@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "xla"])
def test_in_graph_rotation_matches_geometry_rotate_volume(compiled):
    rng = np.random.default_rng(0)
    vols = rng.normal(size=(3, 24, 24, 24)).astype(np.float32)
    mats = np.concatenate([np.eye(3)[None], random_rotations(2, rng)]).astype(np.float32)
    rotate = compiled_rotation() if compiled else rotate_volumes  # XLA: what training uses
    out = rotate(vols, mats, np.full(vols.shape, 1e6, np.float32)).numpy()
    np.testing.assert_array_equal(out[0], vols[0])  # identity is exact (originals pass unchanged)
    for i in (1, 2):
        ref = rotate_volume(vols[i], mats[i], order=1, fill=np.nan)  # about the centre N//2
        inside = np.isfinite(ref)
        np.testing.assert_array_equal(inside, out[i] < 1e5)  # same voxels come from outside
        np.testing.assert_allclose(out[i][inside], ref[inside], atol=1e-4)


def test_input_dropout_rate_is_the_configured_one():
    """The paper's rate 0.5 multiplies the input by N(1, 1) noise in training; 0 leaves it alone."""
    x = np.random.default_rng(0).normal(size=(4, 24, 24, 24, 1)).astype(np.float32)
    for rate in (0.5, 0.0):
        model = Y.build_yopo(Y.YopoConfig(24, 2, 0.05, 8, input_dropout=rate), seed=1)
        layer = model.get_layer(Y.DROPOUT_LAYER)
        np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
        factor = np.asarray(layer(x, training=True)) / x
        assert abs(float(factor.std()) - np.sqrt(rate / (1 - rate))) < 0.01
        Y.reset_dropout_seed(model, 3)  # no random state to reset at rate 0: must not fail


def _store(n: int, box: int, seed: int = 0) -> SubtomogramStore:
    rng = np.random.default_rng(seed)
    vols = rng.normal(2.0, 3.0, size=(n, box, box, box)).astype(np.float32)
    return SubtomogramStore(vols, [f"p{i}" for i in range(n)], Path("mem"))


def test_augmentation_rotations_are_uniform_on_so3():
    store = _store(1500, 4)
    targets = np.eye(2, dtype=np.float32)[np.arange(1500) % 2]
    mats = []
    n_identity = 0
    for _x, m, n_orig, _seed, _y in train_batches(
        store, np.arange(1500), targets, 250, np.random.default_rng(5)
    ):
        ident = np.all(np.abs(m - np.eye(3)) < 1e-7, axis=(1, 2))
        assert ident[:n_orig].all() and not ident[n_orig:].any()  # the originals come first
        n_identity += int(ident.sum())
        mats.append(m[~ident])
    mats = np.concatenate(mats).astype(np.float64)
    assert n_identity == 1500 and len(mats) == 1500  # N originals + N rotated copies
    theta = np.radians(rotation_angle_deg(mats))
    # Haar measure: rotation angle density (1 − cos θ)/π, CDF (θ − sin θ)/π
    assert stats.kstest(theta, lambda t: (t - np.sin(t)) / np.pi).pvalue > 1e-3
    z = mats[:, :, 2]  # image of the z axis: uniform on the sphere
    assert stats.kstest(z[:, 2], "uniform", args=(-1, 2)).pvalue > 1e-3
    assert (
        stats.kstest(np.arctan2(z[:, 1], z[:, 0]), "uniform", args=(-np.pi, 2 * np.pi)).pvalue
        > 1e-3
    )
    # the test has power: the reference code's SVD of a uniform random matrix is rejected
    rng = np.random.default_rng(1)
    svd = np.stack([np.linalg.svd(rng.uniform(size=(3, 3)))[0] for _ in range(1500)])
    svd = svd * np.sign(np.linalg.det(svd))[:, None, None]
    assert (
        stats.kstest(np.radians(rotation_angle_deg(svd)), lambda t: (t - np.sin(t)) / np.pi).pvalue
        < 1e-6
    )


def test_training_batches_fill_with_unit_noise_and_keep_labels():
    store = _store(40, 24, seed=2)
    labels = np.arange(40) % 4
    targets = np.eye(4, dtype=np.float32)[labels]
    ds = train_dataset(store, np.arange(40), targets, batch_size=16, seed=0)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.shape == (80, 24, 24, 24, 1) and y.shape == (80, 4)
    assert np.bincount(np.argmax(y, 1), minlength=4).tolist() == [20, 20, 20, 20]
    originals = gather(store, np.arange(40))
    is_orig = np.array([np.any(np.all(v[..., 0] == originals, axis=(1, 2, 3))) for v in x])
    assert is_orig.sum() == 40  # N originals pass unchanged (normalised), N rotated copies
    rot = x[~is_orig, ..., 0]
    # trilinear interpolation of white data lowers its variance; the noise fill is unit variance
    assert abs(float(rot.mean())) < 0.05 and 0.6 < float(rot.std()) <= 1.0
    # the corner voxel (distance 20.8 from the centre) always comes from outside the box: it is
    # N(0, 1) noise, not the reference's zeros
    corner = rot[:, 0, 0, 0]
    assert np.count_nonzero(corner == 0.0) == 0
    assert abs(float(corner.mean())) < 0.6 and 0.6 < float(corner.std()) < 1.5
    # two datasets with one seed give the same batches
    ds2 = train_dataset(store, np.arange(40), targets, batch_size=16, seed=0)
    np.testing.assert_array_equal(np.concatenate([a.numpy() for a, _ in ds2]), x)


def test_training_batches_split_evenly_among_replicas():
    store = _store(35, 24, seed=3)  # 70 examples: batches of 16 leave 6
    targets = np.eye(35, dtype=np.float32)
    assert batch_bounds(70, 16, 4) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 68)]
    assert batch_bounds(66, 16, 4)[-1] == (48, 64)  # a last batch of 2 < 4 replicas is dropped
    for replicas, sizes in ((1, [16, 16, 16, 16, 6]), (4, [16, 16, 16, 16, 4])):
        ds = train_dataset(store, np.arange(35), targets, 16, seed=0, multiple=replicas)
        batches = [y.numpy() for _x, y in ds]
        assert [len(y) for y in batches] == sizes and int(ds.cardinality()) == len(sizes)
        counts = np.bincount(np.argmax(np.concatenate(batches), 1), minlength=35)
        assert counts.max() <= 2 and counts.sum() == sum(sizes)  # an original and a copy each


def test_streamed_prediction_equals_in_memory_prediction():
    store = _store(37, 24, seed=4)
    ext = Y.feature_extractor(Y.build_yopo(Y.YopoConfig(24, 2, 0.05, 8)))
    rows = np.array([5, 3, 30, 0, 12] + list(range(6, 12)))
    f = predict_features(ext, store, rows, batch_size=4)
    direct = ext.predict(gather(store, rows)[..., None], verbose=0)
    np.testing.assert_allclose(f, direct, rtol=1e-5, atol=1e-6)
    assert f.shape == (len(rows), 8) and f.dtype == np.float32


def test_rotation_averaged_features_are_the_mean_over_the_rotated_copies(monkeypatch):
    """--predict-rotations N: the mean of the features of each volume and of N − 1 copies rotated
    (about the centre, trilinear, noise-filled corners) by the same seeded rotations, whatever the
    batch size and through the compiled local call too, each volume read from the store once;
    another seed gives other rotations; N = 1 is the plain prediction."""
    import disca_tools.model.data as D

    store = _store(9, 24, seed=6)
    read = []

    def counting_gather(st, rows):
        read.extend(np.asarray(rows).tolist())
        return gather(st, rows)

    monkeypatch.setattr(D, "gather", counting_gather)
    ext = Y.feature_extractor(Y.build_yopo(Y.YopoConfig(24, 2, 0.05, 8)))
    rows = np.array([4, 0, 7, 2, 8])
    mats, fills = prediction_rotations(2, 24, seed=5)
    assert mats.shape == (2, 3, 3) and fills.shape == (2, 24, 24, 24)
    np.testing.assert_allclose(
        mats @ mats.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-5
    )
    vols = gather(store, rows)
    passes = [ext.predict(vols[..., None], verbose=0)]
    for m, fill in zip(mats, fills, strict=True):
        rotated = np.stack([rotate_volume(v, m, order=1, fill=np.nan) for v in vols])
        rotated = np.where(np.isnan(rotated), fill, rotated)  # voxels from outside: the fill
        passes.append(ext.predict(rotated[..., None].astype(np.float32), verbose=0))
    expected = np.mean(passes, axis=0)
    for batch, local in ((2, False), (5, False), (7, True)):
        read.clear()
        f = predict_features(ext, store, rows, batch_size=batch, local=local, rotations=3, seed=5)
        np.testing.assert_allclose(f, expected, rtol=1e-4, atol=1e-5)
        assert read == rows.tolist()  # each volume read once, in order
    # the compiled local call is kept on the copy-mean model and reused by a later prediction
    step = getattr(Y.copy_mean_model(ext, 3), D._LOCAL_STEP)
    again = predict_features(ext, store, rows, batch_size=7, local=True, rotations=3, seed=5)
    assert getattr(Y.copy_mean_model(ext, 3), D._LOCAL_STEP) is step
    np.testing.assert_allclose(again, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected, passes[0], atol=1e-3)  # the copies do change the features
    other = predict_features(ext, store, rows, batch_size=5, rotations=3, seed=6)
    assert not np.allclose(other, expected, atol=1e-3)
    plain = predict_features(ext, store, rows, batch_size=5, rotations=1, seed=5)
    np.testing.assert_allclose(plain, passes[0], rtol=1e-5, atol=1e-6)


def test_batchnorm_calibration_sets_the_data_statistics(tmp_path):
    """After calibration each BatchNormalization layer's moving statistics are the mean and variance
    of its input on the data, so in inference mode its output is standardised. A second calibration
    (through the probes kept from the first) follows new data, and the model still saves."""
    import keras

    rng = np.random.default_rng(0)
    vols = rng.normal(size=(24, 24, 24, 24)).astype(np.float32) * 3.0 + 1.0
    model = Y.build_yopo(Y.YopoConfig(24, 3, 0.05, 16))
    Y.calibrate_batchnorm(model, vols, batch_size=10)
    for name in ("bn_0", "bn_5", "features_bn"):
        layer = model.get_layer(name)
        inp = keras.Model(model.inputs, layer.input).predict(vols[..., None], verbose=0)
        inp = inp.reshape(-1, inp.shape[-1]).astype(np.float64)
        np.testing.assert_allclose(layer.moving_mean.numpy(), inp.mean(0), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), inp.var(0), rtol=1e-3, atol=1e-5)
        out = keras.Model(model.inputs, layer.output).predict(vols[..., None], verbose=0)
        out = out.reshape(-1, out.shape[-1])
        assert np.allclose(out.std(0), np.abs(layer.gamma.numpy()), rtol=0.05)
    other = (vols[:12] - 1.0) * 0.5
    Y.calibrate_batchnorm(model, other, batch_size=5)
    layer = model.get_layer("features_bn")
    inp = keras.Model(model.inputs, layer.input).predict(other[..., None], verbose=0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), inp.mean(0), rtol=1e-3, atol=1e-4)
    model.save(tmp_path / "calibrated.keras")
    assert len(keras.models.load_model(tmp_path / "calibrated.keras").weights) == len(model.weights)


def test_dataset_rotation_is_xla_here_and_falls_back_when_xla_fails(monkeypatch, caplog):
    import tensorflow as tf

    from disca_tools.model import data

    data.dataset_rotation.cache_clear()
    assert data.dataset_rotation() is data.compiled_rotation()  # XLA works inside tf.data here

    @tf.function
    def broken(vols, mats, noise):
        tf.debugging.assert_equal(1, 0, message="no XLA here")
        return vols

    monkeypatch.setattr(data, "compiled_rotation", lambda: broken)
    data.dataset_rotation.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="disca_tools"):
            fallback = data.dataset_rotation()
        assert fallback is not broken
        assert "XLA rotation unavailable" in caplog.text
        rng = np.random.default_rng(1)
        vols = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)
        mats = random_rotations(2, rng).astype(np.float32)
        noise = np.zeros_like(vols)
        np.testing.assert_allclose(
            fallback(vols, mats, noise).numpy(),
            rotate_volumes(vols, mats, noise).numpy(),
            atol=1e-5,
        )
    finally:
        data.dataset_rotation.cache_clear()
