"""PCA, Gaussian mixtures and the paper's BIC (disca_tools.cluster.mixture)."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from disca_tools.cluster import mixture
from disca_tools.cluster.config import INIT_COVARIANCES
from disca_tools.cluster.matching import accuracy_after_matching
from disca_tools.runtime.errors import UserError


def blobs(k=4, n=200, p=6, spread=12.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, spread, (k, p))
    x = np.concatenate([rng.normal(c, 1.0, (n, p)) for c in centers])
    y = np.repeat(np.arange(k), n)
    order = rng.permutation(len(y))
    return x[order], y[order]


def test_paper_bic_equals_direct_loglik():
    x, _ = blobs(k=3, n=80, p=4)
    gmm = GaussianMixture(3, covariance_type="full", random_state=0).fit(x)
    # direct log-likelihood from the fitted parameters, independent of score_samples
    dens = sum(
        w * multivariate_normal(m, c).pdf(x)
        for w, m, c in zip(gmm.weights_, gmm.means_, gmm.covariances_, strict=True)
    )
    loglik = np.sum(np.log(dens))
    n, p, k = len(x), x.shape[1], 3
    expected = k * (p * p + p) / 2 * np.log(n) - 2 * loglik
    assert mixture.paper_bic(gmm, x) == pytest.approx(expected, rel=1e-9)
    # sklearn counts the means and weights too: the difference is exactly (K·P + K − 1) ln N
    diff = mixture.sklearn_bic(gmm, x) - mixture.paper_bic(gmm, x)
    assert diff == pytest.approx((k * p + k - 1) * np.log(n), rel=1e-9)


@pytest.mark.parametrize("criterion", ["paper", "sklearn"])
def test_select_finds_true_k(criterion):
    x, y = blobs(k=4)
    sel = mixture.select_mixture(x, list(range(2, 9)), seed=0, criterion=criterion)
    assert sel.k == 4
    assert min(sel.bic_by_k, key=sel.bic_by_k.get) == 4
    assert set(sel.bic_by_k) == set(range(2, 9))
    assert accuracy_after_matching(y, sel.labels) == 1.0
    assert sel.posteriors.shape == (len(x), 4)
    np.testing.assert_allclose(sel.posteriors.sum(axis=1), 1.0)
    assert np.array_equal(np.unique(sel.labels), np.arange(4))
    assert sel.loglik == pytest.approx(np.sum(sel.gmm.score_samples(x)))
    assert not sel.inherited


def correlated_blobs(k=3, n=300, p=4, seed=0):
    """Well-separated clusters, each with a strongly correlated (elongated, tilted) covariance."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(k):
        a = rng.normal(0, 1, (p, p))
        parts.append(rng.multivariate_normal(rng.normal(0, 8, p), a @ a.T + 0.05 * np.eye(p), n))
    return np.concatenate(parts), np.repeat(np.arange(k), n)


@pytest.mark.parametrize(
    "data, family, true_k",
    [
        (correlated_blobs(), "full", 3),  # diagonal components need K 8 for three tilted clusters
        (blobs(k=6, n=60, p=8, spread=2.5), "diag", 6),  # round clusters: full ones are too costly
    ],
)
def test_auto_initial_covariance_keeps_the_family_with_the_lower_sklearn_bic(data, family, true_k):
    """--init-covariance auto: full (paper BIC) and diagonal (scikit-learn BIC) selections are made,
    and the one whose chosen model has the lower scikit-learn BIC is returned; here it is the family
    that finds the true K."""
    x, y = data
    ks = list(range(2, 9))
    fits = {c: mixture.select_initial_mixture(x, ks, 0, c) for c in ("full", "diag")}
    assert fits["full"].k != fits["diag"].k
    assert fits["full"].gmm.covariance_type == "full"
    assert fits["diag"].gmm.covariance_type == "diag"
    auto = mixture.select_initial_mixture(x, ks, 0, "auto")
    scores = {c: mixture.sklearn_bic(f.gmm, x) for c, f in fits.items()}
    assert min(scores, key=scores.get) == family
    assert auto.gmm.covariance_type == family and auto.k == fits[family].k == true_k
    np.testing.assert_array_equal(auto.labels, fits[family].labels)
    assert accuracy_after_matching(y, auto.labels) > 0.95
    with pytest.raises(ValueError, match="covariance"):
        mixture.select_initial_mixture(x, ks, 0, "spherical")
    assert set(INIT_COVARIANCES) == {*mixture.INIT_CRITERIA, "auto"}  # the CLI's choices


def test_subsampled_fit_still_finds_k():
    x, y = blobs(k=4, n=400)
    sel = mixture.select_mixture(x, [2, 3, 4, 5, 6], seed=1, max_fit_points=300)
    assert sel.k == 4
    assert accuracy_after_matching(y, sel.labels) == 1.0


def test_inherited_fit_keeps_label_numbers():
    x, _ = blobs(k=4)
    first = mixture.select_mixture(x, [3, 4, 5], seed=0)
    perm = np.array([2, 0, 3, 1])
    prev = perm[first.labels]  # same partition, different numbering
    second = mixture.select_mixture(x, [3, 4, 5], seed=7, prev_labels=prev, prev_k=4)
    assert second.k == 4
    assert second.inherited
    assert np.array_equal(second.labels, prev)


def test_inherited_loses_to_better_de_novo_fit():
    x, y = blobs(k=4)
    bad_prev = np.random.default_rng(3).integers(0, 4, len(x))  # random partition: poor start
    sel = mixture.select_mixture(x, [4], seed=0, prev_labels=bad_prev, prev_k=4)
    # whichever fit is kept, it has the higher likelihood; the result must recover the blobs
    assert accuracy_after_matching(y, sel.labels) == 1.0


def test_empty_clusters_dropped():
    x, y = blobs(k=3, n=100, p=3)
    gmm = GaussianMixture(3, random_state=0).fit(x)
    # add a fourth component far away that no point chooses
    big = GaussianMixture(4)
    big.weights_ = np.append(gmm.weights_ * 0.99, 0.01)
    big.means_ = np.vstack([gmm.means_, np.full(3, 1e3)])
    big.covariances_ = np.concatenate([gmm.covariances_, np.eye(3)[None]])
    big.precisions_cholesky_ = np.concatenate([gmm.precisions_cholesky_, np.eye(3)[None]])
    big.precisions_ = np.concatenate([gmm.precisions_, np.eye(3)[None]])
    big.covariance_type, big.n_features_in_ = "full", 3
    big.converged_, big.n_iter_, big.lower_bound_ = True, 1, 0.0
    # make the empty one component 1 (not the last) to check relabelling is contiguous
    order = [0, 3, 1, 2]
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        setattr(big, name, getattr(big, name)[order])
    assert len(np.unique(big.predict(x))) == 3
    reduced, labels, post, dropped = mixture.drop_empty(big, x)
    assert dropped == [1]
    assert reduced.n_components == 3
    assert np.array_equal(np.unique(labels), np.arange(3))
    assert post.shape == (len(x), 3)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    # the surviving components keep their points: labels are gmm's own, renumbered 0, 2, 3 -> 0, 1, 2
    assert np.array_equal(labels, gmm.predict(x))
    np.testing.assert_allclose(reduced.weights_.sum(), 1.0)


def test_infeasible_candidates_raise_and_are_skipped():
    x, _ = blobs(k=2, n=10, p=4)  # N = 20, full covariance needs 5 points per cluster
    with pytest.raises(UserError, match="too few particles"):
        mixture.select_mixture(x, [5, 6], seed=0)
    sel = mixture.select_mixture(x, [2, 3, 4, 5, 6], seed=0)
    assert set(sel.bic_by_k) == {2, 3, 4}


def test_bad_features_raise():
    x, _ = blobs(k=2, n=20, p=2)
    x[3, 1] = np.nan
    with pytest.raises(UserError):
        mixture.select_mixture(x, [2], seed=0)
    with pytest.raises(UserError):
        mixture.select_mixture(np.ones((30, 2)), [2], seed=0)


def test_scale_invariance():
    x, _ = blobs(k=3, n=60, p=3)
    a = mixture.select_mixture(x, [2, 3, 4], seed=0)
    b = mixture.select_mixture(x * 1e-4, [2, 3, 4], seed=0)
    assert a.k == b.k == 3
    assert np.array_equal(a.labels, b.labels)


def test_fit_pca_caps_dimension():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(10, 40))
    assert mixture.fit_pca(f, 16, seed=0).n_components_ == 9
    assert mixture.fit_pca(f[:, :5], 16, seed=0).n_components_ == 5
    assert mixture.fit_pca(rng.normal(size=(100, 40)), 16, seed=0).n_components_ == 16


def test_select_not_trapped_by_single_kmeans_start():
    # a case where one k-means start merges two blobs and the K=5 fit loses to K=4 (seen before
    # the k-means restarts): 5 blobs, 8 dimensions, 100 points each, two centres only 7σ apart
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (5, 8)) * 8 / np.sqrt(2)
    x = np.concatenate([rng.normal(c, 1, (100, 8)) for c in centers])
    y = np.repeat(np.arange(5), 100)
    sel = mixture.select_mixture(x, list(range(2, 9)), seed=0)
    assert sel.k == 5
    assert accuracy_after_matching(y, sel.labels) == 1.0


def test_nested_subclusters_refine_the_clusters():
    """Over-clustering for training: sub-clusters never straddle two clusters, sizes are proportional,
    and a cluster hiding two groups is split along them."""
    from disca_tools.cluster.mixture import nested_subclusters

    rng = np.random.default_rng(0)
    hidden = np.repeat([0, 1, 2], [200, 200, 100])  # clusters 0 and 1 were merged into label 0
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 30.0]])
    x = centres[hidden] + rng.normal(size=(500, 2))
    labels = np.where(hidden == 2, 1, 0)
    sub, parent = nested_subclusters(x, labels, n_total=3, seed=0)
    assert sorted(np.unique(sub).tolist()) == list(range(len(parent)))
    for s in np.unique(sub):  # each sub-cluster inside one cluster, and parent says which
        assert np.unique(labels[sub == s]).tolist() == [parent[s]]
    assert np.bincount(parent).tolist() == [2, 1]  # 400 of 500 points → 2 of 3 parts
    from sklearn.metrics import homogeneity_score

    assert homogeneity_score(hidden, sub) > 0.95  # the merged pair is split along its groups
    few, few_parent = nested_subclusters(x[:30], labels[:30], n_total=10, seed=0, min_size=20)
    assert len(few_parent) == 1  # 30 points cannot make parts of ≥ 20


def test_parallel_fits_equal_serial_fits():
    # every candidate is seeded on its own: worker processes change nothing, bit for bit, in the
    # inherited fit of the current K and in the refinement of the two best subset fits
    x, _ = blobs(k=4, n=150)
    prev = mixture.select_mixture(x, [4], seed=0).labels
    kw = dict(seed=3, prev_labels=prev, prev_k=4, max_fit_points=400)
    serial = mixture.select_mixture(x, list(range(2, 8)), n_jobs=1, **kw)
    parallel = mixture.select_mixture(x, list(range(2, 8)), n_jobs=2, **kw)
    assert serial.k == 4 and serial.inherited
    assert parallel.bic_by_k == serial.bic_by_k
    assert parallel.inherited == serial.inherited
    np.testing.assert_array_equal(parallel.labels, serial.labels)
    np.testing.assert_array_equal(parallel.posteriors, serial.posteriors)
