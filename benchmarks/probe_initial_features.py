"""How much class information do the features that start the EM loop carry?

DISCA's iteration 0 clusters the features of an untrained YOPO. This probe compares them with PCA of the raw
voxels and with the rotation-invariant descriptors of ``--init invariants`` (real-space shells, power-spectrum
shells, both) on a Table S1-style set (5 shipped structures, SNR 0.1, ±60°, 24³ at 14 Å): the same PCA
(``--pca-dim``, 16) and mixture selection with the paper's BIC (K 2–10), scored by homogeneity against the truth.
The invariants are also scored with k-means at the true K and with a supervised logistic regression
(5-fold cross-validated accuracy: how much class information they carry at all); ``--shell-degrees``
compares real-space shells up to several spherical-harmonic degrees (default: the loop's, 10);
``--covariance diag`` fits the descriptors' mixtures with diagonal covariances (scikit-learn's BIC), ``auto``
as ``--init-covariance auto`` does (full or diagonal, whichever has the lower scikit-learn BIC).
Accuracies are after Hungarian matching.

    python benchmarks/probe_initial_features.py [--n-per-class 200] [--snr 0.1] [--width-scales 0.1 0.25]
        [--shell-degrees 6 10] [--covariance full|diag|auto]

Prints a table and saves benchmarks/results/probe_initial_features.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from disca_tools.model.backend import import_tensorflow  # noqa: E402

import_tensorflow()  # TensorFlow's start-up lines kept out of the log

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import save_result  # noqa: E402
from sklearn.metrics import homogeneity_score  # noqa: E402
from table_s1_cell import (  # noqa: E402
    STRUCTURES,
    add_cell_arguments,
    bic_clusters,
    simulate_cell,
)

from disca_tools.cluster.config import INIT_COVARIANCES  # noqa: E402
from disca_tools.cluster.invariants import SHELL_L_MAX  # noqa: E402
from disca_tools.cluster.matching import accuracy_after_matching  # noqa: E402
from disca_tools.model.data import normalise  # noqa: E402
from disca_tools.model.yopo import (  # noqa: E402
    YopoConfig,
    build_yopo,
    calibrate_batchnorm,
    feature_extractor,
)  # noqa: E402


def _score(x: np.ndarray, truth: np.ndarray, pca_dim: int, covariance: str = "full") -> dict:
    k, labels = bic_clusters(x, pca_dim, list(range(2, 11)), covariance)
    return {
        "k": k,
        "homogeneity": round(float(homogeneity_score(truth, labels)), 4),
        "accuracy": round(float(accuracy_after_matching(truth, labels)), 4),
    }


def _invariant_rows(
    vols: np.ndarray, truth: np.ndarray, pca_dim: int, shell_degrees: list[int], covariance: str
) -> list[dict]:
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from disca_tools.cluster.invariants import (
        fourier_invariant_descriptors,
        rotation_invariant_descriptors,
        standardise_columns,
    )
    from disca_tools.cluster.mixture import fit_pca

    spectrum = fourier_invariant_descriptors(vols).astype(np.float64)
    sets = [("invariants: power-spectrum shells", spectrum)]
    for deg in shell_degrees:
        real = rotation_invariant_descriptors(vols, deg).astype(np.float64)
        both = "both (--init invariants)" if deg == SHELL_L_MAX else "both"
        sets += [
            (f"invariants: real-space shells, l ≤ {deg}", real),
            (f"invariants: {both}, shells l ≤ {deg}", np.hstack([real, spectrum])),
        ]
    rows = []
    for name, x in sets:
        x = standardise_columns(x)
        z = fit_pca(x, pca_dim, 0).transform(x)
        km = KMeans(len(np.unique(truth)), n_init=10, random_state=0).fit_predict(z)
        supervised = cross_val_score(LogisticRegression(max_iter=3000), x, truth, cv=5).mean()
        rows.append(
            {
                "features": name,
                **_score(x, truth, pca_dim, covariance),
                "homogeneity_kmeans_true_k": round(float(homogeneity_score(truth, km)), 4),
                "accuracy_kmeans_true_k": round(float(accuracy_after_matching(truth, km)), 4),
                "supervised_accuracy": round(float(supervised), 4),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_arguments(ap)
    ap.add_argument("--width-scales", type=float, nargs="*", default=[0.1, 0.25])
    ap.add_argument("--pca-dim", type=int, default=16)
    ap.add_argument("--shell-degrees", type=int, nargs="+", default=[SHELL_L_MAX])
    ap.add_argument(
        "--covariance",
        choices=list(INIT_COVARIANCES),
        default="full",
        help="the descriptors' mixtures as --init-covariance fits them: full covariances with the "
        "paper's BIC (the loop's default), diagonal ones with scikit-learn's BIC, or auto (the "
        "lower scikit-learn BIC of the two)",
    )
    args = ap.parse_args()
    t0 = time.time()
    sim = simulate_cell(args)
    vols, truth = normalise(sim.volumes), sim.labels
    rows = [{"features": "raw voxels", **_score(vols.reshape(len(vols), -1), truth, args.pca_dim)}]
    rows += _invariant_rows(vols, truth, args.pca_dim, args.shell_degrees, args.covariance)
    for ws in args.width_scales:
        cfg = YopoConfig(box=24, n_classes=5, width_scale=ws, feature_dim=1024, precision="float32")
        model = build_yopo(cfg, seed=0)
        feats = feature_extractor(model).predict(vols[..., None], batch_size=64, verbose=0)
        taps = keras.Model(model.inputs, model.get_layer("taps").output)
        tap_values = taps.predict(vols[..., None], batch_size=64, verbose=0)
        z = (tap_values - tap_values.mean(0)) / (tap_values.std(0) + 1e-8)
        rows.append(
            {
                "features": f"untrained YOPO w={ws}: 1024-D features",
                **_score(feats, truth, args.pca_dim),
            }
        )
        rows.append(
            {
                "features": f"untrained YOPO w={ws}: pooled taps, standardised",
                **_score(z, truth, args.pca_dim),
            }
        )
        sample = vols[np.random.default_rng(0).permutation(len(vols))[:256]]
        calibrate_batchnorm(model, sample)
        feats = feature_extractor(model).predict(vols[..., None], batch_size=64, verbose=0)
        rows.append(
            {
                "features": f"untrained YOPO w={ws}: 1024-D, BatchNorm calibrated",
                **_score(feats, truth, args.pca_dim),
            }
        )
    print(
        f"{len(vols)} subtomograms, SNR {args.snr} ({args.snr_convention}; variance ratio "
        f"{sim.effective_snr:.3g}), {args.angpix} Å; PCA {args.pca_dim}, paper BIC, K 2–10 "
        f"(descriptors: {args.covariance} covariances)"
    )
    print(
        f"{'features':52s} {'K':>3s} {'h':>6s} {'acc':>6s} {'k-means K=5: h':>15s} {'acc':>6s} "
        f"{'supervised':>11s}"
    )
    for r in rows:
        extra = (
            f" {r['homogeneity_kmeans_true_k']:15.3f} {r['accuracy_kmeans_true_k']:6.3f}"
            f" {r['supervised_accuracy']:11.3f}"
            if "supervised_accuracy" in r
            else ""
        )
        print(
            f"{r['features']:52s} {r['k']:3d} {r['homogeneity']:6.3f} {r['accuracy']:6.3f}{extra}"
        )
    out = {
        "protocol": vars(args),
        "structures": STRUCTURES,
        "effective_snr": sim.effective_snr,
        "rows": rows,
        "seconds": time.time() - t0,
    }
    save_result("probe_initial_features", args.tag, out)


if __name__ == "__main__":
    main()
