"""Benchmark disca_classify3d's core: seconds per EM iteration and peak memory against N.

    .venv/bin/python benchmarks/bench_classify3d.py [--n 500 1000 2000 4000] [--k 5]
        [--rotations 1000] [--box 24] [--iterations 2] [--max-shift-px 2] [--tag TAG]

Each N runs in a fresh subprocess (its peak resident memory, ``VmHWM``, is its own; see
``common.peak_rss_mb``) on N memory-mapped normalised noise volumes (the arithmetic does not depend
on the content) split into K classes, :func:`disca_tools.cluster.classify3d.classify_with_poses`
with ``--iterations`` free iterations (``--max-shift-px 0``: no translation search). Reported:
seconds per iteration (mean of the iterations after the first, which also compiles the rotation),
the ratio t(N) / t(N_min) against N / N_min (linear: equal), peak RSS and its growth over the
smallest N, and the size of the core's fixed arrays.
Saves ``benchmarks/results/bench_classify3d[_TAG].json`` and ``.md``.
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

from common import peak_rss_mb, proc_status_mb, save_result  # noqa: E402


def _worker(
    n: int, k: int, rotations: int, box: int, iterations: int, max_shift_px: float, folder: str
) -> dict:
    import numpy as np

    from disca_tools.cluster.classify3d import ClassifyConfig, classify_with_poses, sphere_mask
    from disca_tools.model.data import normalise

    path = Path(folder) / f"vols_{n}.npy"
    rng = np.random.default_rng(0)
    vols = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, box, box, box))
    for s in range(0, n, 512):
        vols[s : s + 512] = rng.standard_normal((min(512, n - s), box, box, box))
    vols.flush()
    del vols
    data = np.load(path, mmap_mode="r")
    labels = np.arange(n) % k
    mask = int(sphere_mask(box).sum())
    base = peak_rss_mb()
    cfg = ClassifyConfig(
        rotations=rotations,
        iterations=iterations,
        hold_iterations=0,
        stable_fraction=1.0,
        max_shift_px=max_shift_px,
    )
    t0 = time.perf_counter()
    res = classify_with_poses(lambda a, b: normalise(data[a:b]), n, labels, cfg)
    total = time.perf_counter() - t0
    per_it = [h["seconds"] for h in res.history]
    return {
        "n": n,
        "seconds_total": round(total, 2),
        "seconds_by_iteration": per_it,
        "seconds_per_iteration": round(float(np.mean(per_it[1:] or per_it)), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_mb": round(base, 1),
        # anonymous memory at the end: the peak less the memmap's file pages (reclaimable)
        "rss_anon_end_mb": round(proc_status_mb("RssAnon") or float("nan"), 1),
        # projections (K·R × mask voxels), M-step sums (K·R × box³), back-rotated wedges (R × box³)
        "arrays_mib": round((k * rotations * (box**3 + mask) + rotations * box**3) * 4 / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--rotations", type=int, default=1000)
    ap.add_argument("--box", type=int, default=24)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--max-shift-px", type=float, default=None, help="default: the core's")
    ap.add_argument("--tag", default="")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_shift_px is None:
        from disca_tools.cluster.classify3d import ClassifyConfig

        args.max_shift_px = ClassifyConfig.max_shift_px
    if args.worker is not None:
        rec = _worker(
            args.worker, args.k, args.rotations, args.box, args.iterations, args.max_shift_px,
            args.folder,
        )  # fmt: skip
        print("RESULT " + json.dumps(rec), flush=True)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in args.n:
            cmd = [sys.executable, __file__, "--worker", str(n), "--folder", folder]
            cmd += ["--k", str(args.k), "--rotations", str(args.rotations)]
            cmd += ["--box", str(args.box), "--iterations", str(args.iterations)]
            cmd += ["--max-shift-px", str(args.max_shift_px)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(line[7:]))
            r = rows[-1]
            print(
                f"N {n:>6}: {r['seconds_per_iteration']:8.2f} s/iteration, peak RSS "
                f"{r['peak_rss_mb']:8.1f} MiB",
                flush=True,
            )
    first = rows[0]
    lines = [
        f"# disca_classify3d core: K {args.k}, {args.rotations} rotations, box {args.box}³, "
        f"translations searched within {args.max_shift_px:g} voxels",
        "",
        "| N | s / iteration | t(N) / t(N₀) | N / N₀ | peak RSS MiB | RSS − RSS(N₀) MiB | anonymous RSS at the end MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["seconds_per_iteration"] / first["seconds_per_iteration"]
        r["time_ratio"] = round(ratio, 3)
        r["n_ratio"] = r["n"] / first["n"]
        lines.append(
            f"| {r['n']} | {r['seconds_per_iteration']:.2f} | {ratio:.2f} | {r['n_ratio']:g} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - first['peak_rss_mb']:.0f} | "
            f"{r['rss_anon_end_mb']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    payload = {"protocol": {k: v for k, v in vars(args).items() if k not in ("worker", "folder")}}
    payload["rows"] = rows
    save_result("bench_classify3d", args.tag, payload, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
