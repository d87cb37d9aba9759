"""What the Table S1 benchmark and its probes share: the structures, one simulated cell, scoring.

One cell is ``disca_simulate subtomograms``-style data: the 5 shipped structures, ``n_per_class``
each, 24³ at ``angpix``, CTF + missing wedge of ``tilt``, noise at ``snr`` in ``snr_convention``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
STRUCTURES = ["4v4r", "3j9i", "4v94", "1qvr", "3d2f"]


def add_cell_arguments(
    ap: argparse.ArgumentParser, n_per_class: int = 200, angpix: float = 14.0
) -> None:
    """The options that define one simulated cell (and ``--tag`` for the result file)."""
    ap.add_argument("--n-per-class", type=int, default=n_per_class)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--snr-convention", default="volume", choices=["volume", "aitom"])
    ap.add_argument("--angpix", type=float, default=angpix)
    ap.add_argument("--tilt", type=float, default=60.0, help="tilt range ± degrees")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix for the result file")


def simulate_cell(args: argparse.Namespace):
    """The :class:`SubtomogramSet` of the cell described by :func:`add_cell_arguments` options."""
    from disca_tools.simulate.imaging import Imaging
    from disca_tools.simulate.subtomograms import simulate_subtomogram_set

    return simulate_subtomogram_set(
        STRUCTURES,
        args.n_per_class,
        24,
        args.angpix,
        args.snr,
        Imaging(tilt_range_deg=args.tilt),
        seed=args.seed,
        snr_convention=args.snr_convention,
    )


def bic_clusters(x: np.ndarray, pca_dim: int, k_candidates: list[int]) -> tuple[int, np.ndarray]:
    """K and labels of the loop's clustering step (PCA, mixtures, paper BIC) on ``x``, seed 0."""
    from disca_tools.cluster.mixture import fit_pca, select_mixture

    sel = select_mixture(fit_pca(x, pca_dim, 0).transform(x), k_candidates, seed=0)
    return int(sel.k), sel.labels


@contextlib.contextmanager
def watch_iterations(truth: np.ndarray, kmeans_k: int = 0) -> Iterator[list[dict]]:
    """Inside the block, every EM iteration's clustering (``em.select_mixture``) is recorded in the
    yielded list: iteration, K and homogeneity against ``truth`` (and, if ``kmeans_k``, that of
    k-means with ``kmeans_k`` clusters on the same features)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import homogeneity_score

    from disca_tools.cluster import em

    records: list[dict] = []
    original = em.select_mixture

    def watched(x, *a, **kw):
        sel = original(x, *a, **kw)
        rec = {
            "iteration": len(records),
            "k": int(sel.k),
            "h": round(float(homogeneity_score(truth, sel.labels)), 4),
        }
        if kmeans_k:
            km = KMeans(n_clusters=kmeans_k, n_init=5, random_state=0).fit_predict(x)
            rec["h_kmeans_true_k"] = round(float(homogeneity_score(truth, km)), 4)
        records.append(rec)
        return sel

    em.select_mixture = watched
    try:
        yield records
    finally:
        em.select_mixture = original


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_result(name: str, tag: str, payload: dict, markdown: str | None = None) -> Path:
    """Write ``results/NAME[_TAG].json`` (and ``.md`` if ``markdown``) atomically."""
    stem = name + (f"_{tag}" if tag else "")
    if markdown is not None:
        write_atomic(RESULTS / f"{stem}.md", markdown)
    return write_atomic(RESULTS / f"{stem}.json", json.dumps(payload, indent=1) + "\n")
