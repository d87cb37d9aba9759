"""Parts of a DISCA EM iteration, each against its alternative, side by side in one run.

1. Mixtures: ``select_mixture`` for K = 2…20 (full covariances, the current K inherited as in an
   iteration after the first) on N points in 16 dimensions (5 Gaussian clusters), serial
   (``--j 1``) and in worker processes (``--j`` of ``disca_cluster``; default one per core).
   Timings alternate serial/parallel, ``--repeats`` each, after one parallel call that starts the
   workers (its time is reported apart: a run pays it once). Checks that both give the same BIC,
   labels and posteriors, bit for bit.
2. Rotation augmentation: ``rotate_volumes`` as a plain TensorFlow graph and as the XLA-compiled
   function that training uses (``compiled_rotation``), on ``--volumes`` 24³ volumes in batches of
   32, alternated, ``--repeats`` each; the largest difference between the two outputs.
3. The classes STAR that ``disca_cluster`` writes after every iteration
   (``iterations/run_itNNN_clusters.star``, by ``write_clusters``): a shipped RELION 3.1 refine
   table repeated to ``--star-rows`` particles, written ``--repeats`` times; seconds and size.
4. A merged STAR read from its extractions' stores in place (``find_stores``, ``StackedVolumes``):
   ``--store-particles`` 24³ float16 subtomograms in ``--stores`` per-tomogram stores against the
   same rows in one store. The training gather (shuffled batches of 32, ``gather``) is timed over
   one epoch for each, alternated, ``--repeats`` each, after a warm-up epoch (page cache); and the
   time and memory to locate ``--locate-names`` particles in stores of that many rows (sparse files:
   only the names are read).
5. The iteration-0 descriptors of ``--init invariants`` (``invariant_features``) of
   ``--invariant-sizes`` random 24³ volumes: particles/s and the peak memory traced while they are
   computed, against the size of the result (the per-particle features the loop keeps); and the
   real-space shell descriptors up to degree 10 (the default) against up to 6 (session 13's), on
   the same ``--volumes`` volumes, alternated, ``--repeats`` each.

  python benchmarks/bench_em_parts.py [--sizes 2000 8000 32000] [--volumes 2000] [--repeats 3]
      [--star-rows 100000 1000000] [--stores 50] [--store-particles 20000]
      [--locate-names 1000000] [--invariant-sizes 10000 40000]
      [--parts mixtures rotation star stores invariants]

Prints a table and writes benchmarks/results/bench_em_parts.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from common import save_result, timed  # noqa: E402

from disca_tools.cluster.mixture import select_mixture  # noqa: E402
from disca_tools.model.backend import import_tensorflow  # noqa: E402
from disca_tools.runtime.cli import resolve_jobs  # noqa: E402

K_CANDIDATES = list(range(2, 21))
PARTS = ("mixtures", "rotation", "star", "stores", "invariants")


def _clusters(n: int, dim: int = 16, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points of k overlapping Gaussian clusters and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.5, (k, dim))
    labels = rng.integers(0, k, n)
    return centres[labels] + rng.normal(size=(n, dim)), labels


def mixtures(sizes: list[int], jobs: int, repeats: int) -> list[dict]:
    """Serial against parallel candidate fits at each N."""
    rows = []
    for n in sizes:
        x, labels = _clusters(n)
        kw = dict(seed=1, prev_labels=labels, prev_k=5)
        start_s, _ = timed(select_mixture, x, K_CANDIDATES, n_jobs=jobs, **kw)
        serial, parallel = [], []
        for _ in range(repeats):
            t, a = timed(select_mixture, x, K_CANDIDATES, n_jobs=1, **kw)
            serial.append(t)
            t, b = timed(select_mixture, x, K_CANDIDATES, n_jobs=jobs, **kw)
            parallel.append(t)
        same = (
            a.bic_by_k == b.bic_by_k
            and np.array_equal(a.labels, b.labels)
            and np.array_equal(a.posteriors, b.posteriors)
        )
        row = {
            "n": n,
            "jobs": jobs,
            "k_found": a.k,
            "serial_s": float(np.median(serial)),
            "parallel_s": float(np.median(parallel)),
            "serial_runs_s": serial,
            "parallel_runs_s": parallel,
            "first_parallel_call_s": start_s,
            "identical": bool(same),
        }
        row["speedup"] = row["serial_s"] / row["parallel_s"]
        rows.append(row)
        print(
            f"mixtures N={n}: serial {row['serial_s']:.2f} s, {jobs} processes "
            f"{row['parallel_s']:.2f} s (×{row['speedup']:.2f}), identical {same}",
            flush=True,
        )
    return rows


def rotation(n_volumes: int, repeats: int, batch: int = 32) -> dict:
    """The rotation as a plain graph against the XLA-compiled one."""
    import tensorflow as tf

    from disca_tools.geometry import random_rotations
    from disca_tools.model.data import compiled_rotation, rotate_volumes

    rng = np.random.default_rng(0)
    vols = rng.normal(size=(batch, 24, 24, 24)).astype(np.float32)
    noise = rng.normal(size=vols.shape).astype(np.float32)
    n_batches = -(-n_volumes // batch)
    mats = [random_rotations(batch, rng).astype(np.float32) for _ in range(n_batches)]
    variants = {"graph": tf.function(rotate_volumes), "xla": compiled_rotation()}
    for fn in variants.values():  # trace / compile
        fn(vols, mats[0], noise)

    def rotate_all(fn) -> None:
        for m in mats:
            fn(vols, m, noise)

    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            runs[name].append(timed(rotate_all, fn)[0])
    diff = max(
        float(np.abs(variants["graph"](vols, m, noise) - variants["xla"](vols, m, noise)).max())
        for m in mats[:4]
    )
    out = {
        "volumes": n_batches * batch,
        "graph_s": float(np.median(runs["graph"])),
        "xla_s": float(np.median(runs["xla"])),
        "runs_s": runs,
        "max_abs_difference": diff,
    }
    out["speedup"] = out["graph_s"] / out["xla_s"]
    print(
        f"rotation of {out['volumes']} volumes: graph {out['graph_s']:.2f} s, XLA {out['xla_s']:.2f} s "
        f"(×{out['speedup']:.2f}), largest difference {diff:.2g}",
        flush=True,
    )
    return out


def star_writing(sizes: list[int], repeats: int) -> list[dict]:
    """Time writing a classes STAR of each size, as disca_cluster does after every iteration."""
    import tempfile

    import pandas as pd

    from disca_tools.cli.cluster import write_clusters
    from disca_tools.io.star import read_particles

    source = ROOT / "tests/data/star/relion3/refine_relion31_optics.star"
    base = read_particles(source)
    rows = []
    for n in sizes:
        reps = -(-n // len(base.particles))
        table = base.with_particles(
            pd.concat([base.particles] * reps, ignore_index=True).iloc[:n].reset_index(drop=True)
        )
        rng = np.random.default_rng(0)
        post = rng.dirichlet(np.ones(5), size=n)
        labels = np.argmax(post, axis=1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "iterations" / "run_it001_clusters.star"
            runs = [timed(write_clusters, table, labels, post, path)[0] for _ in range(repeats)]
            size_mb = path.stat().st_size / 1e6
        row = {"rows": n, "columns": len(table.particles.columns) + 2, "seconds": float(np.median(runs)),
               "runs_s": runs, "size_mb": round(size_mb, 1)}  # fmt: skip
        rows.append(row)
        print(
            f"classes STAR of {n} rows ({row['columns']} columns): {row['seconds']:.2f} s, "
            f"{size_mb:.0f} MB",
            flush=True,
        )
    return rows


def _write_stores(root: Path, n_stores: int, per_store: int, fill: bool) -> list[str]:
    """``n_stores`` extraction folders ``Extract/TS_NNN`` of ``per_store`` 24³ float16 subtomograms
    (random when ``fill``, else sparse files of zeros); the image names of all rows."""
    from disca_tools.io.store import NAMES_FILE, STORE_FILE

    rng = np.random.default_rng(0)
    names = []
    for t in range(n_stores):
        folder = root / "Extract" / f"TS_{t + 1:03d}"
        folder.mkdir(parents=True)
        arr = np.lib.format.open_memmap(
            folder / STORE_FILE, mode="w+", dtype=np.float16, shape=(per_store, 24, 24, 24)
        )
        if fill:
            arr[:] = rng.normal(size=arr.shape).astype(np.float16)
        arr.flush()
        del arr
        own = [f"Extract/TS_{t + 1:03d}/Subtomograms/TS_{t + 1:03d}/p_{i + 1:06d}.mrc"
               for i in range(per_store)]  # fmt: skip
        (folder / NAMES_FILE).write_text("".join(f"{n}\n" for n in own))
        names += own
    return names


def stores(n_stores: int, n_particles: int, locate_names: int, repeats: int) -> dict:
    """Gather from per-extraction stores against one store; locating a merged STAR's particles."""
    import tempfile

    from common import proc_status_mb

    from disca_tools.io.store import STORE_FILE, SubtomogramStore, find_stores
    from disca_tools.model.data import gather

    per_store = n_particles // n_stores
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = _write_stores(root, n_stores, per_store, fill=True)
        merged = find_stores(names, folders=(), bases=(root,))
        whole = np.lib.format.open_memmap(
            root / STORE_FILE, mode="w+", dtype=np.float16, shape=merged.store.volumes.shape
        )
        for start in range(0, len(whole), 4096):  # the same rows in one file
            whole[start : start + 4096] = merged.store.volumes[
                np.arange(start, min(start + 4096, len(whole)))
            ]
        variants = {
            "one store": SubtomogramStore(whole, names, root / STORE_FILE),
            f"{n_stores} stores": merged.store,
        }
        rows = merged.rows
        order = np.random.default_rng(1).permutation(len(names))
        batches = [order[i : i + 32] for i in range(0, len(order), 32)]
        assert all(
            np.array_equal(gather(variants["one store"], rows[b]),
                           gather(next(reversed(variants.values())), rows[b]))
            for b in batches[:8]
        )  # fmt: skip

        def epoch(store) -> None:
            for b in batches:
                gather(store, rows[b])

        runs: dict[str, list[float]] = {name: [] for name in variants}
        for store in variants.values():
            epoch(store)  # warm-up: both read from the page cache after this
        for _ in range(repeats):
            for name, store in variants.items():
                runs[name].append(timed(epoch, store)[0])
        del whole, variants, merged
        gather_rows = {
            name: {"epoch_s": float(np.median(r)), "per_s": len(names) / float(np.median(r)), "runs_s": r}
            for name, r in runs.items()
        }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        big = _write_stores(root, n_stores, locate_names // n_stores, fill=False)
        star_order = list(np.random.default_rng(2).permutation(big))  # as a merged STAR lists them
        del big
        before = proc_status_mb("RssAnon") or 0.0
        locate_s, found = timed(find_stores, star_order, (root / "Extract",), (root,))
        grown = (proc_status_mb("RssAnon") or 0.0) - before
        assert found is not None and len(found.store.paths) == n_stores
        del found
    out = {"stores": n_stores, "particles": per_store * n_stores, "gather": gather_rows,
           "locate": {"names": len(star_order), "seconds": locate_s, "rss_growth_mb": grown}}  # fmt: skip
    one, many = gather_rows.values()
    out["gather_ratio"] = many["epoch_s"] / one["epoch_s"]
    print(
        f"gather of {out['particles']} subtomograms in batches of 32: one store {one['per_s']:.0f}/s, "
        f"{n_stores} stores {many['per_s']:.0f}/s (time ×{out['gather_ratio']:.2f}); locating "
        f"{len(star_order)} names in {n_stores} stores: {locate_s:.1f} s, +{grown:.0f} MiB",
        flush=True,
    )
    return out


def invariants(sizes: list[int], n_volumes: int, repeats: int) -> dict:
    """Throughput and traced peak memory of ``invariant_features``; shell degrees 10 against 6."""
    import tracemalloc
    import types

    from disca_tools.cluster.invariants import invariant_features, rotation_invariant_descriptors

    rng = np.random.default_rng(0)
    features = []
    for n in sizes:
        store = types.SimpleNamespace(volumes=rng.normal(size=(n, 24, 24, 24)).astype(np.float16))
        tracemalloc.start()
        seconds, x = timed(invariant_features, store, np.arange(n))
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        row = {"n": n, "per_s": n / seconds, "columns": x.shape[1], "dtype": str(x.dtype),
               "result_mib": x.nbytes / 2**20, "peak_mib": peak}  # fmt: skip
        features.append(row)
        print(
            f"invariant_features of {n} volumes: {row['per_s']:.0f}/s, {row['columns']} {row['dtype']} "
            f"columns, result {row['result_mib']:.0f} MiB, traced peak {peak:.0f} MiB "
            f"(×{peak / row['result_mib']:.2f})",
            flush=True,
        )
        del store, x
    vols = rng.normal(size=(n_volumes, 24, 24, 24)).astype(np.float32)
    runs: dict[int, list[float]] = {10: [], 6: []}
    for _ in range(repeats):
        for degree, r in runs.items():
            r.append(timed(rotation_invariant_descriptors, vols, degree)[0])
    degrees = {d: {"per_s": n_volumes / float(np.median(r)), "runs_s": r} for d, r in runs.items()}
    ratio = float(np.median(runs[10]) / np.median(runs[6]))
    print(
        f"real-space shell descriptors of {n_volumes} volumes: degrees ≤ 10 "
        f"{degrees[10]['per_s']:.0f}/s, ≤ 6 {degrees[6]['per_s']:.0f}/s (time ×{ratio:.2f})",
        flush=True,
    )
    return {"features": features, "shell_degrees": degrees, "time_ratio_10_over_6": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    ap.add_argument("--j", type=int, default=0, help="mixture processes (0: one per core)")
    ap.add_argument("--volumes", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--star-rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--stores", type=int, default=50)
    ap.add_argument("--store-particles", type=int, default=20_000)
    ap.add_argument("--locate-names", type=int, default=1_000_000)
    ap.add_argument("--invariant-sizes", type=int, nargs="+", default=[10_000, 40_000])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    import_tensorflow()  # TensorFlow's start-up lines kept out of the log
    jobs = resolve_jobs(args.j)
    payload = {"protocol": vars(args) | {"jobs": jobs, "k_candidates": "2-20", "dim": 16}}
    if "mixtures" in args.parts:
        payload["mixtures"] = mixtures(args.sizes, jobs, args.repeats)
    if "rotation" in args.parts:
        payload["rotation"] = rotation(args.volumes, args.repeats)
    if "star" in args.parts:
        payload["star"] = star_writing(args.star_rows, args.repeats)
    if "stores" in args.parts:
        payload["stores"] = stores(
            args.stores, args.store_particles, args.locate_names, args.repeats
        )
    if "invariants" in args.parts:
        payload["invariants"] = invariants(args.invariant_sizes, args.volumes, args.repeats)
    print(f"saved {save_result('bench_em_parts', args.tag, payload)}")


if __name__ == "__main__":
    main()
