"""Rotation-averaged prediction (``disca_cluster --predict-rotations R``), side by side in one run.

On N subtomograms of 5 real structures (24³, SNR 0.1, memmapped ``.npy`` store) and one network
(``--width-scale``), each timed ``--repeats`` times, alternated (the median of each):

* ``one read``: :func:`disca_tools.model.data.predict_features` with ``rotations=R``, as the tool
  runs it: each batch read once from the store, its R − 1 rotated copies made in the ``tf.data``
  map, the features averaged in the model (:func:`disca_tools.model.yopo.copy_mean_model`);
* ``R passes``: the former way (to commit 3bea6f1), re-created here: R streamed passes over the
  store, the unrotated one and one per rotation, each reading every volume again, their features
  summed in NumPy;
* ``bare``: ``model.predict`` of the same R·N volumes already rotated, in memory: the network's
  work alone, the ceiling.

``--cold`` drops the store's pages from the page cache (``posix_fadvise DONTNEED``) before every
pass, as when the store is larger than memory (a real project): then every read is a disk read,
and ``R passes`` reads the store R times where ``one read`` reads it once. Without it the store
stays in the page cache (reads cost a copy) and the comparison is of the compute alone.

  python benchmarks/bench_predict_rotations.py [--n 1000] [--rotations 8] [--width-scale 0.1]
      [--repeats 3] [--cold] [--tag TAG]

Prints a table and writes benchmarks/results/bench_predict_rotations[_TAG].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from bench_cluster_perf import make_store  # noqa: E402
from common import drop_page_cache, save_result, timed  # noqa: E402

from disca_tools.model.backend import import_tensorflow  # noqa: E402


def r_passes(ext, store, rows, batch_size: int, rotations: int, seed: int, cold: Path | None):
    """The former rotation averaging: one streamed pass per copy, each reading the store."""
    import tensorflow as tf

    from disca_tools.model.data import compiled_rotation, inference_dataset, prediction_rotations

    mats, fills = prediction_rotations(rotations - 1, store.box, seed)
    out = None
    for r in range(rotations):
        if cold is not None:
            drop_page_cache(cold)
        ds = inference_dataset(store, rows, batch_size)
        if r:
            mat, fill = tf.constant(mats[r - 1]), tf.constant(fills[r - 1])

            def rotate(x, mat=mat, fill=fill):
                b = tf.shape(x)[0]
                noise = tf.broadcast_to(fill, tf.shape(x[..., 0]))
                return compiled_rotation()(x[..., 0], tf.tile(mat[None], [b, 1, 1]), noise)[
                    ..., None
                ]

            ds = ds.map(rotate)
        f = np.asarray(ext.predict(ds, verbose=0), dtype=np.float32)
        out = f if out is None else out + f
    return out / np.float32(rotations)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1000, help="subtomograms")
    ap.add_argument("--rotations", type=int, default=8, help="R, as --predict-rotations")
    ap.add_argument("--width-scale", type=float, default=0.1)
    ap.add_argument("--feature-dim", type=int, default=1024)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=64, help="volumes per network batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the store from the page cache")
    ap.add_argument("--store", default=None, help="folder with a store made by an earlier run")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import_tensorflow()  # TensorFlow's start-up lines kept out of the log

    import tensorflow as tf

    from disca_tools.model import yopo as Y
    from disca_tools.model.data import (
        compiled_rotation,
        gather,
        open_store,
        predict_features,
        prediction_rotations,
    )

    tf.get_logger().setLevel("ERROR")
    with tempfile.TemporaryDirectory(prefix="bench_rot_") as tmp:
        folder = Path(args.store or tmp)
        if not (folder / "subtomograms.npy").exists():
            make_store(folder, args.n)
        store = open_store(folder)
        npy = folder / "subtomograms.npy"
        cold = npy if args.cold else None
        rows = np.arange(args.n)
        precision = Y.resolve_precision(args.precision)
        cfg = Y.YopoConfig(24, 5, args.width_scale, args.feature_dim, precision)
        ext = Y.feature_extractor(Y.build_yopo(cfg, seed=0))
        r, bs, seed = args.rotations, args.batch_size, 0

        # the bare ceiling: the same R·N volumes, rotated beforehand, in memory
        x = gather(store, rows)
        mats, fills = prediction_rotations(r - 1, 24, seed)
        copies = [x] + [
            compiled_rotation()(
                x, np.repeat(m[None], len(x), 0), np.broadcast_to(f, x.shape)
            ).numpy()
            for m, f in zip(mats, fills, strict=True)
        ]
        xx = np.concatenate(copies)[..., None]
        del copies

        def one_read():
            if cold is not None:
                drop_page_cache(cold)
            return predict_features(ext, store, rows, bs, rotations=r, seed=seed)

        def passes():
            return r_passes(ext, store, rows, bs, r, seed, cold)

        def bare():
            return ext.predict(xx, batch_size=bs, verbose=0)

        # warm-up (traces and compiles each path once), and the agreement of the two ways
        a, b = one_read(), passes()
        bare()
        agree = float(np.max(np.abs(a - b)))
        runs: dict[str, list[float]] = {"one_read": [], "r_passes": [], "bare": []}
        for _ in range(args.repeats):  # alternated: a shared CPU is noisy
            runs["one_read"].append(timed(one_read)[0])
            runs["r_passes"].append(timed(passes)[0])
            runs["bare"].append(timed(bare)[0])
    med = {k: float(np.median(v)) for k, v in runs.items()}
    n = args.n
    print(
        f"N {n}, R {r}, width {args.width_scale}, features {args.feature_dim}, precision {precision}, "
        f"batch {bs} volumes, store {'dropped from the page cache before every pass' if args.cold else 'in the page cache'}, "
        f"{os.cpu_count()} CPU cores; medians of {args.repeats}, alternated"
    )
    print(f"{'way':<10} {'seconds':>8} {'particles/s':>12} {'store reads':>12} {'vs bare':>8}")
    reads = {"one_read": 1, "r_passes": r, "bare": 0}
    for k in runs:
        print(
            f"{k:<10} {med[k]:>8.1f} {n / med[k]:>12.1f} {reads[k]:>11}× {med['bare'] / med[k]:>8.2f}"
        )
    print(f"one read / R passes: {med['r_passes'] / med['one_read']:.2f}× faster; "
          f"largest feature difference between them {agree:.2e}")  # fmt: skip
    result = {
        "protocol": vars(args) | {"precision": precision},
        "runs_s": runs,
        "median_s": med,
        "particles_per_s": {k: n / v for k, v in med.items()},
        "store_reads": reads,
        "speedup_one_read_over_r_passes": med["r_passes"] / med["one_read"],
        "one_read_over_bare": med["bare"] / med["one_read"],
        "max_feature_difference": agree,
    }
    save_result("bench_predict_rotations", args.tag, result)


if __name__ == "__main__":
    main()
