"""Matching two labellings by the Hungarian algorithm on their contingency matrix (paper, Methods).

Used between EM iterations (keep cluster numbers stable) and for evaluation (accuracy after matching
the predicted clusters to the true classes). Labels may be any integers; the two label sets may differ
in size.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency matrix of two labellings of the same points.

    Returns ``(table, a_values, b_values)`` where ``table[i, j]`` counts the points with
    ``a == a_values[i]`` and ``b == b_values[j]`` (values sorted ascending).
    """
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labellings differ in length: {a.size} vs {b.size}")
    a_values, ai = np.unique(a, return_inverse=True)
    b_values, bi = np.unique(b, return_inverse=True)
    table = np.zeros((len(a_values), len(b_values)), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    return table, a_values, b_values


def match_labels(reference: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Renumber ``labels`` so that they agree as much as possible with ``reference``.

    The one-to-one assignment maximising the number of shared points is found with
    ``scipy.optimize.linear_sum_assignment``; each matched label takes its reference label's number.
    Labels left unmatched (when ``labels`` has more distinct values than ``reference``) get fresh
    numbers above every reference value and every matched number, in ascending order of the old label.

    Returns ``(new_labels, mapping)`` with ``mapping[old] = new`` for every value of ``labels``.
    """
    reference = np.asarray(reference).ravel()
    labels = np.asarray(labels).ravel()
    table, ref_values, lab_values = contingency(reference, labels)
    rows, cols = linear_sum_assignment(table, maximize=True)
    mapping: dict[int, int] = {}
    for r, c in zip(rows, cols, strict=True):
        mapping[int(lab_values[c])] = int(ref_values[r])
    fresh = int(ref_values.max()) + 1 if len(ref_values) else 0
    for v in lab_values:
        if int(v) not in mapping:
            mapping[int(v)] = fresh
            fresh += 1
    lut_keys = np.array(sorted(mapping), dtype=lab_values.dtype if lab_values.size else np.int64)
    lut_vals = np.array([mapping[int(k)] for k in lut_keys], dtype=np.int64)
    new = lut_vals[np.searchsorted(lut_keys, labels)] if labels.size else labels.astype(np.int64)
    return new, mapping


def accuracy_after_matching(truth: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of points whose predicted cluster, after Hungarian matching to ``truth``, is right.

    Defined for any numbers of clusters: unmatched clusters count as wrong. It is the paper's
    "prediction accuracy" only when the numbers of clusters agree.
    """
    truth = np.asarray(truth).ravel()
    if truth.size == 0:
        return float("nan")
    table, _, _ = contingency(truth, pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / truth.size)
