"""Discriminant projections (--projection lda) and LDA-k-means refinement (--init-refine lda)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from disca_tools.cluster.discriminant import (
    DiscriminantProjection,
    fit_discriminant_projection,
    refine_by_discriminants,
)
from disca_tools.cluster.matching import accuracy_after_matching
from disca_tools.cluster.mixture import fit_pca, select_mixture


def _hidden_classes(n_per_class: int = 150, noise_dims: int = 40, seed: int = 0):
    """Three classes apart along 2 directions of small variance, hidden among ``noise_dims``
    directions of large variance (PCA's first components are all noise)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [1.5, 0.0], [0.75, 1.3]])
    truth = np.repeat(np.arange(3), n_per_class)
    signal = centres[truth] + 0.25 * rng.standard_normal((len(truth), 2))
    noise = 3.0 * rng.standard_normal((len(truth), noise_dims))
    return np.hstack([noise[:, :5], signal, noise[:, 5:]]), truth


def test_the_projection_finds_the_directions_that_separate_the_clusters():
    x, truth = _hidden_classes()
    proj = fit_discriminant_projection(x, truth, seed=0)
    assert isinstance(proj, DiscriminantProjection) and proj.components_.shape == (2, x.shape[1])
    z = proj.transform(x)
    assert z.shape == (len(x), 2)
    km = KMeans(3, n_init=10, random_state=0)
    assert accuracy_after_matching(truth, km.fit_predict(z)) > 0.97
    z_pca = fit_pca(x, 2, 0).transform(x)  # the two directions of most variance: noise
    assert accuracy_after_matching(truth, km.fit_predict(z_pca)) < 0.5
    # the PCA interface the head warm-up uses: transform = (x − mean_) · components_ᵀ
    np.testing.assert_allclose(z, (x - proj.mean_) @ proj.components_.T)
    with pytest.raises(ValueError, match="at least 2 clusters"):
        fit_discriminant_projection(x, np.zeros(len(x), int), seed=0)


def test_the_projection_of_many_points_is_fitted_on_a_seeded_subset():
    x, truth = _hidden_classes()
    a = fit_discriminant_projection(x, truth, seed=1, max_fit_points=200)
    b = fit_discriminant_projection(x, truth, seed=1, max_fit_points=200)
    c = fit_discriminant_projection(x, truth, seed=2, max_fit_points=200)
    np.testing.assert_array_equal(a.components_, b.components_)
    assert not np.allclose(a.components_, c.components_)
    km = KMeans(3, n_init=10, random_state=0)
    assert accuracy_after_matching(truth, km.fit_predict(a.transform(x))) > 0.95


def test_refinement_recovers_the_classes_from_a_rough_start_and_keeps_k():
    x, truth = _hidden_classes()
    rng = np.random.default_rng(3)
    rough = truth.copy()
    flip = rng.random(len(truth)) < 0.4
    rough[flip] = rng.integers(0, 3, flip.sum())
    start = select_mixture(x[:, :2], [3], seed=0)  # a selection object to refine
    start.labels, start.k = rough, 3
    assert accuracy_after_matching(truth, rough) < 0.8
    refined, z = refine_by_discriminants(x, start, seed=0)
    assert refined.k == 3 and z.shape == (len(x), 2)
    assert accuracy_after_matching(truth, refined.labels) > 0.97
    assert refined.posteriors.shape == (len(x), 3)
    np.testing.assert_array_equal(refined.labels, np.argmax(refined.posteriors, axis=1))
    assert refined.bic_by_k == start.bic_by_k  # the K chosen before is kept, with its criterion
