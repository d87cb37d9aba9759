"""How much class information can YOPO's features carry when it is trained on the *true* labels?

DISCA trains YOPO on its own pseudo-labels; if YOPO (at a CPU width, with DISCA's training recipe:
rotated copies, label smoothing, categorical hinge loss, Nadam) cannot learn separable features even
from the true labels, the EM loop cannot either. This probe trains on the truth for a few epochs and
after each stage clusters the inference-mode features the way the loop does (PCA 16, full-covariance
mixtures with the paper's BIC, K 2–10), scored by homogeneity; the raw-voxel baseline is printed
beside it. A ceiling for the loop, not a result of DISCA. ``--held-out-per-class M`` also simulates
M particles per class of the same cell with another seed (new poses, shifts and noise), never
trained on, and reports the trained classifier's accuracy on them: what the network generalises to,
where the training fit can be memorised noise.

    python benchmarks/probe_supervised_ceiling.py [--n-per-class 200] [--snr 0.1] \\
        [--snr-convention volume|aitom] [--width-scale 0.1] [--epochs 2 4 8] [--held-out-per-class 200]

Prints a table and saves benchmarks/results/probe_supervised_ceiling[_TAG].json.
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

import numpy as np  # noqa: E402
from common import add_cluster_arguments, save_result  # noqa: E402
from sklearn.metrics import homogeneity_score  # noqa: E402
from table_s1_cell import (  # noqa: E402
    STRUCTURES,
    add_cell_arguments,
    bic_clusters,
    simulate_cell,
)

from disca_tools.cluster.em import EMConfig, smooth_targets  # noqa: E402
from disca_tools.cluster.mixture import select_mixture  # noqa: E402
from disca_tools.cluster.training import Trainer  # noqa: E402
from disca_tools.io.store import SubtomogramStore  # noqa: E402
from disca_tools.model import yopo as Y  # noqa: E402
from disca_tools.model.data import (  # noqa: E402
    normalise,
    predict_features,
    train_dataset,
)


def score(x: np.ndarray, truth: np.ndarray, pca_dim: int) -> dict:
    from sklearn.cluster import KMeans

    from disca_tools.cluster.mixture import fit_pca

    k, labels = bic_clusters(x, pca_dim, list(range(2, 11)))
    reduced = fit_pca(x, pca_dim, 0).transform(x)
    km = KMeans(n_clusters=len(np.unique(truth)), n_init=5, random_state=0).fit_predict(reduced)
    return {
        "k_bic": k,
        "h_bic": round(float(homogeneity_score(truth, labels)), 4),
        "h_kmeans_true_k": round(float(homogeneity_score(truth, km)), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_arguments(ap)
    ap.add_argument("--width-scale", type=float, default=0.1)
    ap.add_argument("--feature-dim", type=int, default=1024)
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 4, 8], help="cumulative stages")
    ap.add_argument("--lr", type=float, default=1e-3)
    add_cluster_arguments(ap, ["input_dropout"])
    ap.add_argument("--alpha", type=float, default=0.1, help="label smoothing")
    ap.add_argument("--pca-dim", type=int, default=16)
    ap.add_argument("--precision", default="auto")
    ap.add_argument(
        "--labels",
        default="truth",
        choices=["truth", "voxels"],
        help="train on the true labels, or on the clusters of PCA of the voxels (iteration 0 of "
        "--init voxels)",
    )
    ap.add_argument(
        "--calibrate-bn", action="store_true", help="calibrate BatchNorm before features"
    )
    ap.add_argument(
        "--held-out-per-class",
        type=int,
        default=0,
        help="also score the classifier on this many unseen particles per class (seed + 1000); "
        "with --labels truth only",
    )
    args = ap.parse_args()
    if args.held_out_per_class > 0 and args.labels != "truth":
        ap.error(
            "--held-out-per-class: only with --labels truth (the head is scored on true classes)"
        )
    t0 = time.time()
    sim = simulate_cell(args)
    vols, truth = normalise(sim.volumes), sim.labels
    held_vols = held_truth = None
    if args.held_out_per_class > 0:
        held = simulate_cell(args, n_per_class=args.held_out_per_class, seed=args.seed + 1000)
        held_vols, held_truth = normalise(held.volumes), held.labels
    rows = [{"stage": "raw voxels", **score(vols.reshape(len(vols), -1), truth, args.pca_dim)}]
    print(rows[-1], flush=True)
    store = SubtomogramStore(
        volumes=vols, names=[f"s{i}" for i in range(len(vols))], path=Path("<memory>")
    )
    idx = np.arange(len(vols))
    cfg = EMConfig(
        width_scale=args.width_scale,
        feature_dim=args.feature_dim,
        precision=Y.resolve_precision(args.precision),
        input_dropout=args.input_dropout,
    )
    k = len(STRUCTURES)
    model = Y.build_yopo(cfg.yopo(24, k), seed=0)
    trainer = Trainer(model, args.lr)
    extractor = Y.feature_extractor(model)
    feats = predict_features(extractor, store, idx, 64)
    rows.append({"stage": "untrained", "epochs": 0, **score(feats, truth, args.pca_dim)})
    print(rows[-1], flush=True)
    done = 0
    labels = truth
    if args.labels == "voxels":
        from disca_tools.cluster.em import voxel_pca_features

        x0 = voxel_pca_features(store, idx, args.pca_dim, 0)
        labels = select_mixture(x0, list(range(2, 11)), seed=0).labels
        k = int(labels.max()) + 1
        rows.append(
            {"stage": "voxel clusters (training labels)", "k": k,
             "h": round(float(homogeneity_score(truth, labels)), 4)}
        )  # fmt: skip
        print(rows[-1], flush=True)
    targets = smooth_targets(labels, k, args.alpha, width=len(STRUCTURES))
    if args.labels == "voxels":
        from disca_tools.cluster.em import warm_up_head

        warm_up_head(model, feats, labels, k, cfg, 0)  # random head (no PCA)
    for stage in args.epochs:
        ds = train_dataset(store, idx, targets, cfg.batch_size, seed=stage)
        t1 = time.time()
        loss = trainer.fit(ds, stage - done, args.lr)
        done = stage
        if args.calibrate_bn:
            Y.calibrate_batchnorm(
                model, vols[np.random.default_rng(0).permutation(len(vols))[:512]]
            )
        feats = predict_features(extractor, store, idx, 64)
        probs = model.predict(vols[..., None], batch_size=64, verbose=0)
        acc = float(np.mean(np.argmax(probs, axis=1) == labels))
        held_out = {}
        if held_vols is not None:
            held_probs = model.predict(held_vols[..., None], batch_size=64, verbose=0)
            held_out["held_out_accuracy"] = round(
                float(np.mean(np.argmax(held_probs, axis=1) == held_truth)), 4
            )
        logits = np.log(np.maximum(probs[:, :k], 1e-12))
        z = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
        rows.append(
            {
                "stage": f"trained on {args.labels}",
                "epochs": done,
                "loss": round(loss, 4),
                "head_accuracy": round(acc, 4),
                **held_out,
                "seconds_train": round(time.time() - t1, 1),
                **score(feats, truth, args.pca_dim),
                "log_probs": score(logits, truth, k - 1),
                "standardised": score(z, truth, args.pca_dim),
            }
        )
        print(rows[-1], flush=True)
    out = {
        "protocol": vars(args),
        "structures": STRUCTURES,
        "rows": rows,
        "seconds": time.time() - t0,
    }
    save_result("probe_supervised_ceiling", args.tag, out)


if __name__ == "__main__":
    main()
