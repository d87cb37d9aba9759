"""Distortion-based Davies–Bouldin index (paper Eq. S1–S3) in O(N) (disca_tools.cluster.ddbi)."""

import numpy as np
import pytest

from disca_tools.cluster import ddbi as ddbi_mod
from disca_tools.cluster.ddbi import ddbi, ddbi_naive


def clusters(sizes=(40, 70, 25), p=5, spread=4.0, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i, n in enumerate(sizes):
        a = rng.normal(size=(p, p)) * 0.5 + np.eye(p)  # anisotropic covariance
        xs.append(rng.normal(size=(n, p)) @ a + rng.normal(0, spread, p))
        ys.append(np.full(n, i * 3 + 1))  # non-contiguous label values
    return np.concatenate(xs), np.concatenate(ys)


def test_hand_computed_one_dimension():
    x = np.array([[-1.0], [1.0], [9.0], [11.0]])
    y = np.array([0, 0, 1, 1])
    # means 0 and 10, unbiased variances 2: t = (1/2)(1/2 + 1/2) = 0.5, d_ij = d_ji = 100/2 = 50
    assert ddbi(x, y, reg_covar=0.0) == pytest.approx((0.5 + 0.5) / (50 + 50))


def test_equals_naive_on_small_data(monkeypatch):
    x, y = clusters()
    expected = ddbi_naive(x, y)
    assert ddbi(x, y) == pytest.approx(expected, rel=1e-10)
    monkeypatch.setattr(ddbi_mod, "_CHUNK", 7)  # many chunks must sum to the same tightness
    assert ddbi(x, y) == pytest.approx(expected, rel=1e-10)


def test_equals_naive_with_given_means_and_covariances():
    x, y = clusters(seed=3)
    rng = np.random.default_rng(5)
    means = rng.normal(size=(3, 5))
    a = rng.normal(size=(3, 5, 5))
    covs = a @ a.transpose(0, 2, 1) + np.eye(5)
    assert ddbi(x, y, means, covs) == pytest.approx(ddbi_naive(x, y, means, covs), rel=1e-10)


def test_better_separation_scores_lower():
    tight, y = clusters(spread=20.0, seed=1)
    loose, y2 = clusters(spread=2.0, seed=1)
    assert ddbi(tight, y) < ddbi(loose, y2)


def test_single_cluster_is_inf():
    x, _ = clusters(sizes=(30,))
    assert ddbi(x, np.zeros(30)) == float("inf")


def test_singleton_cluster_does_not_fail():
    x, y = clusters(sizes=(30, 30, 1))
    value = ddbi(x, y)
    assert np.isfinite(value)
    assert value == pytest.approx(ddbi_naive(x, y), rel=1e-8)
