"""Distortion-based Davies–Bouldin index (DDBI, paper Eq. S1–S3), in O(N) time and memory.

    D    = 1/K Σ_i max_{j≠i} (t_i + t_j) / (d_ij + d_ji)                      (S1)
    t_i  = 1/|C_i| Σ_{x∈C_i} (x − c_i)ᵀ Σ_i⁻¹ (x − c_i)                          (S2)
    d_ij = (c_i − c_j)ᵀ Σ_i⁻¹ (c_i − c_j)                                          (S3)

Lower is better (tight clusters far apart relative to their own spread). ``c_i`` and ``Σ_i`` are the
cluster's mean and covariance: the empirical ones (unbiased, plus a small relative ridge, as the
reference code does) unless the caller passes the mixture's. The reference code evaluates t_i as the
diagonal of an n_i × n_i matrix (O(n²) memory); here each Mahalanobis distance is a triangular solve
with the Cholesky factor of Σ_i, processed in chunks.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular
from threadpoolctl import threadpool_limits

_CHUNK = 65536


def _cluster_stats(
    x: np.ndarray, labels: np.ndarray, values: np.ndarray, reg_covar: float
) -> tuple[np.ndarray, np.ndarray]:
    p = x.shape[1]
    scale = float(np.mean(np.var(x, axis=0))) or 1.0
    means = np.empty((len(values), p))
    covs = np.empty((len(values), p, p))
    for i, v in enumerate(values):
        xi = x[labels == v]
        means[i] = xi.mean(axis=0)
        if len(xi) > 1:
            covs[i] = np.cov(xi, rowvar=False).reshape(p, p)
        else:
            covs[i] = np.eye(p) * scale
        covs[i] += reg_covar * scale * np.eye(p)
    return means, covs


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor, adding a tiny ridge if the covariance is not positive definite."""
    ridge = 0.0
    base = float(np.trace(cov)) / len(cov) or 1.0
    for _ in range(8):
        try:
            return np.linalg.cholesky(cov + ridge * np.eye(len(cov)))
        except np.linalg.LinAlgError:
            ridge = base * 1e-10 if ridge == 0.0 else ridge * 100
    raise np.linalg.LinAlgError("covariance is not positive definite")


def _check(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).ravel()
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"x must be (N, P) with N = len(labels); got {x.shape} and {labels.shape}")
    return x, labels


def _index(t: np.ndarray, d: np.ndarray) -> float:
    k = len(t)
    if k < 2:
        return float("inf")
    sep = d + d.T
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (t[:, None] + t[None, :]) / sep
    np.fill_diagonal(ratio, -np.inf)
    return float(np.mean(np.max(ratio, axis=1)))


def _prepare(x, labels, means, covariances, reg_covar):
    """Checked data, the sorted cluster labels, and their means/covariances (empirical if not given)."""
    x, labels = _check(x, labels)
    values = np.unique(labels)
    if means is None or covariances is None:
        emp_means, emp_covs = _cluster_stats(x, labels, values, reg_covar)
        means = emp_means if means is None else np.asarray(means, dtype=np.float64)
        covariances = emp_covs if covariances is None else np.asarray(covariances, dtype=np.float64)
    k = len(values)
    if len(means) != k or len(covariances) != k:
        raise ValueError(f"{k} clusters but {len(means)} means and {len(covariances)} covariances")
    return x, labels, values, means, covariances


def ddbi(
    x: np.ndarray,
    labels: np.ndarray,
    means: np.ndarray | None = None,
    covariances: np.ndarray | None = None,
    reg_covar: float = 1e-6,
) -> float:
    """DDBI of a hard clustering of ``x`` (N, P). Lower is better; ``inf`` when K < 2.

    ``means`` (K, P) and ``covariances`` (K, P, P), if given, are indexed by the sorted distinct labels
    (e.g. a fitted mixture's ``means_``/``covariances_`` with labels 0..K-1). Otherwise they are the
    clusters' empirical means and unbiased covariances plus ``reg_covar`` times the mean feature
    variance on the diagonal. O(N·P²) time, O(chunk·P + K·P²) memory.
    """
    x, labels, values, means, covariances = _prepare(x, labels, means, covariances, reg_covar)
    with threadpool_limits(limits=1):  # P × P algebra: threads only add overhead
        t, d = _tightness_separation(x, labels, values, means, covariances)
    return _index(t, d)


def _tightness_separation(
    x: np.ndarray,
    labels: np.ndarray,
    values: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    k = len(values)
    t = np.zeros(k)
    d = np.zeros((k, k))
    for i, v in enumerate(values):
        chol = _cholesky(covariances[i])
        idx = np.flatnonzero(labels == v)
        total = 0.0
        for s in range(0, len(idx), _CHUNK):
            diff = x[idx[s : s + _CHUNK]] - means[i]
            z = solve_triangular(chol, diff.T, lower=True, check_finite=False)
            total += float(np.sum(z * z))
        t[i] = total / max(len(idx), 1)
        z = solve_triangular(chol, (means - means[i]).T, lower=True, check_finite=False)
        d[i] = np.sum(z * z, axis=0)
    return t, d


def ddbi_naive(
    x: np.ndarray,
    labels: np.ndarray,
    means: np.ndarray | None = None,
    covariances: np.ndarray | None = None,
    reg_covar: float = 1e-6,
) -> float:
    """Reference O(n²) DDBI as the reference code computes it (explicit inverse, n_i × n_i matrix).

    For tests only: memory grows with the square of the largest cluster.
    """
    x, labels, values, means, covariances = _prepare(x, labels, means, covariances, reg_covar)
    k = len(values)
    t = np.zeros(k)
    d = np.zeros((k, k))
    for i, v in enumerate(values):
        prec = np.linalg.inv(covariances[i])
        diff = x[labels == v] - means[i]
        t[i] = float(np.mean(np.diag(diff @ prec @ diff.T)))
        dm = means - means[i]
        d[i] = np.diag(dm @ prec @ dm.T)
    return _index(t, d)
