"""Mixed bfloat16 against float32, side by side in one run: speed of the full network, accuracy of DISCA.

``disca_cluster --precision auto`` (the default) computes in bfloat16 with float32 weights where the
hardware has native bfloat16 (``resolve_precision``). This measures what that changes, in one process:

1. Speed: the full YOPO (width 1.0, 1,024 features, 5 classes, 24³), Keras ``fit`` on ``--train``
   volumes (batch 32, the categorical hinge loss and Nadam of the loop) and ``predict`` on
   ``--predict`` volumes (batch 64), for each precision, alternated, ``--repeats`` each, after a
   warm-up call of each; samples per second (medians) and their ratio.
2. Accuracy: DISCA (``run_em``, as ``bench_table_s1.py`` runs it) on the same simulated Table S1
   cells, once per precision with the same seed and options (defaults: the CPU-sized protocol of
   the README's table). K, homogeneity and accuracy per precision, and every iteration's.
   One seed: the loop's path depends on every rounding (a changed rounding of the rotation moved
   the ±60°/0.01 cell by 5 points in session 9), so a difference within that is not a precision
   effect.

  python benchmarks/bench_precision.py [--cells 60:0.1,60:0.03] [--n-per-class 200]
      [--width-scale 0.1] [--max-iter 10] [--parts speed accuracy] [--tag T]

Prints the figures and writes benchmarks/results/bench_precision[_T].json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from bench_table_s1 import parse_k, run_disca  # noqa: E402
from common import add_cluster_arguments, save_result, timed  # noqa: E402
from table_s1_cell import PAPER, parse_cells, simulate_cell  # noqa: E402

from disca_tools.evaluate import clustering_metrics  # noqa: E402
from disca_tools.model.backend import import_tensorflow  # noqa: E402

PRECISIONS = ("float32", "mixed_bfloat16")


def speed(n_train: int, n_predict: int, repeats: int) -> dict:
    """Training and prediction throughput of the full YOPO in each precision."""
    import keras

    from disca_tools.cluster.config import EMConfig
    from disca_tools.model import yopo as Y

    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(n_train, n_predict), 24, 24, 24, 1), dtype=np.float32)
    y = np.eye(5, dtype=np.float32)[rng.integers(0, 5, len(x))]
    models = {}
    for p in PRECISIONS:
        cfg = EMConfig(precision=p)  # the defaults: width 1.0, 1,024 features
        model = Y.build_yopo(cfg.yopo(24, 5), seed=0)
        model.compile(
            optimizer=keras.optimizers.Nadam(cfg.lr), loss=keras.losses.CategoricalHinge()
        )
        model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)  # build and trace
        model.predict(x[:64], batch_size=64, verbose=0)
        models[p] = model
    runs: dict[str, dict[str, list[float]]] = {p: {"train": [], "predict": []} for p in PRECISIONS}
    for _ in range(repeats):
        for p, model in models.items():
            fit = timed(model.fit, x[:n_train], y[:n_train], batch_size=32, epochs=1, verbose=0)
            runs[p]["train"].append(fit[0])
            runs[p]["predict"].append(
                timed(model.predict, x[:n_predict], batch_size=64, verbose=0)[0]
            )
    out: dict = {"train_volumes": n_train, "predict_volumes": n_predict, "runs_s": runs}
    for p in PRECISIONS:
        out[p] = {
            "train_per_s": n_train / float(np.median(runs[p]["train"])),
            "predict_per_s": n_predict / float(np.median(runs[p]["predict"])),
        }
    f32, bf16 = out["float32"], out["mixed_bfloat16"]
    out["train_speedup"] = bf16["train_per_s"] / f32["train_per_s"]
    out["predict_speedup"] = bf16["predict_per_s"] / f32["predict_per_s"]
    print(
        f"full YOPO, training: float32 {f32['train_per_s']:.1f}/s, mixed bfloat16 "
        f"{bf16['train_per_s']:.1f}/s (×{out['train_speedup']:.2f}); prediction: "
        f"{f32['predict_per_s']:.1f}/s against {bf16['predict_per_s']:.1f}/s "
        f"(×{out['predict_speedup']:.2f})",
        flush=True,
    )
    return out


def accuracy(args: argparse.Namespace) -> list[dict]:
    """DISCA on each cell in each precision, the same data, seed and options."""
    rows = []
    for tilt, snr in parse_cells(args.cells):
        sim = simulate_cell(args, tilt=tilt, snr=snr)
        for p in PRECISIONS:
            t0 = time.time()
            labels, extra, _ = run_disca(sim.volumes, sim.labels, argparse.Namespace(**{**vars(args), "precision": p}), args.seed)  # fmt: skip
            m = clustering_metrics(sim.labels, labels)
            row = {
                "tilt": tilt,
                "snr": snr,
                "precision": p,
                "k": m["k_found"],
                "homogeneity": round(m["homogeneity"], 4),
                "accuracy": round(100 * m["accuracy"], 2),
                "accuracy_defined": m["accuracy_defined"],
                "seconds": round(time.time() - t0, 1),
                "paper_disca": PAPER.get((tilt, snr)),
                **extra,
            }
            rows.append(row)
            print(
                f"±{tilt}° SNR {snr:<5} {p:<15} K={row['k']} h={row['homogeneity']:.4f} "
                f"acc={row['accuracy']:.2f}%{'' if row['accuracy_defined'] else '*'} "
                f"({row['seconds']:.0f} s; accuracy by iteration {extra['accuracy_by_iteration']})",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--parts", nargs="+", choices=["speed", "accuracy"], default=["speed", "accuracy"]
    )
    ap.add_argument("--train", type=int, default=64, help="volumes per timed training epoch")
    ap.add_argument("--predict", type=int, default=128, help="volumes per timed prediction")
    ap.add_argument("--repeats", type=int, default=3)
    # the accuracy cells: the CPU-sized Table S1 protocol of the README
    ap.add_argument("--cells", default="60:0.1,60:0.03")
    ap.add_argument("--n-per-class", type=int, default=200)
    ap.add_argument("--angpix", type=float, default=14.0)
    ap.add_argument("--snr-convention", default="aitom", choices=["volume", "aitom", "aitom-set"])
    ap.add_argument("--width-scale", type=float, default=0.1)
    ap.add_argument("--max-iter", type=int, default=10)
    ap.add_argument("--k-candidates", type=parse_k, default=list(range(2, 21)))
    ap.add_argument("--pca-dim", type=int, default=8)
    ap.add_argument("--init", default="invariants", choices=["network", "invariants", "voxels"])
    ap.add_argument("--train-clusters", type=int, default=15)
    add_cluster_arguments(ap, ["input_dropout"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import_tensorflow()  # TensorFlow's start-up lines kept out of the log
    from disca_tools.model.yopo import resolve_precision

    payload: dict = {"protocol": vars(args) | {"auto_resolves_to": resolve_precision("auto")}}
    if "speed" in args.parts:
        payload["speed"] = speed(args.train, args.predict, args.repeats)
        save_result("bench_precision", args.tag, payload)
    if "accuracy" in args.parts:
        payload["accuracy"] = accuracy(args)
    print(f"saved {save_result('bench_precision', args.tag, payload)}")


if __name__ == "__main__":
    main()
