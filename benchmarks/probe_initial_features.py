"""How much class information do the features that start the EM loop carry?

DISCA's iteration 0 clusters the features of an untrained YOPO. This probe compares them with PCA of the raw
voxels on a Table S1-style set (5 shipped structures, SNR 0.1, ±60°, 24³ at 14 Å): the same PCA (16) and
mixture selection with the paper's BIC (K 2–10), scored by homogeneity against the truth.

    python benchmarks/probe_initial_features.py [--n-per-class 200] [--snr 0.1]

Prints a table and saves benchmarks/results/probe_initial_features.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import homogeneity_score  # noqa: E402

from disca_tools.cluster.mixture import fit_pca, select_mixture  # noqa: E402
from disca_tools.model.data import normalise  # noqa: E402
from disca_tools.model.yopo import (  # noqa: E402
    YopoConfig,
    build_yopo,
    calibrate_batchnorm,
    feature_extractor,
)  # noqa: E402
from disca_tools.simulate.imaging import Imaging  # noqa: E402
from disca_tools.simulate.subtomograms import simulate_subtomogram_set  # noqa: E402

STRUCTURES = ["4v4r", "3j9i", "4v94", "1qvr", "3d2f"]
RESULTS = Path(__file__).resolve().parent / "results"


def _score(x: np.ndarray, truth: np.ndarray) -> dict:
    reduced = fit_pca(x, 16, 0).transform(x)
    sel = select_mixture(reduced, list(range(2, 11)), seed=0)
    return {"k": int(sel.k), "homogeneity": round(float(homogeneity_score(truth, sel.labels)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=200)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--angpix", type=float, default=14.0)
    ap.add_argument("--snr-convention", default="volume", choices=["volume", "aitom"])
    ap.add_argument("--tag", default="")
    ap.add_argument("--width-scales", type=float, nargs="+", default=[0.1, 0.25])
    args = ap.parse_args()
    t0 = time.time()
    sim = simulate_subtomogram_set(
        STRUCTURES,
        args.n_per_class,
        24,
        args.angpix,
        args.snr,
        Imaging(),
        seed=0,
        snr_convention=args.snr_convention,
    )
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
    RESULTS.mkdir(exist_ok=True)
    out = {
        "protocol": vars(args),
        "structures": STRUCTURES,
        "effective_snr": sim.effective_snr,
        "rows": rows,
        "seconds": time.time() - t0,
    }
    name = "probe_initial_features" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
