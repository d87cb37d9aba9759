"""Scoring clusters and picks against ground truth (paper Table S1 and Supplementary Note 2).

* :func:`clustering_metrics` — homogeneity, completeness, V-measure, accuracy after Hungarian
  matching, K found against true K.
* :func:`match_particles` — pair the rows of a result table with a truth table, by image name or by
  position (one-to-one within a distance, per tomogram).
* :func:`picking_metrics` — precision, recall and the paper's false-positive / false-negative rates.

Picking (Supplementary Note 2): two detections "overlap" when their centres are closer than 8 nm
(80 Å; convert with the voxel size: ``max_distance_px = 80 / angpix``). Matching is one-to-one,
closest pairs first. The paper's false-positive rate is the fraction of picks that match no true
particle (FP / picks = 1 − precision) and its false-negative rate the fraction of true particles that
no pick matches (FN / truth = 1 − recall); there are no true negatives in picking, so these are not
the ROC rates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from sklearn.metrics import homogeneity_completeness_v_measure

from .cluster.matching import accuracy_after_matching, contingency
from .io.particles import CLASS, IMAGE, TOMO_NAME, ParticleTable
from .runtime.errors import UserError

PAPER_OVERLAP_ANGST = 80.0


def _codes(labels: np.ndarray | pd.Series) -> np.ndarray:
    """Integer codes for labels of any type (strings allowed)."""
    return pd.factorize(pd.Series(np.asarray(labels).ravel()), sort=True)[0]


def clustering_metrics(truth_labels: np.ndarray, pred_labels: np.ndarray) -> dict:
    """Scores of a clustering against true classes (both 1-D, same length, any label values).

    ``accuracy`` is computed after Hungarian matching of clusters to classes in every case (extra or
    missing clusters count as wrong); ``accuracy_defined`` says whether K found equals the true K,
    the only case where the paper reports accuracy.
    """
    t = np.asarray(truth_labels).ravel()
    p = np.asarray(pred_labels).ravel()
    if t.shape != p.shape:
        raise ValueError(f"label arrays differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("no labels to compare")
    tc, pc = _codes(t), _codes(p)
    h, c, v = homogeneity_completeness_v_measure(tc, pc)
    k_true = int(tc.max() + 1)
    k_found = int(pc.max() + 1)
    return {
        "n": int(t.size),
        "k_true": k_true,
        "k_found": k_found,
        "homogeneity": float(h),
        "completeness": float(c),
        "v_measure": float(v),
        "accuracy": accuracy_after_matching(tc, pc),
        "accuracy_defined": k_found == k_true,
    }


def cluster_composition(truth_labels: np.ndarray, pred_labels: np.ndarray) -> pd.DataFrame:
    """One row per predicted cluster: size, its majority true class and the purity."""
    table, t_values, p_values = contingency(np.asarray(truth_labels), np.asarray(pred_labels))
    sizes = table.sum(axis=0)
    major = table.argmax(axis=0)
    return pd.DataFrame(
        {
            "cluster": p_values,
            "size": sizes,
            "majority_class": t_values[major],
            "purity": table[major, np.arange(len(p_values))] / np.maximum(sizes, 1),
        }
    )


def match_points(
    a_xyz: np.ndarray, b_xyz: np.ndarray, max_distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs ``(ia, ib)`` of points closer than ``max_distance``, closest pairs first."""
    a = np.asarray(a_xyz, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(b_xyz, dtype=np.float64).reshape(-1, 3)
    empty = np.zeros(0, dtype=np.int64)
    if len(a) == 0 or len(b) == 0:
        return empty, empty
    dist, nb = cKDTree(b).query(a, k=min(len(b), 16), distance_upper_bound=max_distance)
    dist = dist.reshape(len(a), -1)
    nb = nb.reshape(len(a), -1)
    ok = np.isfinite(dist) & (dist < max_distance)
    ia = np.repeat(np.arange(len(a)), nb.shape[1])[ok.ravel()]
    ib = nb.ravel()[ok.ravel()]
    d = dist.ravel()[ok.ravel()]
    order = np.lexsort((ib, ia, d))
    used_a = np.zeros(len(a), bool)
    used_b = np.zeros(len(b), bool)
    out_a, out_b = [], []
    for k in order:
        i, j = ia[k], ib[k]
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            out_a.append(i)
            out_b.append(j)
    return np.asarray(out_a, dtype=np.int64), np.asarray(out_b, dtype=np.int64)


def picking_metrics(
    picks_xyz_px: np.ndarray, truth_xyz_px: np.ndarray, max_distance_px: float
) -> dict:
    """Precision, recall and the paper's FPR/FNR of picks against true positions (one tomogram).

    A pick is a true positive when it is matched one-to-one to a true particle closer than
    ``max_distance_px`` (pixels of the same voxel size as the coordinates).
    """
    ia, _ = match_points(picks_xyz_px, truth_xyz_px, max_distance_px)
    return _pick_scores(
        len(np.asarray(picks_xyz_px).reshape(-1, 3)),
        len(np.asarray(truth_xyz_px).reshape(-1, 3)),
        len(ia),
    )


def _pick_scores(n_picks: int, n_truth: int, tp: int) -> dict:
    fp, fn = n_picks - tp, n_truth - tp
    nan = float("nan")
    precision = tp / n_picks if n_picks else nan
    recall = tp / n_truth if n_truth else nan
    f1 = 2 * tp / (n_picks + n_truth) if (n_picks + n_truth) else nan
    return {
        "n_picks": int(n_picks),
        "n_truth": int(n_truth),
        "true_positives": int(tp),
        "false_positives": int(fp),
        "false_negatives": int(fn),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_positive_rate": fp / n_picks if n_picks else nan,
        "false_negative_rate": fn / n_truth if n_truth else nan,
    }


def _name(table: ParticleTable) -> str:
    return str(table.source) if table.source is not None else "particle table"


def _scale_to(pred: ParticleTable, truth: ParticleTable, angpix: float | None) -> np.ndarray:
    """Positions of ``pred`` in pixels of ``truth``'s voxel size."""
    pa = pred.coord_angpix or angpix
    ta = truth.coord_angpix or angpix
    if pa is None or ta is None:
        missing = _name(pred) if pa is None else _name(truth)
        raise UserError(f"{missing}: coordinate voxel size unknown; pass --angpix")
    return pred.coords_px * (float(pa) / float(ta))


def truth_angpix(truth: ParticleTable, angpix: float | None = None) -> float:
    """Voxel size (Å) of the truth table's coordinates."""
    a = truth.coord_angpix or angpix
    if not a:
        raise UserError(f"{_name(truth)}: coordinate voxel size unknown; pass --angpix")
    return float(a)


def _image_basename(name: str) -> str:
    """``N@dir/file.mrcs`` → ``N@file.mrcs``; ``dir/file.mrc`` → ``file.mrc``."""
    index, _, path = name.rpartition("@")
    return f"{index}@{Path(path).name}" if index else Path(path).name


def match_particles(
    pred_table: ParticleTable,
    truth_table: ParticleTable,
    by: str = "image",
    max_distance_px: float | None = None,
    angpix: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(pred_rows, truth_rows)`` of particles present in both tables.

    ``by="image"``: same ``rlnImageName`` (exact, or else same file name without folder).
    ``by="coords"``: same ``rlnTomoName`` and positions closer than ``max_distance_px`` (pixels of the
    truth table's voxel size; the result table is rescaled to it), one-to-one, closest first.
    """
    pdf, tdf = pred_table.particles, truth_table.particles
    if by == "image":
        for table in (pred_table, truth_table):
            if IMAGE not in table.particles.columns:
                raise UserError(
                    f"{_name(table)}: no {IMAGE} column to match by image; use --match coords"
                )
        for key in (str, _image_basename):
            pk, tk = pdf[IMAGE].astype(str).map(key), tdf[IMAGE].astype(str).map(key)
            if tk.duplicated().any():
                continue
            lookup = pd.Series(np.arange(len(tdf)), index=tk.to_numpy())
            hit = pk.isin(lookup.index).to_numpy()
            if hit.any():
                rows = np.flatnonzero(hit)
                return rows, lookup.loc[pk.to_numpy()[rows]].to_numpy()
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if by != "coords":
        raise ValueError(f"by must be 'image' or 'coords', got {by!r}")
    if max_distance_px is None:
        raise ValueError("max_distance_px is needed to match by coordinates")
    pxyz = _scale_to(pred_table, truth_table, angpix)
    txyz = truth_table.coords_px
    out_p, out_t = [], []
    ptomo = pdf[TOMO_NAME].astype(str).to_numpy()
    ttomo = tdf[TOMO_NAME].astype(str).to_numpy()
    for tomo in np.intersect1d(np.unique(ptomo), np.unique(ttomo)):
        pi = np.flatnonzero(ptomo == tomo)
        ti = np.flatnonzero(ttomo == tomo)
        a, b = match_points(pxyz[pi], txyz[ti], max_distance_px)
        out_p.append(pi[a])
        out_t.append(ti[b])
    if not out_p:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_p), np.concatenate(out_t)


def evaluate_clusters(
    pred_table: ParticleTable,
    truth_table: ParticleTable,
    by: str = "image",
    max_distance_angst: float = PAPER_OVERLAP_ANGST,
    angpix: float | None = None,
    pred_column: str = CLASS,
    truth_column: str = CLASS,
) -> dict:
    """Match the tables, then :func:`clustering_metrics` on the matched particles (plus counts).

    ``k_found`` and ``k_true`` count the classes of the whole tables: a cluster made only of
    particles that match nothing (false picks, say) is still a cluster the run found, and
    ``accuracy_defined`` compares these. ``k_found_matched`` and ``k_true_matched`` count those
    among the matched particles, which the scores are computed on."""
    for table, col in ((pred_table, pred_column), (truth_table, truth_column)):
        if col not in table.particles.columns:
            raise UserError(f"{_name(table)}: no {col} column (class labels) to evaluate")
    max_px = None
    if by == "coords":
        max_px = max_distance_angst / truth_angpix(truth_table, angpix)
    pi, ti = match_particles(pred_table, truth_table, by, max_px, angpix)
    if len(pi) == 0:
        raise UserError(
            f"{_name(pred_table)}: no particle matches {_name(truth_table)} (matched by {by})"
        )
    pred = pred_table.particles[pred_column].to_numpy()[pi]
    truth = truth_table.particles[truth_column].to_numpy()[ti]
    out = clustering_metrics(truth, pred)
    k_found = int(pred_table.particles[pred_column].nunique())
    k_true = int(truth_table.particles[truth_column].nunique())
    out.update(
        k_found=k_found,
        k_true=k_true,
        k_found_matched=out["k_found"],
        k_true_matched=out["k_true"],
        accuracy_defined=k_found == k_true,
        n_pred=len(pred_table),
        n_truth=len(truth_table),
        n_matched=int(len(pi)),
        match=by,
        composition=cluster_composition(truth, pred).to_dict(orient="records"),
    )
    if by == "coords":
        out["max_distance_angst"] = float(max_distance_angst)
    return out


def evaluate_picks(
    pred_table: ParticleTable,
    truth_table: ParticleTable,
    max_distance_angst: float = PAPER_OVERLAP_ANGST,
    angpix: float | None = None,
) -> dict:
    """:func:`picking_metrics` over all tomograms (pooled counts) plus one entry per tomogram."""
    ta = truth_angpix(truth_table, angpix)
    max_px = max_distance_angst / ta
    pxyz = _scale_to(pred_table, truth_table, angpix)
    txyz = truth_table.coords_px
    ptomo = pred_table.particles[TOMO_NAME].astype(str).to_numpy()
    ttomo = truth_table.particles[TOMO_NAME].astype(str).to_numpy()
    if not np.intersect1d(ptomo, ttomo).size:
        raise UserError(
            f"{_name(pred_table)}: no tomogram name in common with {_name(truth_table)}"
        )
    per_tomo = {}
    tp_total = 0
    for tomo in np.union1d(np.unique(ptomo), np.unique(ttomo)):
        pi = ptomo == tomo
        ti = ttomo == tomo
        ia, _ = match_points(pxyz[pi], txyz[ti], max_px)
        tp_total += len(ia)
        per_tomo[str(tomo)] = _pick_scores(int(pi.sum()), int(ti.sum()), len(ia))
    out = _pick_scores(len(pxyz), len(txyz), tp_total)
    out.update(
        max_distance_angst=float(max_distance_angst),
        max_distance_px=float(max_px),
        angpix=ta,
        per_tomogram=per_tomo,
    )
    return out
