"""How much class information do the features that start the EM loop carry?

DISCA's iteration 0 clusters the features of an untrained YOPO. This probe compares them with PCA of the raw
voxels on a Table S1-style set (5 shipped structures, SNR 0.1, ±60°, 24³ at 14 Å): the same PCA (16) and
mixture selection with the paper's BIC (K 2–10), scored by homogeneity against the truth.

    python benchmarks/probe_initial_features.py [--n-per-class 200] [--snr 0.1]

Prints a table and saves benchmarks/results/probe_initial_features.json.
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

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import homogeneity_score  # noqa: E402
from table_s1_cell import (  # noqa: E402
    STRUCTURES,
    add_cell_arguments,
    bic_clusters,
    save_result,
    simulate_cell,
)

from disca_tools.model.data import normalise  # noqa: E402
from disca_tools.model.yopo import (  # noqa: E402
    YopoConfig,
    build_yopo,
    calibrate_batchnorm,
    feature_extractor,
)  # noqa: E402


def _score(x: np.ndarray, truth: np.ndarray) -> dict:
    k, labels = bic_clusters(x, 16, list(range(2, 11)))
    return {"k": k, "homogeneity": round(float(homogeneity_score(truth, labels)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_arguments(ap)
    ap.add_argument("--width-scales", type=float, nargs="+", default=[0.1, 0.25])
    args = ap.parse_args()
    t0 = time.time()
    sim = simulate_cell(args)
    vols, truth = normalise(sim.volumes), sim.labels
    rows = [{"features": "raw voxels", **_score(vols.reshape(len(vols), -1), truth)}]
    for ws in args.width_scales:
        cfg = YopoConfig(box=24, n_classes=5, width_scale=ws, feature_dim=1024, precision="float32")
        model = build_yopo(cfg, seed=0)
        feats = feature_extractor(model).predict(vols[..., None], batch_size=64, verbose=0)
        taps = keras.Model(model.inputs, model.get_layer("taps").output)
        tap_values = taps.predict(vols[..., None], batch_size=64, verbose=0)
        z = (tap_values - tap_values.mean(0)) / (tap_values.std(0) + 1e-8)
        rows.append({"features": f"untrained YOPO w={ws}: 1024-D features", **_score(feats, truth)})
        rows.append(
            {"features": f"untrained YOPO w={ws}: pooled taps, standardised", **_score(z, truth)}
        )
        sample = vols[np.random.default_rng(0).permutation(len(vols))[:256]]
        calibrate_batchnorm(model, sample)
        feats = feature_extractor(model).predict(vols[..., None], batch_size=64, verbose=0)
        rows.append(
            {
                "features": f"untrained YOPO w={ws}: 1024-D, BatchNorm calibrated",
                **_score(feats, truth),
            }
        )
    print(
        f"{len(vols)} subtomograms, SNR {args.snr} ({args.snr_convention}; variance ratio "
        f"{sim.effective_snr:.3g}), {args.angpix} Å; PCA 16, paper BIC, K 2–10"
    )
    print(f"{'features':52s} {'K':>3s} {'homogeneity':>12s}")
    for r in rows:
        print(f"{r['features']:52s} {r['k']:3d} {r['homogeneity']:12.3f}")
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
