"""Figures of a disca_cluster run: BIC against K, K and DDBI per iteration, a 2D embedding of the
features, a montage per class, cluster sizes. Every function writes one PNG atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..runtime.outputs import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_bic(history: Sequence, path: str | Path, iterations: Sequence[int] | None = None) -> Path:
    """BIC against candidate K, one line per iteration (``history`` of IterationRecord)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    recs = [h for h in history if iterations is None or h.iteration in iterations]
    cmap = plt.get_cmap("viridis")
    for i, h in enumerate(recs):
        ks = sorted(h.bic_by_k)
        ax.plot(
            ks,
            [h.bic_by_k[k] for k in ks],
            "-o",
            ms=3,
            color=cmap(i / max(len(recs) - 1, 1)),
            label=f"it {h.iteration}",
        )
    ax.set_xlabel("K (number of clusters)")
    ax.set_ylabel("BIC (paper's formula; lower is better)")
    if len(recs) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title("Model selection per iteration")
    return _save(fig, path)


def plot_iterations(history: Sequence, path: str | Path, best_iteration: int | None = None) -> Path:
    """K and DDBI per iteration; the reported iteration marked."""
    its = [h.iteration for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.step(its, [h.k for h in history], where="mid", color="tab:blue", label="K")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("K", color="tab:blue")
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twinx()
    dd = [h.ddbi if np.isfinite(h.ddbi) else np.nan for h in history]
    ax2.plot(its, dd, "-o", ms=3, color="tab:red", label="DDBI")
    ax2.set_ylabel("DDBI (lower is better)", color="tab:red")
    if best_iteration is not None and best_iteration in its:
        ax2.axvline(best_iteration, color="gray", ls="--", lw=1)
        ax2.annotate(
            "reported",
            (best_iteration, np.nanmax(dd) if np.isfinite(np.nanmax(dd)) else 0),
            fontsize=8,
        )
    ax1.set_title("K and DDBI per iteration")
    return _save(fig, path)


def plot_embedding(x2d: np.ndarray, labels: np.ndarray, path: str | Path) -> Path:
    """2D embedding (e.g. the first two principal components) coloured by cluster (0-based)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    labels = np.asarray(labels)
    cmap = plt.get_cmap("tab20")
    for c in np.unique(labels):
        m = labels == c
        ax.scatter(x2d[m, 0], x2d[m, 1], s=4, color=cmap(int(c) % 20), label=f"class {int(c) + 1}")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if len(np.unique(labels)) <= 20:
        ax.legend(fontsize=7, markerscale=3)
    ax.set_title("Features, first two principal components")
    return _save(fig, path)


def plot_cluster_sizes(labels: np.ndarray, path: str | Path) -> Path:
    """Bar chart of the number of particles per class (1-based class numbers)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(values) + 2), 3.5))
    ax.bar([int(v) + 1 for v in values], counts, color="tab:blue")
    ax.set_xlabel("class")
    ax.set_ylabel("particles")
    ax.set_xticks([int(v) + 1 for v in values])
    ax.set_title(f"Cluster sizes (N = {int(counts.sum())})")
    return _save(fig, path)


def plot_class_montage(
    volumes: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    n_members: int = 8,
    seed: int = 0,
    chunk: int = 256,
) -> Path:
    """Per class: central z slices of a few members and of the class's unaligned average.

    ``volumes`` is the (memmapped) store, ``rows`` the store row of each particle; the average is
    accumulated in chunks so memory does not grow with N.
    """
    labels = np.asarray(labels)
    rows = np.asarray(rows)
    classes = np.unique(labels)
    s = volumes.shape[1]
    c = s // 2
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(
        len(classes),
        n_members + 1,
        figsize=(1.1 * (n_members + 1), 1.1 * len(classes)),
        squeeze=False,
    )
    for ci, cls in enumerate(classes):
        idx = rows[labels == cls]
        total = np.zeros((s, s, s), dtype=np.float64)
        for start in range(0, len(idx), chunk):
            part = np.sort(idx[start : start + chunk])
            block = np.asarray(volumes[part], dtype=np.float32)
            block = (block - block.mean(axis=(1, 2, 3), keepdims=True)) / (
                block.std(axis=(1, 2, 3), keepdims=True) + 1e-12
            )
            total += block.sum(axis=0)
        avg = total / max(len(idx), 1)
        ax = axes[ci, 0]
        ax.imshow(avg[c], cmap="gray")
        ax.set_title(f"class {int(cls) + 1} avg\n(n={len(idx)})", fontsize=6)
        pick = rng.choice(idx, size=min(n_members, len(idx)), replace=False) if len(idx) else []
        for j in range(n_members):
            ax = axes[ci, j + 1]
            if j < len(pick):
                ax.imshow(np.asarray(volumes[int(pick[j])], dtype=np.float32)[c], cmap="gray")
        for ax in axes[ci]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Central z slices: unaligned class average, then members", fontsize=8)
    return _save(fig, path)
