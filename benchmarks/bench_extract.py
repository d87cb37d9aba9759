"""Benchmark disca_extract: subtomograms per second (24³) from a memory-mapped tomogram.

    .venv/bin/python benchmarks/bench_extract.py [--n 5000] [--size 512 512 256] [--box 24]

Measured side by side in one run, on the same coordinates (goal ≥ 2,000 subtomograms/s):
  read+normalise   boxes cut from the memory map, inverted, normalised (no writing)
  + fast store     ... written into subtomograms.npy through open_memmap
  full tool        ``disca_extract`` in-process: STAR in, per-particle MRC files + fast store + CTF
                   weight + particles.star out (what a user runs); float32 and --float16

The tomogram file is written first and dropped from the page cache where possible
(``posix_fadvise DONTNEED``), so the first pass reads from disk like a fresh tomogram would.
Prints a table and saves ``benchmarks/results/bench_extract.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import drop_page_cache, save_result  # noqa: E402

from disca_tools.cli.extract import main as extract_main  # noqa: E402
from disca_tools.extract import ExtractParams, StoreWriter, box_starts, iter_boxes  # noqa: E402
from disca_tools.io.mrc import create_volume_memmap, open_volume  # noqa: E402
from disca_tools.io.star import write_star_blocks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--size", nargs=3, type=int, default=[512, 512, 256], metavar=("X", "Y", "Z"))
    ap.add_argument("--box", type=int, default=24)
    args = ap.parse_args()
    nx, ny, nz = args.size
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tomo = work / "tomo.mrc"
        mm = create_volume_memmap(tomo, (nz, ny, nx), 10.0)
        for z in range(nz):
            mm[z] = rng.standard_normal((ny, nx), dtype=np.float32)
        mm.flush()
        del mm
        half = args.box // 2 + 1
        xyz = np.stack([rng.integers(half, s - half, args.n) for s in (nx, ny, nz)], axis=1).astype(
            float
        )
        df = pd.DataFrame(
            {
                "rlnMicrographName": str(tomo),
                "rlnCoordinateX": xyz[:, 0],
                "rlnCoordinateY": xyz[:, 1],
                "rlnCoordinateZ": xyz[:, 2],
            }
        )
        write_star_blocks(work / "coords.star", {"particles": df})
        params = ExtractParams(box=args.box)
        starts, _ = box_starts(xyz, params)

        def timed(label: str, fn) -> None:
            drop_page_cache(tomo)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            rows.append({"step": label, "seconds": round(dt, 3), "per_s": round(args.n / dt, 1)})

        def read_only() -> None:
            data, _ = open_volume(tomo)
            for _ in iter_boxes(data, starts, params, rng):
                pass

        def with_store() -> None:
            data, _ = open_volume(tomo)
            store = StoreWriter(work / "s.npy", args.n, args.box, params.dtype)
            for i, sub in iter_boxes(data, starts, params, rng):
                store[i] = sub
            store.commit()

        cwd = os.getcwd()
        os.chdir(work)
        try:
            timed("read+normalise", read_only)
            timed("+ fast store", with_store)
            timed(
                "full tool (float32)",
                lambda: extract_main(
                    ["--i", "coords.star", "--o", "E32", "--box", str(args.box), "-q"]
                ),
            )
            timed(
                "full tool (--float16)",
                lambda: extract_main(
                    ["--i", "coords.star", "--o", "E16", "--box", str(args.box), "--float16", "-q"]
                ),
            )
            n_files = len(list((work / "E32" / "Subtomograms" / "tomo").glob("tomo_*.mrc")))
        finally:
            os.chdir(cwd)
        shutil.rmtree(work / "E32", ignore_errors=True)
        shutil.rmtree(work / "E16", ignore_errors=True)
    print(
        f"\nextraction of {args.n} boxes of {args.box}³ from a memory-mapped {nx}×{ny}×{nz} tomogram "
        f"({n_files} MRC files written per full run); goal ≥ 2000/s"
    )
    print(f"  {'step':<24} {'seconds':>8} {'subtomograms/s':>15}")
    for r in rows:
        print(f"  {r['step']:<24} {r['seconds']:>8.2f} {r['per_s']:>15.0f}")
    record = {
        "n": args.n,
        "box": args.box,
        "tomogram_xyz": [nx, ny, nz],
        "rows": rows,
        "goal_per_s": 2000,
    }
    print(f"saved {save_result('bench_extract', '', record)}")


if __name__ == "__main__":
    main()
