"""Discriminant projections for the mixtures (not in the paper; off by default).

PCA keeps the directions in which the features vary most. At low SNR those are mostly noise, and
the directions that tell the classes apart carry little of the variance: a supervised classifier
finds them where PCA + mixtures do not (README 'Clustering accuracy'). Two options use the labels
the loop already has to choose the directions instead:

- ``--projection lda`` (:func:`fit_discriminant_projection`): from iteration 1 on, the mixtures see
  the network's features projected onto the K − 1 discriminant directions of the previous
  iteration's K clusters (linear discriminant analysis with Ledoit–Wolf shrinkage of the within-
  cluster covariance), in place of their PCA. A class cut in two along a direction that does not
  separate the current clusters stays whole; a new cluster can only appear where the current
  clusters' directions show it.
- ``--init-refine lda`` (:func:`refine_by_discriminants`): iteration 0's clusters of the data's own
  descriptors are refined at their K by alternating the two steps, discriminant directions of the
  labels and a full-covariance mixture in them (LDA-k-means: Ding & Li 2007; Fisher-EM: Bouveyron &
  Brunet 2012), until fewer than 0.1 % of the labels change (at most ``max_rounds`` rounds).

Cost: the shrinkage LDA is O(n·F²) on at most ``max_fit_points`` particles (a seeded subset beyond
that), the projection O(N·F·K): linear in N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.mixture import GaussianMixture

from ..runtime.log import check_abort, logger
from .matching import match_labels
from .mixture import MixtureSelection, drop_empty


@dataclass(frozen=True)
class DiscriminantProjection:
    """A linear projection with a PCA's interface (``mean_``, ``components_``, ``transform``), so
    that the head warm-up and ``--model`` use it as they use the PCA. ``mean_`` is zero (the
    mixtures do not depend on where the origin is); ``components_`` (d, F): the discriminant
    directions, most discriminating first."""

    mean_: np.ndarray
    components_: np.ndarray

    def transform(self, features: np.ndarray) -> np.ndarray:
        """``features`` (N, F) → (N, d) float64."""
        return (np.asarray(features, dtype=np.float64) - self.mean_) @ self.components_.T


def fit_discriminant_projection(
    features: np.ndarray, labels: np.ndarray, seed: int, max_fit_points: int = 20000
) -> DiscriminantProjection:
    """The K − 1 (at least 1) discriminant directions of the clusters ``labels`` (K distinct) in
    ``features`` (N, F): shrinkage LDA (Ledoit–Wolf), fitted on at most ``max_fit_points`` of them
    (a subset seeded by ``seed``)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    k = len(np.unique(y))
    if k < 2:
        raise ValueError(f"discriminant directions need at least 2 clusters, got {k}")
    if len(x) > max_fit_points:
        keep = np.sort(np.random.default_rng(seed).permutation(len(x))[:max_fit_points])
        x, y = x[keep], y[keep]
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(x, y)
    d = max(1, min(k - 1, x.shape[1]))
    logger.info("Discriminant projection: %d dimensions from K=%d clusters", d, k)
    return DiscriminantProjection(np.zeros(x.shape[1]), lda.scalings_[:, :d].T.copy())


def refine_by_discriminants(
    descriptors: np.ndarray,
    selection: MixtureSelection,
    seed: int,
    max_rounds: int = 20,
    tolerance: float = 0.001,
) -> tuple[MixtureSelection, np.ndarray]:
    """Refine ``selection``'s clusters of ``descriptors`` (N, F) at its K by LDA-k-means: project
    on the clusters' discriminant directions, fit a full-covariance mixture of K there (3 starts,
    ``seed``), take its labels; repeat until at most ``tolerance`` of the labels change (matched)
    or ``max_rounds``. Returns the refined selection (its ``bic_by_k`` that of the K chosen before)
    and the projected points it was fitted on."""
    labels, k = selection.labels, selection.k
    gmm, posteriors, z = selection.gmm, selection.posteriors, None
    for r in range(max_rounds):
        check_abort()
        z = fit_discriminant_projection(descriptors, labels, seed).transform(descriptors)
        fitted = GaussianMixture(k, covariance_type="full", n_init=3, random_state=seed).fit(z)
        gmm, new, posteriors, _ = drop_empty(fitted, z)
        settled = (
            len(np.unique(new)) == k and np.mean(match_labels(labels, new)[0] != labels) < tolerance
        )
        labels, k = new, int(gmm.n_components)
        logger.info("Iteration-0 refinement round %d: K=%d", r, k)
        if settled:
            break
    refined = MixtureSelection(
        k=k,
        labels=labels,
        posteriors=posteriors,
        gmm=gmm,
        bic_by_k=selection.bic_by_k,
        loglik=float(np.sum(gmm.score_samples(z))),
        inherited=False,
    )
    return refined, z
