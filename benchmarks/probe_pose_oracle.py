"""How well could *anything* classify a Table S1 cell? Oracles given the five true structures.

Pose known: for each simulated particle the oracle is given the five structures imaged exactly as
that particle was (same rotation, shift, CTF, wedge and low-pass; noise-free) and picks the class
whose template is nearest to the noisy volume. Two distances: the plain Euclidean one (a matched
filter for white noise) and the one whitened by the measured noise power spectrum, the
likelihood-ratio (Bayes-optimal) rule for the simulator's stationary Gaussian noise with equal
priors. With pose and templates known, no method, supervised or not, can do better on average
than the whitened rule: its accuracy is a ceiling for every cell of Table S1 under this simulator.

Pose searched (``--rotations R``, 0 to skip): the templates are the five structures imaged at R
uniform random orientations (no shift: the particles' shifts of up to ±1 voxel are not searched),
and the whitened log-likelihood of each class is either maximised over them or averaged
(log-mean-exp, the marginal likelihood of a uniform pose prior). This is template matching with
the exact templates: what a method that knew the structures but not the poses could reach.

    python benchmarks/probe_pose_oracle.py --snr-convention aitom [--cells all] [--n-per-class 200] \
        [--rotations 4000]

Prints a table and saves benchmarks/results/probe_pose_oracle[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import scipy.fft  # noqa: E402
from scipy.special import logsumexp  # noqa: E402
from table_s1_cell import (  # noqa: E402
    PAPER,
    STRUCTURES,
    add_cell_arguments,
    cell_imaging,
    parse_cells,
    save_result,
    simulate_cell,
)

from disca_tools.geometry import random_euler  # noqa: E402
from disca_tools.simulate.structures import load_structure  # noqa: E402
from disca_tools.simulate.subtomograms import image_particles  # noqa: E402

FFT_AXES = (-3, -2, -1)


def rfft_weights(box: int) -> np.ndarray:
    """Multiplicity of each half-spectrum coefficient of a real ``box``³ volume (1 on the planes
    the half spectrum keeps once, 2 elsewhere), so that sums over it equal sums over the full
    spectrum."""
    w = np.full(box // 2 + 1, 2.0)
    w[0] = 1.0
    if box % 2 == 0:
        w[-1] = 1.0
    return w


def oracle_distances(
    noisy: np.ndarray, templates: np.ndarray, inverse_power: np.ndarray | None
) -> np.ndarray:
    """``(n, K)`` squared distances between each noisy volume and its K pose-matched templates,
    in Fourier space weighted by ``inverse_power`` (None: Euclidean)."""
    n, k = templates.shape[:2]
    box = noisy.shape[-1]
    weight = np.broadcast_to(rfft_weights(box), (box, box, box // 2 + 1))
    if inverse_power is not None:
        weight = weight * inverse_power
    out = np.empty((n, k))
    for i0 in range(0, n, 128):
        x = scipy.fft.rfftn(noisy[i0 : i0 + 128], axes=(-3, -2, -1), workers=2)
        for c in range(k):
            t = scipy.fft.rfftn(templates[i0 : i0 + 128, c], axes=(-3, -2, -1), workers=2)
            out[i0 : i0 + 128, c] = np.einsum("nzyx,zyx->n", np.abs(x - t) ** 2, weight)
    return out


def whiten(volumes: np.ndarray, sqrt_inverse_power: np.ndarray) -> np.ndarray:
    """``volumes`` filtered by ``sqrt_inverse_power`` (half spectrum), flattened, float32, scaled
    so that ``−½ Σ (x_w − t_w)²`` is the Gaussian log-likelihood of ``x`` given template ``t``."""
    box = volumes.shape[-1]
    out = np.empty((len(volumes), box**3), dtype=np.float32)
    for i0 in range(0, len(volumes), 256):
        f = scipy.fft.rfftn(volumes[i0 : i0 + 256], axes=FFT_AXES, workers=2)
        f *= sqrt_inverse_power
        w = scipy.fft.irfftn(f, s=(box,) * 3, axes=FFT_AXES, workers=2)
        out[i0 : i0 + 256] = (w * box**1.5).reshape(len(w), -1)
    return out


def pose_search_scores(
    noisy_w: np.ndarray, templates_w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per particle, the best and the log-mean-exp over templates of ``x_w·t_w − ½|t_w|²`` (the
    log-likelihood up to a term that is the same for every class)."""
    half_norm = 0.5 * np.einsum("rv,rv->r", templates_w, templates_w, dtype=np.float64)
    best = np.full(len(noisy_w), -np.inf)
    parts = []
    for r0 in range(0, len(templates_w), 1000):
        ll = noisy_w @ templates_w[r0 : r0 + 1000].T - half_norm[r0 : r0 + 1000]
        best = np.maximum(best, ll.max(axis=1))
        parts.append(logsumexp(ll.astype(np.float64), axis=1))
    mean = logsumexp(np.stack(parts, axis=1), axis=1) - np.log(len(templates_w))
    return best, mean


def run_cell(args: argparse.Namespace, tilt: float, snr: float) -> dict:
    """Simulate the cell, image every structure at every particle's pose (and at ``--rotations``
    random poses) without noise, and score the oracle rules."""
    noisy_set, clean = simulate_cell(args, tilt=tilt, snr=snr, return_clean=True)
    labels, n, k = noisy_set.labels, len(noisy_set.labels), len(STRUCTURES)
    box, imaging = noisy_set.box, cell_imaging(args, tilt)
    aitom = args.snr_convention.startswith("aitom")
    maps = [load_structure(s, args.angpix) for s in STRUCTURES]
    # templates[i, c]: structure c imaged at particle i's pose
    templates = np.empty((n, k) + clean.shape[1:], dtype=np.float32)
    for c in range(k):
        templates[:, c], _ = image_particles(
            [maps[c]], np.zeros(n, dtype=int), noisy_set.angles_deg, noisy_set.shifts_xyz,
            box, args.angpix, imaging, aitom, max_shift_px=1.0,
        )  # fmt: skip
    # the simulator's own clean volumes are the true-class templates (a check of the above)
    match = np.abs(templates[np.arange(n), labels] - clean).max() / np.abs(clean).max()
    if match > 1e-4:
        raise RuntimeError(f"pose-matched templates differ from the simulation ({match:.2g})")
    noise = noisy_set.volumes - clean
    power = np.mean(np.abs(scipy.fft.rfftn(noise, axes=FFT_AXES, workers=2)) ** 2, axis=0)
    # frequencies that carry (almost) no noise carry no signal either (both pass the same
    # low-pass and wedge); leave them out rather than divide by ~0
    keep = power > 1e-6 * power.max()
    inverse_power = np.where(keep, 1.0 / np.where(keep, power, 1.0), 0.0)
    result = {
        "tilt": tilt,
        "snr": snr,
        "effective_snr": round(float(noisy_set.effective_snr), 5),
        "frequencies_kept": round(float(keep.mean()), 4),
    }

    def record(name: str, pred: np.ndarray) -> None:
        result[f"acc_{name}"] = round(100.0 * float(np.mean(pred == labels)), 2)
        result[f"per_class_{name}"] = [
            round(100.0 * float(np.mean(pred[labels == c] == c)), 1) for c in range(k)
        ]

    for name, inv in (("euclidean", None), ("whitened", inverse_power)):
        record(name, np.argmin(oracle_distances(noisy_set.volumes, templates, inv), axis=1))
    del templates
    if args.rotations:
        grid = random_euler(args.rotations, np.random.default_rng(12345))
        sqrt_inv = np.sqrt(inverse_power)
        noisy_w = whiten(noisy_set.volumes, sqrt_inv)
        best, mean = np.empty((n, k)), np.empty((n, k))
        for c in range(k):
            grid_templates, _ = image_particles(
                [maps[c]], np.zeros(len(grid), dtype=int), grid, np.zeros((len(grid), 3)),
                box, args.angpix, imaging, aitom, max_shift_px=1.0,
            )  # fmt: skip
            best[:, c], mean[:, c] = pose_search_scores(noisy_w, whiten(grid_templates, sqrt_inv))
        record("search_max", np.argmax(best, axis=1))
        record("search_mean", np.argmax(mean, axis=1))
    paper = PAPER.get((int(tilt), snr))
    result["paper_acc"] = paper[2] if paper else None
    return result


def markdown(rows: list[dict], protocol: dict) -> str:
    lines = [
        "Pose-known oracle (ceiling for any classifier of these volumes), "
        + ", ".join(f"{k} {v}" for k, v in protocol.items()),
        "",
        "| tilt | SNR (ratio) | pose known, whitened | pose known, Euclidean | per class, pose known "
        f"({', '.join(STRUCTURES)}) | pose searched, max / mean | paper DISCA |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        paper = "–" if r["paper_acc"] is None else f"{r['paper_acc']} %"
        search = (
            f"{r['acc_search_max']} % / {r['acc_search_mean']} %" if "acc_search_max" in r else "–"
        )
        lines.append(
            f"| ±{r['tilt']:g}° | {r['snr']:g} ({r['effective_snr']:.2g}) | {r['acc_whitened']} % "
            f"| {r['acc_euclidean']} % | {' / '.join(map(str, r['per_class_whitened']))} "
            f"| {search} | {paper} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_arguments(ap)
    ap.add_argument("--cells", default="all", help="'all' or tilt:snr pairs, e.g. 60:0.1,40:0.01")
    ap.add_argument(
        "--rotations", type=int, default=0, help="random orientations searched (0: no search)"
    )
    args = ap.parse_args(argv)
    protocol = {
        "n_per_class": args.n_per_class,
        "angpix": args.angpix,
        "snr_convention": args.snr_convention,
        "seed": args.seed,
        "box": 24,
        "rotations_searched": args.rotations,
    }
    rows = []
    for tilt, snr in parse_cells(args.cells):
        t0 = time.time()
        rows.append(run_cell(args, tilt, snr))
        rows[-1]["seconds"] = round(time.time() - t0, 1)
        print(rows[-1], flush=True)
    text = markdown(rows, protocol)
    print(text)
    path = save_result(
        "probe_pose_oracle", args.tag, {"protocol": protocol, "cells": rows}, markdown=text
    )
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
