"""What DISCA's wrong clusters are: merged classes, or a class split by how it sits in the missing wedge.

Reads the iterations that ``bench_table_s1.py --save-iterations DIR`` saved (one subfolder per cell
and method: ``cell.npz`` with the truth and the simulated poses, ``iteration_NNN.npz`` with each
iteration's labels, the PCA points the mixtures saw and their posteriors) and, for every iteration:

* the contingency table (clusters × true classes) and the accuracy after Hungarian matching;
* with more clusters than classes, the accuracy after the best merge of two clusters (what merging
  an over-split pair, e.g. with ``disca_split_star --merge``, would give);
* for every class spread over two clusters (the second holding at least a quarter of the first and
  at least 40 particles): how well the particle's *orientation* tells which of the two it went to
  (5-fold cross-validated logistic regression on the products of its rotation matrix's entries,
  beside the majority rate), and the mean angle between the structure's long axis (largest second
  moment of the shipped map) and the beam (z) in each of the two clusters. A split the orientation
  predicts well above the majority rate is the missing wedge's doing: the same structure seen along
  or across its wedge.

    python benchmarks/bench_table_s1.py ... --cells 40:0.03 --save-iterations /tmp/it_t40s003
    python benchmarks/probe_cluster_errors.py /tmp/it_t40s003/t40_snr0.03_disca --tag t40s003

Prints the tables and saves benchmarks/results/probe_cluster_errors[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import save_result  # noqa: E402

from disca_tools.cluster.matching import accuracy_after_matching, contingency  # noqa: E402
from disca_tools.geometry import euler_to_matrix  # noqa: E402
from disca_tools.simulate.structures import load_structure  # noqa: E402


def long_axis(name: str, angpix: float) -> np.ndarray:
    """Unit vector (x, y, z) of the shipped map's largest second moment (density above its 90th
    percentile), in the reference frame."""
    vol = load_structure(name, angpix)
    w = np.clip(vol - np.percentile(vol, 90), 0, None).ravel()
    z, y, x = (a.ravel().astype(float) for a in np.indices(vol.shape))
    pts = np.stack([x, y, z], axis=1)
    pts -= (pts * w[:, None]).sum(0) / w.sum()
    moments = (pts * w[:, None]).T @ pts / w.sum()
    return np.linalg.eigh(moments)[1][:, -1]


def split_by_orientation(
    rotations: np.ndarray, in_first: np.ndarray, axis: np.ndarray, seed: int = 0
) -> dict:
    """How a class's two clusters differ in orientation. ``rotations`` (n, 3, 3) of the class's
    particles in the two clusters, ``in_first`` whether each is in the first, ``axis`` the
    structure's long axis. A reference direction ``a`` lies along ``Mᵀa`` in the tomogram
    (``sub(x) = ref(M·(x − c − d) + c)``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    products = np.einsum("nij,nkl->nijkl", rotations, rotations).reshape(len(rotations), -1)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    score = cross_val_score(LogisticRegression(max_iter=2000), products, in_first, cv=folds)
    beam = np.abs(np.einsum("nji,j->ni", rotations, axis)[:, 2])  # |z| of Mᵀa
    angle = np.degrees(np.arccos(np.clip(beam, 0, 1)))
    return {
        "orientation_predicts_percent": round(100 * float(score.mean()), 1),
        "majority_percent": round(100 * float(max(in_first.mean(), 1 - in_first.mean())), 1),
        "long_axis_to_beam_deg": [
            round(float(angle[in_first].mean()), 1),
            round(float(angle[~in_first].mean()), 1),
        ],
    }


def best_merge(truth: np.ndarray, labels: np.ndarray) -> tuple[tuple[int, int], float]:
    """The pair of clusters whose merge gives the highest accuracy after matching, and that accuracy."""
    best, best_acc = (-1, -1), -1.0
    for a, b in combinations(np.unique(labels), 2):
        acc = accuracy_after_matching(truth, np.where(labels == b, a, labels))
        if acc > best_acc:
            best, best_acc = (int(a), int(b)), acc
    return best, 100 * best_acc


def probe_iteration(
    saved: Path, truth: np.ndarray, rotations: np.ndarray, names: list[str], axes: dict
) -> dict:
    """The record of one saved iteration (see the module docstring)."""
    it = np.load(saved)
    labels = it["labels"]
    table, clusters, classes = contingency(labels, truth)
    rec: dict = {
        "iteration": int(saved.stem.split("_")[-1]),
        "k": int(it["k"]),
        "accuracy": round(100 * accuracy_after_matching(truth, labels), 2),
        "table": {int(c): row.tolist() for c, row in zip(clusters, table, strict=True)},
    }
    if len(clusters) > len(names):
        pair, acc = best_merge(truth, labels)
        rec["best_merge"] = {"clusters": list(pair), "accuracy": round(acc, 2)}
    splits = {}
    for column, t in enumerate(classes):
        counts = table[:, column]
        order = np.argsort(counts)[::-1]
        first = counts[order[0]]
        second = counts[order[1]] if len(order) > 1 else 0
        if second < max(40, 0.25 * first):
            continue
        name = names[t]
        pair = clusters[order[:2]]
        member = (truth == t) & np.isin(labels, pair)
        split = split_by_orientation(rotations[member], labels[member] == pair[0], axes[name])
        splits[name] = {"clusters": pair.tolist(), "sizes": [int(first), int(second)], **split}
    rec["splits"] = splits
    return rec


def markdown(folder: Path, names: list[str], records: list[dict]) -> str:
    lines = [f"# Where the clusters go wrong: `{folder}`", ""]
    for rec in records:
        merge = rec.get("best_merge")
        head = f"## Iteration {rec['iteration']}: K {rec['k']}, accuracy {rec['accuracy']} %"
        if merge:
            head += f"; best merge {merge['clusters']}: {merge['accuracy']} %"
        lines += [head, "", "| cluster | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]  # fmt: skip
        lines += [f"| {c} | " + " | ".join(map(str, row)) + " |" for c, row in rec["table"].items()]
        for name, s in rec["splits"].items():
            lines.append(
                f"\n{name} over clusters {s['clusters']} ({s['sizes'][0]} / {s['sizes'][1]}): "
                f"orientation predicts the cluster {s['orientation_predicts_percent']} % "
                f"(majority {s['majority_percent']} %); long axis to the beam "
                f"{s['long_axis_to_beam_deg'][0]}° / {s['long_axis_to_beam_deg'][1]}°"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "folder", type=Path, help="one cell's folder of bench_table_s1.py --save-iterations"
    )
    ap.add_argument("--angpix", type=float, default=14.0, help="Å per voxel of the long-axis maps")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    args = ap.parse_args(argv)
    cell_file = args.folder / "cell.npz"
    if not cell_file.is_file():
        print(
            f"{cell_file}: not found (write it with bench_table_s1.py --save-iterations)",
            file=sys.stderr,
        )
        return 2
    cell = np.load(cell_file)
    truth = cell["labels"]
    names = [str(n) for n in cell["class_names"]]
    rotations = euler_to_matrix(cell["angles_deg"])
    axes = {name: long_axis(name, args.angpix) for name in names}
    records = [
        probe_iteration(f, truth, rotations, names, axes)
        for f in sorted(args.folder.glob("iteration_*.npz"))
    ]
    md = markdown(args.folder, names, records)
    print(md)
    payload = {"folder": str(args.folder), "classes": names, "tilt": float(cell["tilt"]),
               "snr": float(cell["snr"]), "iterations": records}  # fmt: skip
    save_result("probe_cluster_errors", args.tag, payload, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
