"""Decoding cluster centres into volumes (paper Supplementary Note 3; disca_tools.cluster.decoder)."""

import numpy as np

from disca_tools.cluster.decoder import (
    build_decoder,
    cluster_centers,
    decode_centers,
    train_decoder,
)

S = 11  # not a multiple of 4: the decoder must crop its 12³ output to the box


def shapes():
    z, y, x = np.mgrid[:S, :S, :S] - (S - 1) / 2
    ball = (x**2 + y**2 + z**2 < 3.5**2).astype(np.float32)
    rod = ((np.abs(x) < 5) & (y**2 + z**2 < 1.6**2)).astype(np.float32)
    return ball, rod


def make_set(n=64, f=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat([0, 1], n // 2))
    ball, rod = shapes()
    clean = np.where(labels[:, None, None, None] == 0, ball, rod)
    vols = clean + rng.normal(0, 0.3, clean.shape).astype(np.float32)
    centers = rng.normal(0, 3, (2, f))
    feats = centers[labels] + rng.normal(0, 1, (n, f))
    return feats.astype(np.float32), vols.astype(np.float32), labels


def corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_decoded_centres_resemble_their_class():
    feats, vols, labels = make_set()
    calls = []

    def source(idx):  # a callable volume source, as for a store on disk
        calls.append(len(idx))
        return vols[idx]

    epochs = 6
    model = train_decoder(
        feats, source, box=S, seed=0, epochs=epochs, width_scale=0.25, learning_rate=3e-3
    )
    assert sum(calls) >= epochs * len(feats)
    dec = decode_centers(model, feats, labels)
    assert dec.shape == (2, S, S, S) and dec.dtype == np.float32
    avg = [vols[labels == k].mean(axis=0) for k in (0, 1)]
    for k in (0, 1):
        assert corr(dec[k], avg[k]) > corr(dec[k], avg[1 - k]) + 0.2


def test_decoder_output_shape_for_any_box():
    for box in (21, 24):
        model = build_decoder(16, box, width_scale=0.125)
        assert tuple(model.output_shape) == (None, box, box, box, 1)


def test_cluster_centers_mean_and_closest():
    feats = np.array([[0.0, 0], [2, 0], [10, 10], [11, 10], [13, 10]], np.float32)
    labels = np.array([3, 3, 1, 1, 1])
    values, centers = cluster_centers(feats, labels)
    assert values.tolist() == [1, 3]
    np.testing.assert_allclose(centers, [[34 / 3, 10], [1, 0]], rtol=1e-6)
    _, closest = cluster_centers(feats, labels, closest=True)
    np.testing.assert_allclose(closest, [[11, 10], [0, 0]])
