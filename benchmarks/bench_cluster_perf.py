"""disca_cluster performance, side by side in one run.

For each N (default 1k, 2k, 4k, 8k subtomograms of 5 real structures, 24³, SNR 0.1), in a fresh
Python process each (so that peak memory is per N):

* one EM iteration (features + PCA + mixtures for every candidate K + training on N + N rotated
  copies, streamed from a memmapped store) — the median of the trained iterations after the first
  (the first also traces the graphs and warms up the head); ``--iters 4`` gives three of them;
* the bare Keras baseline on the same network and data: ``model.fit`` on the same 2N samples held
  in memory (rotations precomputed) for the same epochs and batch size — the median of
  ``--fit-repeats`` timings, the same statistic as the EM side — plus ``model.predict`` of the N
  originals (both after a warm-up call);
* prediction throughput: streamed ``predict_features`` against bare ``model.predict`` of an
  in-memory array (each timed ``--predict-repeats`` times, alternated; the median of each, the
  statistic of the other timings: one lucky timing is not the figure);
* peak resident memory of the process during the EM run (before the baseline loads data).

Goals (issue 4): iteration / (bare fit + predict) ≤ 1.25; t(8k)/t(1k) ≤ 9; streamed prediction ≥
0.9 of bare. The network width is reduced for a CPU (``--width-scale``); state it with the numbers.

  python benchmarks/bench_cluster_perf.py [--sizes 1000 2000 4000 8000] [--width-scale 0.25]
      [--feature-dim 256] [--precision auto] [--k-candidates 2-20]

Prints a table and writes benchmarks/results/bench_cluster_perf.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    peak_rss_mb,
    proc_status_mb,
    save_figure,
    save_result,
    timed,
)

from disca_tools.model.backend import import_tensorflow  # noqa: E402

STRUCTURES = ["4v4r", "1bxn", "3j9i", "1s3x", "3d2f"]


class _AnonSampler:
    """Peak anonymous (heap) RSS, sampled every 0.2 s: excludes the memmapped store's file pages,
    which count in the total RSS but are page cache the kernel can drop."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float:
        return proc_status_mb("RssAnon") or 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def make_store(folder: Path, n: int, seed: int = 0) -> None:
    """Simulate n subtomograms (5 structures, SNR 0.1, ±60°) into folder/subtomograms.npy in chunks."""
    from disca_tools.simulate.imaging import Imaging
    from disca_tools.simulate.subtomograms import simulate_subtomogram_set

    arr = np.lib.format.open_memmap(
        folder / "subtomograms.npy", mode="w+", dtype=np.float32, shape=(n, 24, 24, 24)
    )
    chunk = 500
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        per = -(-m // len(STRUCTURES))
        sim = simulate_subtomogram_set(STRUCTURES, per, 24, 10.0, 0.1, Imaging(), seed=seed + i)
        arr[start : start + m] = sim.volumes[:m]
    arr.flush()
    (folder / "subtomograms_names.txt").write_text("".join(f"p{i}\n" for i in range(n)))


def one(args) -> dict:
    """Measure one N in this process."""
    import keras
    import tensorflow as tf

    from disca_tools.cluster.em import EMConfig, run_em
    from disca_tools.model import yopo as Y
    from disca_tools.model.data import gather, open_store, predict_features, rotate_volumes

    tf.get_logger().setLevel("ERROR")
    store = open_store(args.store)
    n = args.one
    rows = np.arange(n)
    precision = Y.resolve_precision(args.precision)
    from disca_tools.cli.cluster import parse_k_candidates
    from disca_tools.runtime.cli import resolve_jobs

    cfg = EMConfig(
        k_candidates=parse_k_candidates(args.k_candidates), pca_dim=16, max_iter=args.iters,
        epochs_per_iter=args.epochs, batch_size=args.batch_size, width_scale=args.width_scale,
        feature_dim=args.feature_dim, precision=precision, seed=0, mixture_jobs=resolve_jobs(args.j),
    )  # fmt: skip
    rss0 = peak_rss_mb()
    t = time.time()
    with _AnonSampler() as anon:
        res = run_em(store, rows, cfg)
    em_total = time.time() - t
    rss_em = peak_rss_mb()
    trained = [h for h in res.history if np.isfinite(h.loss)]
    later = trained[1:] or trained
    it_s = float(np.median([h.seconds for h in later]))
    parts = {
        "features": float(np.median([h.seconds_features for h in later])),
        "mixtures": float(np.median([h.seconds_mixture for h in later])),
        "training": float(np.median([h.seconds_train for h in later])),
    }

    # bare Keras on the same network and the same 2N samples, in memory
    kmax = max(cfg.k_candidates)
    model = Y.build_yopo(cfg.yopo(24, kmax), seed=1)
    model.compile(optimizer=keras.optimizers.Nadam(cfg.lr), loss=keras.losses.CategoricalHinge())
    x = gather(store, rows)
    rng = np.random.default_rng(0)
    from disca_tools.geometry import random_rotations

    rot = np.concatenate([
        rotate_volumes(x[s : s + 256], random_rotations(len(x[s : s + 256]), rng).astype(np.float32),
                       rng.standard_normal(x[s : s + 256].shape).astype(np.float32)).numpy()
        for s in range(0, n, 256)
    ])  # fmt: skip
    xx = np.concatenate([x, rot])[..., None]
    del rot
    y = np.eye(kmax, dtype=np.float32)[rng.integers(0, 3, 2 * n)]
    model.fit(
        xx[: 2 * cfg.batch_size],
        y[: 2 * cfg.batch_size],
        batch_size=cfg.batch_size,
        epochs=1,
        verbose=0,
    )
    # the same statistic as the EM side: the median of several timings (a shared CPU is noisy)
    fit_runs = [
        timed(model.fit, xx, y, batch_size=cfg.batch_size, epochs=cfg.epochs_per_iter, verbose=0)[0]
        for _ in range(args.fit_repeats)
    ]
    bare_fit = float(np.median(fit_runs))
    ext = Y.feature_extractor(model)
    ext.predict(xx[:64, ...], batch_size=cfg.predict_batch_size, verbose=0)
    predict_features(ext, store, rows[:64], cfg.predict_batch_size)
    bare_runs, stream_runs = [], []
    for _ in range(args.predict_repeats):  # alternated, medians: a shared CPU is noisy
        bare_runs.append(
            timed(ext.predict, xx[:n], batch_size=cfg.predict_batch_size, verbose=0)[0]
        )
        stream_runs.append(timed(predict_features, ext, store, rows, cfg.predict_batch_size)[0])
    bare_pred, stream_pred = float(np.median(bare_runs)), float(np.median(stream_runs))
    return {
        "n": n,
        "precision": precision,
        "iteration_s": it_s,
        "iteration_parts_s": parts,
        "em_total_s": em_total,
        "iterations": len(res.history),
        "k_found": res.k,
        "bare_fit_s": bare_fit,
        "bare_fit_runs_s": fit_runs,
        "iteration_runs_s": [h.seconds for h in later],
        "bare_predict_s": bare_pred,
        "ratio_iteration_over_bare": it_s / (bare_fit + bare_pred),
        "predict_throughput_stream": n / stream_pred,
        "predict_throughput_bare": n / bare_pred,
        "predict_ratio": bare_pred / stream_pred,
        "predict_runs_s": {"bare": bare_runs, "stream": stream_runs},
        "peak_rss_mb_before_em": rss0,
        "peak_rss_mb_em": rss_em,
        "peak_anon_rss_mb_em": anon.peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    ap.add_argument("--width-scale", type=float, default=0.25)
    ap.add_argument("--feature-dim", type=int, default=256)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--k-candidates", default="2-20")
    ap.add_argument("--iters", type=int, default=3, help="EM max_iter (iterations 0..iters)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--j", type=int, default=0, help="mixture processes, as disca_cluster --j (0: one per core)"
    )
    ap.add_argument(
        "--fit-repeats", type=int, default=3, help="bare fit timings (their median is used)"
    )
    ap.add_argument(
        "--predict-repeats", type=int, default=5, help="prediction timings (median, alternated)"
    )
    ap.add_argument("--store", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "bench_cluster_perf"))
    args = ap.parse_args()
    import_tensorflow()  # TensorFlow's start-up lines kept out of the log
    if args.one is not None:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        store = Path(args.store or tmp)
        if not (store / "subtomograms.npy").exists():
            t = time.time()
            make_store(store, max(args.sizes))
            print(
                f"simulated {max(args.sizes)} subtomograms in {time.time() - t:.0f} s", flush=True
            )
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--one", str(n), "--store", str(store),
                   "--width-scale", str(args.width_scale), "--feature-dim", str(args.feature_dim),
                   "--precision", args.precision, "--k-candidates", args.k_candidates,
                   "--iters", str(args.iters), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--j", str(args.j),
                   "--predict-repeats", str(args.predict_repeats), "--fit-repeats", str(args.fit_repeats)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"N={n}: measurement failed")
            r = json.loads(line[0][7:])
            rows.append(r)
            print(
                f"N={n}: iteration {r['iteration_s']:.1f} s, ratio {r['ratio_iteration_over_bare']:.2f}",
                flush=True,
            )

    t1 = rows[0]["iteration_s"]
    hdr = f"{'N':>6} {'iter s':>8} {'feat':>6} {'mix':>6} {'train':>6} {'bare fit+pred':>13} {'ratio':>6} {'t/t(N0)':>8} {'pred/s':>8} {'bare/s':>8} {'pred ratio':>10} {'peak MB':>8} {'anon MB':>8}"
    print(f"\nwidth_scale {args.width_scale}, feature_dim {args.feature_dim}, precision {rows[0]['precision']}, "
          f"K candidates {args.k_candidates}, epochs/iter {args.epochs}, batch {args.batch_size}, mixture jobs {args.j or 'all cores'}, {os.cpu_count()} CPU cores")  # fmt: skip
    print(hdr)
    for r in rows:
        p = r["iteration_parts_s"]
        print(f"{r['n']:>6} {r['iteration_s']:>8.1f} {p['features']:>6.1f} {p['mixtures']:>6.1f} {p['training']:>6.1f} "
              f"{r['bare_fit_s'] + r['bare_predict_s']:>13.1f} {r['ratio_iteration_over_bare']:>6.2f} "
              f"{r['iteration_s'] / t1:>8.2f} {r['predict_throughput_stream']:>8.1f} {r['predict_throughput_bare']:>8.1f} "
              f"{r['predict_ratio']:>10.2f} {r['peak_rss_mb_em']:>8.0f} {r['peak_anon_rss_mb_em']:>8.0f}")  # fmt: skip
    summary = {
        "protocol": {k: v for k, v in vars(args).items() if k not in ("one", "store", "out")},
        "rows": rows,
        "linearity_t_last_over_t_first": rows[-1]["iteration_s"] / t1,
        "size_ratio_last_over_first": rows[-1]["n"] / rows[0]["n"],
    }
    out = Path(args.out).with_suffix("")
    saved = save_result(out.name, "", summary, folder=out.parent)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ns = [r["n"] for r in rows]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        ax[0].plot(ns, [r["iteration_s"] for r in rows], "-o", label="EM iteration")
        ax[0].plot(
            ns,
            [r["bare_fit_s"] + r["bare_predict_s"] for r in rows],
            "-s",
            label="bare fit + predict",
        )
        ax[0].set_xlabel("N")
        ax[0].set_ylabel("seconds")
        ax[0].legend()
        ax[1].plot(ns, [r["peak_rss_mb_em"] for r in rows], "-o")
        ax[1].set_xlabel("N")
        ax[1].set_ylabel("peak RSS during EM (MB)")
        fig.tight_layout()
        save_figure(fig, out.with_suffix(".png"))
    except Exception as exc:  # plotting is a convenience
        print(f"(no plot: {exc})")
    print(f"saved {saved}")


if __name__ == "__main__":
    main()
