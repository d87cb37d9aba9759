"""Benchmark disca_reembed: time and peak memory to re-embed N particles into a large tomogram.

    .venv/bin/python benchmarks/bench_reembed.py [--shape 1000 1000 250] [--n 200 1000] [--angpix 10]

For each N, particles of three shipped structures (1bxn, 3j9i, 4v4r at ``--angpix``; map boxes 41–86
voxels) with uniform random orientations and random positions are placed into a tomogram of
``--shape`` (x y z) voxels, each run in a fresh subprocess so its peak resident memory is its own
(``VmHWM``, see ``common.peak_rss_mb``):

* ``streamed``: :func:`disca_tools.reembed.write_reembedded` — slab by slab into on-disk memmaps
  (float32 density + int16 labels written to a temporary folder), as the tool does;
* ``in_memory``: :func:`disca_tools.reembed.reembed_arrays` — the same result assembled in RAM
  (the naive way), for the side-by-side ratio.

Prints a table (seconds, particles/s, peak RSS, RSS / output size) and saves
``benchmarks/results/bench_reembed.json``.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import peak_rss_mb, save_result  # noqa: E402

STRUCTURES = ["1bxn", "3j9i", "4v4r"]


def _worker(mode: str, n: int, shape_xyz: list[int], angpix: float, out_dir: str) -> dict:
    import numpy as np

    from disca_tools.geometry import random_rotations
    from disca_tools.reembed import Placements, prepare_class_map, reembed_arrays, write_reembedded
    from disca_tools.simulate.structures import load_structure

    rng = np.random.default_rng(0)
    maps = {
        k: prepare_class_map(load_structure(s, angpix), angpix, angpix, k)
        for k, s in enumerate(STRUCTURES, 1)
    }
    centres = rng.uniform(0, 1, (n, 3)) * (np.array(shape_xyz) - 1)
    pl = Placements(centres, rng.integers(1, len(STRUCTURES) + 1, n), random_rotations(n, rng))
    shape_zyx = (shape_xyz[2], shape_xyz[1], shape_xyz[0])
    base = peak_rss_mb()
    t0 = time.perf_counter()
    if mode == "streamed":
        write_reembedded(
            Path(out_dir) / "t_reembedded.mrc",
            Path(out_dir) / "t_labels.mrc",
            pl,
            maps,
            shape_zyx,
            angpix,
        )
    else:
        dens, labels = reembed_arrays(pl, maps, shape_zyx, slab=64)
        float(dens[::97, ::97, ::97].sum()) + float(labels[::97, ::97, ::97].sum())
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {
        "mode": mode,
        "n": n,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "rss_before_mb": base,
        "map_boxes": [m.volume_zyx.shape[0] for m in maps.values()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shape", type=int, nargs=3, default=[1000, 1000, 250], help="tomogram x y z voxels"
    )
    ap.add_argument("--n", type=int, nargs="+", default=[200, 1000], help="particle counts")
    ap.add_argument("--angpix", type=float, default=10.0)
    ap.add_argument("--modes", nargs="+", default=["streamed", "in_memory"])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        mode, n = args.worker[0], int(args.worker[1])
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            print(json.dumps(_worker(mode, n, args.shape, args.angpix, tmp)))
        return

    out_bytes = args.shape[0] * args.shape[1] * args.shape[2] * (4 + 2)
    rows = []
    for n in args.n:
        for mode in args.modes:
            cmd = [
                sys.executable,
                __file__,
                "--shape",
                *map(str, args.shape),
                "--angpix",
                str(args.angpix),
                "--worker",
                mode,
                str(n),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["output_mb"] = out_bytes / 2**20
            row["rss_over_output"] = row["peak_rss_mb"] / row["output_mb"]
            row["particles_per_s"] = n / row["seconds"]
            rows.append(row)
            print(f"  done: {mode} N={n} in {row['seconds']:.1f} s", file=sys.stderr)
    print(
        f"Re-embedding into {args.shape[0]}×{args.shape[1]}×{args.shape[2]} voxels at {args.angpix} Å "
        f"(outputs: float32 density + int16 labels = {out_bytes / 2**20:.0f} MB); maps {rows[0]['map_boxes']} voxels"
    )
    print(
        f"{'mode':<10} {'N':>6} {'seconds':>9} {'ptcl/s':>8} {'peak RSS MB':>12} {'RSS/output':>11}"
    )
    for r in rows:
        print(
            f"{r['mode']:<10} {r['n']:>6} {r['seconds']:>9.1f} {r['particles_per_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['rss_over_output']:>11.2f}"
        )
    ratios = {}
    for n in args.n:
        s = next((r for r in rows if r["n"] == n and r["mode"] == "streamed"), None)
        m = next((r for r in rows if r["n"] == n and r["mode"] == "in_memory"), None)
        if s and m:
            ratios[str(n)] = {
                "time_streamed_over_in_memory": s["seconds"] / m["seconds"],
                "rss_streamed_over_in_memory": s["peak_rss_mb"] / m["peak_rss_mb"],
            }
            print(
                f"N={n}: streamed/in-memory time ×{ratios[str(n)]['time_streamed_over_in_memory']:.2f}, "
                f"peak memory ×{ratios[str(n)]['rss_streamed_over_in_memory']:.2f}"
            )
    result = {
        "benchmark": "bench_reembed",
        "shape_xyz": args.shape,
        "angpix": args.angpix,
        "structures": STRUCTURES,
        "rows": rows,
        "ratios": ratios,
    }
    print(f"saved {save_result('bench_reembed', '', result)}")


if __name__ == "__main__":
    main()
