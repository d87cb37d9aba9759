"""PCA and Gaussian mixtures with BIC model selection (paper Eq. 3, METHOD.md step 2).

The features of all subtomograms are reduced by PCA (:func:`fit_pca`), then full-covariance Gaussian
mixtures are fitted for every candidate K and the lowest BIC wins (:func:`select_mixture`).

BIC. The paper's Eq. 3 is ``BIC = K(P²+P)/2 · ln N − 2 ln L`` (:func:`paper_bic`): it counts only the
covariance parameters of the K components. scikit-learn's ``GaussianMixture.bic`` counts every free
parameter, ``K·P(P+1)/2 + K·P + K − 1`` (covariances, means and weights), so its penalty is larger by
``(K·P + K − 1) · ln N``. Selection uses the paper's formula by default (``criterion="paper"``);
``criterion="sklearn"`` uses scikit-learn's. Iteration 0's clusters of the data's own descriptors
(``--init invariants``/``voxels``) may use diagonal covariances instead, or the better of the two
families by scikit-learn's BIC (:func:`select_initial_mixture`, ``--init-covariance``).

Cost. Every candidate is fitted by EM on at most ``max_fit_points`` points (a seeded random subset)
and its BIC computed on all N points; the two best candidates (and the current K) are then refined by
``refine_iter`` EM iterations on all N points and rescored. Every step is O(N·K·P²) per candidate,
so selection is linear in N (Theorem 1 of the paper). With N ≤ ``max_fit_points`` every fit uses all
points and nothing is approximated. The linear algebra is
on P × P matrices, where multi-threaded BLAS only adds overhead (30× slower measured on the 2-core
machine when other processes compete), so fitting runs with one BLAS/OpenMP thread. The candidate
K are independent fits, each seeded on its own: ``n_jobs`` fits them in parallel worker processes,
with the same result as one process (on 2 cores ×1.75–1.87: benchmarks/bench_em_parts.py).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from ..runtime.errors import UserError
from ..runtime.log import check_abort, logger


def fit_pca(features: np.ndarray, dim: int, seed: int) -> PCA:
    """Fit a PCA of ``features`` (N, F) with ``dim`` components, capped at ``min(N - 1, F)``."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {x.shape}")
    n, f = x.shape
    if n < 2:
        raise UserError(f"features: PCA needs at least 2 samples, got {n}")
    if not np.all(np.isfinite(x)):
        raise UserError("features: contain NaN or infinite values")
    k = int(max(1, min(int(dim), n - 1, f)))
    if k < dim:
        logger.info("PCA: %d components requested, using %d (N=%d, F=%d)", dim, k, n, f)
    pca = PCA(n_components=k, random_state=int(seed), svd_solver="auto")
    pca.fit(x)
    return pca


def paper_bic(gmm: GaussianMixture, x: np.ndarray) -> float:
    """The paper's BIC (Eq. 3): ``K(P²+P)/2 · ln N − 2 · Σ_n ln Σ_k φ_k g(x_n; μ_k, Σ_k)``.

    Only the covariance parameters are counted (unlike ``gmm.bic``; see the module docstring).
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    k = int(gmm.n_components)
    loglik = float(np.sum(gmm.score_samples(x)))
    return k * (p * p + p) / 2.0 * np.log(n) - 2.0 * loglik


def sklearn_bic(gmm: GaussianMixture, x: np.ndarray) -> float:
    """scikit-learn's BIC (all free parameters counted)."""
    return float(gmm.bic(np.asarray(x, dtype=np.float64)))


SCORES = {"paper": paper_bic, "sklearn": sklearn_bic}  # selection criteria by name
CRITERIA = tuple(SCORES)


@dataclass
class MixtureSelection:
    """The chosen mixture.

    ``labels`` are 0-based and contiguous (0..k-1) after empty clusters were dropped; ``posteriors``
    (N, k) come from the final (reduced) mixture; ``bic_by_k`` holds the criterion for every candidate
    actually fitted (before dropping empty clusters); ``loglik`` is the total log-likelihood of x under
    the final mixture; ``inherited`` is True when the kept fit of the chosen K was the one initialised
    from the previous labels.
    """

    k: int
    labels: np.ndarray
    posteriors: np.ndarray
    gmm: GaussianMixture
    bic_by_k: dict[int, float]
    loglik: float
    inherited: bool
    dropped: list[int] = field(default_factory=list)


def _min_points(p: int, covariance: str) -> int:
    """Smallest average cluster size for which a component is identifiable."""
    return p + 1 if covariance == "full" else 2


def _params_from_labels(
    x: np.ndarray, labels: np.ndarray, covariance: str, reg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and precisions of the components defined by hard ``labels`` (non-empty only)."""
    values = np.unique(labels)
    n, p = x.shape
    weights, means, precisions = [], [], []
    for v in values:
        xi = x[labels == v]
        m = xi.mean(axis=0)
        d = xi - m
        if covariance == "full":
            cov = d.T @ d / max(len(xi), 1) + reg * np.eye(p)
            precisions.append(np.linalg.inv(cov))
        elif covariance == "diag":
            precisions.append(1.0 / (np.mean(d * d, axis=0) + reg))
        elif covariance == "spherical":
            precisions.append(1.0 / (np.mean(d * d) + reg))
        else:
            raise ValueError(f"covariance {covariance!r} not supported for inherited fits")
        weights.append(len(xi) / n)
        means.append(m)
    return np.asarray(weights), np.asarray(means), np.asarray(precisions)


def _reduce(gmm: GaussianMixture, keep: np.ndarray) -> GaussianMixture:
    """A copy of ``gmm`` with only the components ``keep`` (weights renormalised)."""
    k = len(keep)
    out = GaussianMixture(
        n_components=k,
        covariance_type=gmm.covariance_type,
        reg_covar=gmm.reg_covar,
        random_state=gmm.random_state,
    )
    w = gmm.weights_[keep]
    out.weights_ = w / w.sum()
    out.means_ = gmm.means_[keep]
    if gmm.covariance_type in ("full", "diag", "spherical"):
        out.covariances_ = gmm.covariances_[keep]
        out.precisions_cholesky_ = gmm.precisions_cholesky_[keep]
        out.precisions_ = gmm.precisions_[keep]
    else:  # tied: shared covariance
        out.covariances_ = gmm.covariances_
        out.precisions_cholesky_ = gmm.precisions_cholesky_
        out.precisions_ = gmm.precisions_
    out.converged_ = gmm.converged_
    out.n_iter_ = gmm.n_iter_
    out.lower_bound_ = gmm.lower_bound_
    out.n_features_in_ = gmm.n_features_in_
    return out


def drop_empty(
    gmm: GaussianMixture, x: np.ndarray
) -> tuple[GaussianMixture, np.ndarray, np.ndarray, list[int]]:
    """Remove components that no point of ``x`` chooses (argmax posterior).

    Returns ``(gmm, labels, posteriors, dropped)``: the reduced mixture (weights renormalised), the
    contiguous 0-based labels, the posteriors under the reduced mixture, the dropped component indices.
    """
    labels = gmm.predict(x)
    used = np.unique(labels)
    dropped: list[int] = []
    if len(used) < gmm.n_components:
        keep = set(used.tolist())
        dropped = [c for c in range(gmm.n_components) if c not in keep]
        gmm = _reduce(gmm, used)
    posteriors = gmm.predict_proba(x)
    return gmm, np.argmax(posteriors, axis=1).astype(np.int64), posteriors, dropped


class _Fitter:
    """Fits one K: EM on a subset, then refinement on all points."""

    def __init__(
        self, x, seed, covariance, reg, n_init, max_iter, tol, max_fit_points, refine_iter
    ):
        self.x = x
        self.seed = seed
        self.covariance = covariance
        self.reg = reg
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.refine_iter = refine_iter
        n = len(x)
        if max_fit_points and n > max_fit_points:
            rng = np.random.default_rng(seed)
            self.sub = x[np.sort(rng.choice(n, size=int(max_fit_points), replace=False))]
        else:
            self.sub = None

    def _gmm(self, k: int, **kw) -> GaussianMixture:
        return GaussianMixture(
            n_components=k,
            covariance_type=self.covariance,
            reg_covar=self.reg,
            tol=self.tol,
            random_state=self.seed,
            **kw,
        )

    def _fit(self, gmm: GaussianMixture, data: np.ndarray) -> GaussianMixture:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm.fit(data)
        return gmm

    def refine(self, gmm: GaussianMixture) -> GaussianMixture:
        """Continue EM from ``gmm`` on all points for a few iterations."""
        if self.sub is None:
            return gmm
        k = gmm.n_components
        full = self._gmm(
            k,
            max_iter=self.refine_iter,
            n_init=1,
            weights_init=gmm.weights_,
            means_init=gmm.means_,
            precisions_init=gmm.precisions_,
        )
        return self._fit(full, self.x)

    def de_novo(self, k: int) -> GaussianMixture:
        """EM on the subset (or all points) from the best of 10 k-means runs; best of ``n_init``.

        scikit-learn's own ``init_params="kmeans"`` runs k-means once; a single k-means often
        merges two clusters and splits another, and the EM then stays in that local optimum, which
        makes BIC under-estimate K. Ten k-means restarts are cheap next to the EM.
        """
        data = self.x if self.sub is None else self.sub
        best: GaussianMixture | None = None
        for r in range(max(1, self.n_init)):
            w: np.ndarray = np.zeros(0)
            if self.covariance in ("full", "diag", "spherical"):
                km = KMeans(n_clusters=k, n_init=10, random_state=self.seed + r).fit(data)
                w, m, prec = _params_from_labels(data, km.labels_, self.covariance, self.reg)
            if len(w) < k:  # empty k-means cluster or tied covariance: sklearn's initialisation
                gmm = self._gmm(k, max_iter=self.max_iter, n_init=1, init_params="kmeans")
            else:
                gmm = self._gmm(
                    k, max_iter=self.max_iter, weights_init=w, means_init=m, precisions_init=prec
                )
            gmm = self._fit(gmm, data)
            if best is None or gmm.lower_bound_ > best.lower_bound_:
                best = gmm
        assert best is not None
        return best

    def inherited(self, prev_labels: np.ndarray) -> GaussianMixture:
        w, m, prec = _params_from_labels(self.x, prev_labels, self.covariance, self.reg)
        gmm = self._gmm(
            len(w),
            max_iter=self.max_iter,
            n_init=1,
            weights_init=w,
            means_init=m,
            precisions_init=prec,
        )
        return self._fit(gmm, self.x)


def _single_threaded(func):
    """Run ``func`` with BLAS/OpenMP limited to one thread (P × P algebra: threads only add overhead;
    multi-threaded BLAS was 30× slower here with other jobs on the cores)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1):
            return func(*args, **kwargs)

    return wrapper


@_single_threaded  # also in a worker process
def _fit_candidate(
    fitter: _Fitter, criterion: str, task: tuple[int, np.ndarray | None]
) -> tuple[GaussianMixture, bool, bool, float]:
    """Fit one candidate K: ``(gmm, inherited, refined, criterion on all points)``.

    ``task`` is ``(k, prev_labels)``; with ``prev_labels`` (the current K) the de-novo fit is
    refined on all points and an inherited fit made too; the higher likelihood is kept (ties go to
    the inherited fit, which keeps the previous numbering).
    """
    k, prev_labels = task
    gmm = fitter.de_novo(k)
    inherited, refined = False, False
    if prev_labels is not None:
        gmm, refined = fitter.refine(gmm), True
        ginh = fitter.inherited(prev_labels)
        ll_new = float(np.sum(gmm.score_samples(fitter.x)))
        ll_inh = float(np.sum(ginh.score_samples(fitter.x)))
        logger.debug("K=%d: log-likelihood inherited %.2f, de novo %.2f", k, ll_inh, ll_new)
        if ll_inh >= ll_new - 1e-9 * abs(ll_new):
            gmm, inherited = ginh, True
    return gmm, inherited, refined, float(SCORES[criterion](gmm, fitter.x))


@_single_threaded  # also in a worker process
def _refine(fitter: _Fitter, criterion: str, gmm: GaussianMixture) -> tuple[GaussianMixture, float]:
    """Refine a subset fit on all points: ``(gmm, criterion on all points)``."""
    gmm = fitter.refine(gmm)
    return gmm, float(SCORES[criterion](gmm, fitter.x))


def _map(func, items: list, n_jobs: int) -> Iterator:
    """``func`` over ``items`` in order: here, or in ``n_jobs`` joblib worker processes (loky, kept
    alive between calls, so a run pays for starting them once). Checks for an abort between items."""
    n_jobs = min(int(n_jobs), len(items))
    if n_jobs <= 1:
        for item in items:
            check_abort()
            yield func(item)
        return
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator")
    for out in parallel(delayed(func)(item) for item in items):
        check_abort()
        yield out


def stop_workers() -> None:
    """Stop the worker processes of parallel fits now, if any were started. For exits that skip
    ``atexit`` (``os._exit``), which would leave them idle until their timeout (300 s)."""
    try:
        from joblib.externals.loky import reusable_executor
    except ImportError:
        return
    executor = getattr(reusable_executor, "_executor", None)  # loky's one reusable executor
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


@_single_threaded
def select_mixture(
    x: np.ndarray,
    k_candidates: list[int],
    seed: int,
    prev_labels: np.ndarray | None = None,
    prev_k: int | None = None,
    covariance: str = "full",
    reg_covar: float = 1e-6,
    n_init: int = 1,
    criterion: str = "paper",
    max_iter: int = 200,
    tol: float = 1e-3,
    max_fit_points: int = 20000,
    refine_iter: int = 10,
    min_points_per_cluster: int | None = None,
    n_jobs: int = 1,
) -> MixtureSelection:
    """Fit a Gaussian mixture for each candidate K and keep the lowest BIC.

    ``x`` (N, P) are the PCA-reduced features. ``reg_covar`` is relative: the ridge added to every
    covariance is ``reg_covar`` times the mean per-dimension variance of ``x`` (so the result does not
    depend on the scale of the features). A candidate K is fitted only when ``N ≥ K · m`` with
    ``m = min_points_per_cluster`` (default P + 1 for full covariances, the fewest points that make a
    full covariance non-singular); if none is feasible a UserError is raised.

    For the current K (``prev_k``, with ``prev_labels`` from the previous iteration) two fits are made:
    one initialised from the means/covariances of ``prev_labels`` and one de novo; the one with the
    higher likelihood is kept (ties go to the inherited fit, which keeps the previous numbering).
    De-novo fits start from the best of 10 k-means runs (``n_init`` such starts, best kept). Clusters
    that no point chooses (argmax) are dropped and the labels made contiguous, with posteriors
    recomputed from the reduced mixture.

    ``n_jobs`` > 1 fits the candidates in that many worker processes (joblib); every fit is seeded
    on its own, so the result does not depend on ``n_jobs``.
    """

    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be (N, P), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise UserError("features: contain NaN or infinite values; cannot fit mixtures")
    n, p = x.shape
    scale = float(np.mean(np.var(x, axis=0))) if n > 1 else 0.0
    if not scale > 0:
        raise UserError("features: all feature vectors are identical; cannot fit mixtures")
    reg = float(reg_covar) * scale
    m = int(min_points_per_cluster or _min_points(p, covariance))
    cands = sorted({int(k) for k in k_candidates if int(k) >= 1})
    feasible = [k for k in cands if n >= k * m]
    if not feasible:
        raise UserError(
            f"features: too few particles ({n}) for candidate K {cands} "
            f"(need at least {m} per cluster at dimension {p})"
        )
    skipped = [k for k in cands if k not in feasible]
    if skipped:
        logger.warning(
            "Skipping candidate K %s: too few particles (%d) for %d dimensions", skipped, n, p
        )
    fitter = _Fitter(
        x, int(seed), covariance, reg, int(n_init), max_iter, tol, max_fit_points, refine_iter
    )
    bic_by_k: dict[int, float] = {}
    best: tuple[float, int, GaussianMixture, bool] | None = None
    use_prev = prev_labels is not None and prev_k is not None and int(prev_k) in feasible
    use_prev = use_prev and covariance in ("full", "diag", "spherical")  # tied: de novo only
    if use_prev and len(prev_labels) != n:
        raise ValueError(f"prev_labels has {len(prev_labels)} entries for {n} points")
    prev = np.asarray(prev_labels) if use_prev else None
    tasks = [(k, prev if use_prev and k == int(prev_k) else None) for k in feasible]
    fits: dict[int, tuple[GaussianMixture, bool, bool]] = {}  # k -> (gmm, inherited, refined)
    for (k, _), (gmm, inherited, refined, bic) in zip(
        tasks,
        _map(functools.partial(_fit_candidate, fitter, criterion), tasks, n_jobs),
        strict=True,
    ):
        fits[k] = (gmm, inherited, refined)
        bic_by_k[k] = bic
    if fitter.sub is not None:
        # fitted on a subset, scored on all points: refine the two best on all points, rescore
        two = [k for k in sorted(bic_by_k, key=bic_by_k.get)[:2] if not fits[k][2]]
        for k, (gmm, bic) in zip(
            two,
            _map(functools.partial(_refine, fitter, criterion), [fits[k][0] for k in two], n_jobs),
            strict=True,
        ):
            fits[k] = (gmm, fits[k][1], True)
            bic_by_k[k] = bic
    for k in feasible:
        logger.debug("K=%d: BIC %.2f%s", k, bic_by_k[k], " (inherited)" if fits[k][1] else "")
        if best is None or bic_by_k[k] < best[0]:
            best = (bic_by_k[k], k, fits[k][0], fits[k][1])
    assert best is not None
    _, k, gmm, inherited = best

    gmm, labels, posteriors, dropped = drop_empty(gmm, x)
    if dropped:
        logger.info("Dropped %d empty cluster(s) of K=%d", len(dropped), k)
    loglik = float(np.sum(gmm.score_samples(x)))
    return MixtureSelection(
        k=int(gmm.n_components),
        labels=labels,
        posteriors=posteriors,
        gmm=gmm,
        bic_by_k=bic_by_k,
        loglik=loglik,
        inherited=inherited,
        dropped=dropped,
    )


# --init-covariance: the criterion each covariance family chooses K by at iteration 0 (the paper's BIC
# counts full covariances only); "auto" fits both families and compares them
INIT_CRITERIA = {"full": "paper", "diag": "sklearn"}


def select_initial_mixture(
    x: np.ndarray, k_candidates: list[int], seed: int, covariance: str = "full", n_jobs: int = 1
) -> MixtureSelection:
    """:func:`select_mixture` for iteration 0's clusters of the data's own descriptors.

    ``covariance`` "full" (the paper's BIC) or "diag" (scikit-learn's) chooses K in that family;
    "auto" does both and keeps the model with the lower scikit-learn BIC, the criterion that
    counts every parameter of either family (the paper's formula cannot compare them).
    """
    if covariance == "auto":
        fits = {c: select_initial_mixture(x, k_candidates, seed, c, n_jobs) for c in INIT_CRITERIA}
        scores = {c: sklearn_bic(sel.gmm, x) for c, sel in fits.items()}
        chosen = min(scores, key=scores.get)
        logger.info(
            "Iteration-0 covariances: %s (scikit-learn BIC %s)",
            chosen,
            ", ".join(f"{c} K={fits[c].k}: {v:.1f}" for c, v in scores.items()),
        )
        return fits[chosen]
    if covariance not in INIT_CRITERIA:
        raise ValueError(
            f"covariance must be auto or one of {tuple(INIT_CRITERIA)}, got {covariance!r}"
        )
    return select_mixture(
        x, k_candidates, seed, covariance=covariance, criterion=INIT_CRITERIA[covariance],
        n_jobs=n_jobs,
    )  # fmt: skip


@_single_threaded
def nested_subclusters(
    x: np.ndarray, labels: np.ndarray, n_total: int, seed: int, min_size: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Split every cluster of ``labels`` by k-means on ``x`` into about ``n_total`` sub-clusters in all.

    Cluster ``c`` of ``n_c`` points gets ``round(n_total · n_c / N)`` parts (at least 1, at most
    ``n_c // min_size``). The sub-clusters refine the clusters: no sub-cluster straddles two.
    Returns ``(sub_labels, parent)``: 0-based contiguous sub-cluster labels and, for each sub-cluster,
    the cluster it belongs to.
    """
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    sub = np.empty(n, dtype=np.int64)
    parent: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        parts = int(round(n_total * len(idx) / n))
        parts = max(1, min(parts, len(idx) // max(1, min_size)))
        if parts == 1:
            part_labels = np.zeros(len(idx), dtype=np.int64)
        else:
            km = KMeans(n_clusters=parts, n_init=3, random_state=int(seed) + int(c))
            part_labels = km.fit_predict(x[idx])
        used = np.unique(part_labels)
        remap = np.zeros(int(used.max()) + 1, dtype=np.int64)
        remap[used] = len(parent) + np.arange(len(used))
        sub[idx] = remap[part_labels]
        parent.extend([int(c)] * len(used))
    return sub, np.asarray(parent, dtype=np.int64)
