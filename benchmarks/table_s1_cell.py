"""What the Table S1 benchmark and its probes share: the structures, one simulated cell, scoring.

One cell is ``disca_simulate subtomograms``-style data: the 5 shipped structures, ``n_per_class``
each, 24³ at ``angpix``, CTF + missing wedge of ``tilt``, noise at ``snr`` in ``snr_convention``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import save_arrays

STRUCTURES = ["4v4r", "3j9i", "4v94", "1qvr", "3d2f"]

SNRS = [0.1, 0.03, 0.01, 0.003, 0.001]
TILTS = [60, 40]

# Table S1 of the paper, DISCA rows: (K, homogeneity, accuracy % or None where K was wrong).
PAPER = {
    (60, 0.1): (5, 0.9878, 99.70),
    (60, 0.03): (5, 0.9373, 97.80),
    (60, 0.01): (5, 0.8746, 94.80),
    (60, 0.003): (5, 0.8712, 94.25),
    (60, 0.001): (5, 0.8719, 94.50),
    (40, 0.1): (5, 0.9568, 98.70),
    (40, 0.03): (5, 0.8020, 90.35),
    (40, 0.01): (5, 0.8344, 91.80),
    (40, 0.003): (6, 0.8366, None),
    (40, 0.001): (6, 0.8323, None),
}


def parse_cells(text: str) -> list[tuple[int, float]]:
    """``all`` (the 10 cells of Table S1) or ``tilt:snr`` pairs, e.g. ``60:0.1,40:0.01``."""
    if text == "all":
        return [(t, s) for t in TILTS for s in SNRS]
    cells = []
    for part in text.split(","):
        tilt, snr = part.split(":")
        cells.append((int(tilt), float(snr)))
    return cells


def add_cell_arguments(
    ap: argparse.ArgumentParser, n_per_class: int = 200, angpix: float = 14.0
) -> None:
    """The options that define one simulated cell (and ``--tag`` for the result file)."""
    ap.add_argument("--n-per-class", type=int, default=n_per_class)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument(
        "--snr-convention",
        default="volume",
        choices=["volume", "aitom", "aitom-set"],
        help="aitom/aitom-set also use AITom's CTF (no amplitude contrast)",
    )
    ap.add_argument("--angpix", type=float, default=angpix)
    ap.add_argument("--tilt", type=float, default=60.0, help="tilt range ± degrees")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix for the result file")


def cell_protocol(args: argparse.Namespace, **extra) -> dict:
    """What a probe's result file records of its cells: the :func:`add_cell_arguments` options that
    hold for every cell, the box, and ``extra``."""
    return {
        "n_per_class": args.n_per_class,
        "angpix": args.angpix,
        "snr_convention": args.snr_convention,
        "seed": args.seed,
        "box": 24,
        **extra,
    }


def accuracy_percent(pred: np.ndarray, labels: np.ndarray) -> float:
    """Per cent of ``pred`` equal to ``labels`` (class indices, no matching), 2 decimals."""
    return round(100.0 * float(np.mean(pred == labels)), 2)


def classification_scores(
    pred: np.ndarray, labels: np.ndarray, k: int, tilt: float, snr: float
) -> dict:
    """A probe's classification of a cell against the truth (no matching: ``pred`` are class
    indices): ``accuracy`` and ``accuracy_per_class`` in %, and the paper's DISCA ``paper_acc``."""
    paper = PAPER.get((int(tilt), snr))
    return {
        "accuracy": accuracy_percent(pred, labels),
        "accuracy_per_class": [
            round(100.0 * float(np.mean(pred[labels == c] == c)), 1) for c in range(k)
        ],
        "paper_acc": paper[2] if paper else None,
    }


def run_probe(
    name: str,
    args: argparse.Namespace,
    run_cell: Callable[[argparse.Namespace, float, float], dict],
    markdown: Callable[[list[dict], dict], str],
    protocol: dict,
    folder: Path | None = None,
) -> int:
    """Run ``run_cell(args, tilt, snr)`` on each of ``args.cells`` (printing each row as it ends,
    with its ``seconds`` unless the row has them), print the table ``markdown`` makes and save both
    as ``NAME[_TAG].{json,md}`` in ``folder`` (default ``benchmarks/results``)."""
    from common import RESULTS, save_result

    rows = []
    for tilt, snr in parse_cells(args.cells):
        t0 = time.time()
        rows.append(run_cell(args, tilt, snr))
        rows[-1].setdefault("seconds", round(time.time() - t0, 1))
        print(rows[-1], flush=True)
    text = markdown(rows, protocol)
    print(text)
    payload = {"protocol": protocol, "cells": rows}
    path = save_result(name, args.tag, payload, markdown=text, folder=folder or RESULTS)
    print(f"saved {path}")
    return 0


def cell_imaging(args: argparse.Namespace, tilt: float):
    """The :class:`Imaging` of a cell: the paper's optics at ``tilt``; with an AITom SNR
    convention, AITom's CTF (no amplitude contrast) as well."""
    from disca_tools.simulate.imaging import Imaging

    contrast = 0.0 if args.snr_convention.startswith("aitom") else Imaging.amplitude_contrast
    return Imaging(tilt_range_deg=tilt, amplitude_contrast=contrast)


def simulate_cell(
    args: argparse.Namespace,
    *,
    tilt: float | None = None,
    snr: float | None = None,
    structures: list[str] | None = None,
    box: int = 24,
    n_per_class: int | None = None,
    seed: int | None = None,
    return_clean: bool = False,
):
    """The :class:`SubtomogramSet` of the cell described by :func:`add_cell_arguments` options
    (``tilt``, ``snr``, ``structures``, ``box``, ``n_per_class`` and ``seed`` override them where
    given); with ``return_clean``, ``(set, noise-free volumes)``."""
    from disca_tools.simulate.subtomograms import simulate_subtomogram_set

    return simulate_subtomogram_set(
        structures or STRUCTURES,
        args.n_per_class if n_per_class is None else n_per_class,
        box,
        args.angpix,
        args.snr if snr is None else snr,
        cell_imaging(args, args.tilt if tilt is None else tilt),
        seed=args.seed if seed is None else seed,
        snr_convention=args.snr_convention,
        return_clean=return_clean,
    )


def bic_clusters(
    x: np.ndarray, pca_dim: int, k_candidates: list[int], covariance: str = "full"
) -> tuple[int, np.ndarray]:
    """K and labels of the loop's clustering step (PCA, mixtures, paper BIC) on ``x``, seed 0.
    ``covariance`` "diag" or "auto": iteration 0's mixtures as ``--init-covariance`` fits them."""
    from disca_tools.cluster.mixture import fit_pca, select_initial_mixture

    z = fit_pca(x, pca_dim, 0).transform(x)
    sel = select_initial_mixture(z, k_candidates, seed=0, covariance=covariance)
    return int(sel.k), sel.labels


class IterationWatcher:
    """An ``on_iteration`` callback for :func:`disca_tools.cluster.em.run_em` that records every
    iteration's K, homogeneity and accuracy (after Hungarian matching) against ``truth`` in
    ``records`` (and, if ``kmeans_k``, the homogeneity of k-means with ``kmeans_k`` clusters on the
    same points). ``pca_sweep`` (dimensions) also records, per dimension d, the K and accuracy of the
    loop's mixture selection (:func:`bic_clusters`, ``k_candidates``) on the first d principal
    components of those points. With ``echo`` each record is also printed as its iteration ends,
    so a run cut short by a time limit still reports the iterations it finished. With ``save_dir``
    every iteration's clustering (labels, the points the mixtures saw, posteriors, K) is also
    written there as ``iteration_NNN.npz``, for ``probe_cluster_errors.py``. Every iteration's
    labels are kept in ``labels_by_iteration`` (iteration number → labels), to start from."""

    def __init__(
        self,
        truth: np.ndarray,
        kmeans_k: int = 0,
        echo: bool = False,
        pca_sweep: tuple[int, ...] = (),
        k_candidates: tuple[int, ...] = tuple(range(2, 21)),
        save_dir: Path | None = None,
    ) -> None:
        self.truth = np.asarray(truth)
        self.save_dir = save_dir
        self.kmeans_k = kmeans_k
        self.echo = echo
        self.pca_sweep = tuple(pca_sweep)
        self.k_candidates = list(k_candidates)
        self.records: list[dict] = []
        self.labels_by_iteration: dict[int, np.ndarray] = {}
        self._start = time.perf_counter()

    def __call__(self, clustering) -> None:
        from sklearn.cluster import KMeans
        from sklearn.metrics import homogeneity_score

        from disca_tools.cluster.matching import accuracy_after_matching

        rec = {
            "iteration": int(clustering.iteration),
            "k": int(clustering.k),
            "h": round(float(homogeneity_score(self.truth, clustering.labels)), 4),
            "accuracy": round(100 * accuracy_after_matching(self.truth, clustering.labels), 2),
            "eligible": bool(clustering.eligible),
        }
        if self.kmeans_k:
            km = KMeans(n_clusters=self.kmeans_k, n_init=5, random_state=0).fit_predict(
                clustering.x
            )
            rec["h_kmeans_true_k"] = round(float(homogeneity_score(self.truth, km)), 4)
        for d in (d for d in self.pca_sweep if d <= clustering.x.shape[1]):
            k, labels = bic_clusters(clustering.x[:, :d], d, self.k_candidates)
            acc = round(100 * accuracy_after_matching(self.truth, labels), 2)
            rec.setdefault("bic_by_pca_dim", {})[d] = {"k": k, "accuracy": acc}
        rec["elapsed_s"] = round(time.perf_counter() - self._start, 1)
        self.records.append(rec)
        self.labels_by_iteration[rec["iteration"]] = np.asarray(clustering.labels).copy()
        if self.save_dir is not None:
            save_arrays(
                self.save_dir / f"iteration_{clustering.iteration:03d}.npz",
                labels=clustering.labels,
                x=clustering.x,
                posteriors=clustering.posteriors,
                k=clustering.k,
                eligible=clustering.eligible,
            )
        if self.echo:
            print(rec, flush=True)
