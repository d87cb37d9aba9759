"""Benchmark disca_pick: speed against one Gaussian filter, peak memory out of core, recall/precision.

    .venv/bin/python benchmarks/bench_pick.py [--size 1024 1024 256] [--big-gb 4.2] [--skip-big]

1. Speed: picking a memory-mapped MRC of ``--size`` (x y z; default 1024×1024×256, noise plus dark
   blobs) divided by the time of ONE ``scipy.ndimage.gaussian_filter`` of the same (in-memory,
   float32) volume with the picker's larger σ; both timed side by side in this run (goal ≤ 3).
2. Peak memory: a tomogram larger than ``--big-gb`` GB on disk (a sparse MRC made with
   ``create_volume_memmap``, noise written into a z band so there is something to pick) is picked in a
   fresh subprocess; its own peak resident memory (``VmHWM``, see ``common.peak_rss_mb``) is the
   figure (goal ≤ 1.5 GB).
3. Recall/precision against ground truth on simulated tomograms (CTF, ±60° wedge; 4 structures of
   15–33 nm at 10 Å) at SNR 0.1 and 0.01. A pick counts when it lies within half a particle radius of
   a not-yet-matched true particle (greedy one-to-one matching by distance); goal recall ≥ 0.9 at SNR 0.1.

Prints a table and saves ``benchmarks/results/bench_pick.json``.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import RESULTS, measured_on, save_result  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from disca_tools.io.mrc import create_volume_memmap, open_volume  # noqa: E402
from disca_tools.pick import PickParams, pick_volume, sigmas_for_diameter  # noqa: E402

NAME = "bench_pick"  # benchmarks/results/bench_pick.json

STRUCTURES = ["4v4r", "1qvr", "3cf3", "1bxn"]


def _fill_noise_blobs(
    mm: np.ndarray, rng: np.random.Generator, z0: int, z1: int, n_blobs: int
) -> None:
    """Noise plus dark Gaussian blobs in z slab [z0, z1), written slice by slice (bounded memory)."""
    ny, nx = mm.shape[1:]
    for z in range(z0, z1):
        mm[z] = rng.standard_normal((ny, nx), dtype=np.float32)
    g = np.arange(-6, 7)
    blob = -3.0 * np.exp(
        -(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) / 8.0
    )
    for _ in range(n_blobs):
        z = int(rng.integers(z0 + 6, z1 - 7))
        y, x = int(rng.integers(6, ny - 7)), int(rng.integers(6, nx - 7))
        mm[z - 6 : z + 7, y - 6 : y + 7, x - 6 : x + 7] += blob.astype(np.float32)


def bench_speed(size_xyz: tuple[int, int, int], workdir: Path) -> dict:
    nx, ny, nz = size_xyz
    path = workdir / "speed.mrc"
    mm = create_volume_memmap(path, (nz, ny, nx), 10.0)
    _fill_noise_blobs(mm, np.random.default_rng(0), 0, nz, n_blobs=2000)
    mm.flush()
    del mm
    lo, hi = sigmas_for_diameter(120.0, 10.0)
    params = PickParams(lo, hi, threshold_sd=2.5, border=6)
    data, _ = open_volume(path)
    vol = np.array(data, dtype=np.float32)  # in memory, for the reference Gaussian
    t0 = time.perf_counter()
    ndimage.gaussian_filter(vol, hi)
    t_gauss = time.perf_counter() - t0
    del vol
    t0 = time.perf_counter()
    res = pick_volume(data, params)
    t_pick = time.perf_counter() - t0
    # and the reference once more after picking (the machine is shared: bracket the measurement)
    vol = np.array(data, dtype=np.float32)
    t0 = time.perf_counter()
    ndimage.gaussian_filter(vol, hi)
    t_gauss2 = time.perf_counter() - t0
    del vol
    g = min(t_gauss, t_gauss2)
    return {
        "size_xyz": list(size_xyz),
        "sigma_small": lo,
        "sigma_large": hi,
        "gaussian_s": [round(t_gauss, 3), round(t_gauss2, 3)],
        "pick_s": round(t_pick, 3),
        "ratio": round(t_pick / g, 3),
        "ratio_vs_slower_gaussian": round(t_pick / max(t_gauss, t_gauss2), 3),
        "picks": len(res),
        "goal": "<= 3",
    }


_CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {benchmarks!r})
from common import peak_rss_mb
from disca_tools.io.mrc import open_volume
from disca_tools.pick import PickParams, pick_volume, sigmas_for_diameter
data, _ = open_volume({path!r})
lo, hi = sigmas_for_diameter(120.0, 10.0)
t0 = time.perf_counter()
res = pick_volume(data, PickParams(lo, hi, threshold_sd=2.5, border=6))
dt = time.perf_counter() - t0
print(len(res), dt, peak_rss_mb())
"""


def bench_memory(size_gb: float, workdir: Path) -> dict:
    nx = ny = 2048
    nz = int(np.ceil(size_gb * 1e9 / (4 * nx * ny))) + 1
    path = workdir / "big.mrc"
    mm = create_volume_memmap(path, (nz, ny, nx), 10.0)
    zc, half = nz // 2, min(16, nz // 2)
    _fill_noise_blobs(mm, np.random.default_rng(1), zc - half, zc + half, n_blobs=500)
    mm.flush()
    del mm
    file_gb = path.stat().st_size / 1e9
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD.format(root=str(ROOT), benchmarks=str(ROOT / "benchmarks"), path=str(path)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    n, dt, rss_mb = out.stdout.split()
    path.unlink()
    return {
        "size_xyz": [nx, ny, nz],
        "file_gb": round(file_gb, 3),
        "peak_rss_gb": round(float(rss_mb) / 1024, 3),
        "pick_s": round(float(dt), 1),
        "picks": int(n),
        "goal": "<= 1.5 GB",
    }


def _match(picks: np.ndarray, truth: np.ndarray, tol: np.ndarray) -> int:
    """Greedy one-to-one matching by distance; a pair matches within tol of the true particle."""
    if not len(picks) or not len(truth):
        return 0
    tree = cKDTree(picks)
    pairs = []
    for ti, (t, r) in enumerate(zip(truth, tol, strict=True)):
        for pi in tree.query_ball_point(t, r):
            pairs.append((float(np.linalg.norm(picks[pi] - t)), ti, pi))
    pairs.sort()
    used_t, used_p = set(), set()
    for _, ti, pi in pairs:
        if ti not in used_t and pi not in used_p:
            used_t.add(ti)
            used_p.add(pi)
    return len(used_t)


def bench_accuracy(
    snrs: list[float],
    shape_xyz: tuple[int, int, int],
    n_particles: int,
    seeds: list[int],
    thresholds_sd: tuple[float, ...] = (2.5, 3.0, 3.5),
) -> list[dict]:
    from disca_tools.simulate.imaging import Imaging
    from disca_tools.simulate.tomogram import simulate_tomogram

    rows = []
    for snr in snrs:
        counts = {t: [0, 0, 0] for t in thresholds_sd}  # tp, true, picks
        for seed in seeds:
            sim = simulate_tomogram(STRUCTURES, shape_xyz, n_particles, 10.0, snr, Imaging(), seed)
            truth = sim.particles[["x_px", "y_px", "z_px"]].to_numpy()
            radii = sim.particles["class_name"].map(sim.radii_px).to_numpy()
            diameter = 2 * min(sim.radii_px.values()) * 10.0  # smallest particle, Å
            lo, hi = sigmas_for_diameter(diameter, 10.0)
            for t in thresholds_sd:
                params = PickParams(lo, hi, threshold_sd=t, min_distance=diameter / 10.0 * 0.75)
                res = pick_volume(sim.volume_zyx, params)
                c = counts[t]
                c[0] += _match(res.coords_xyz, truth, radii / 2)
                c[1] += len(truth)
                c[2] += len(res)
        for t, (tp, n_true, n_pick) in counts.items():
            rows.append(
                {
                    "snr": snr,
                    "threshold_sd": t,
                    "particles": n_true,
                    "picks": n_pick,
                    "recall": round(tp / n_true, 3),
                    "precision": round(tp / max(n_pick, 1), 3),
                    "structures": STRUCTURES,
                    "diameters_nm": sorted(round(2 * r, 1) for r in sim.radii_px.values()),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", nargs=3, type=int, default=[1024, 1024, 256], metavar=("X", "Y", "Z"))
    ap.add_argument("--big-gb", type=float, default=4.2, help="out-of-core tomogram size (GB)")
    ap.add_argument("--skip-big", action="store_true", help="skip the out-of-core measurement")
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["speed", "memory", "accuracy"],
        default=None,
        help="run only these parts (saved results of the other parts are kept)",
    )
    ap.add_argument("--sim-shape", nargs=3, type=int, default=[256, 256, 100])
    ap.add_argument("--sim-particles", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where temporary tomograms go")
    args = ap.parse_args()
    out = RESULTS / f"{NAME}.json"
    parts = set(args.only or ["speed", "memory", "accuracy"])
    if args.skip_big:
        parts.discard("memory")
    record: dict = json.loads(out.read_text()) if args.only and out.exists() else {}
    # with --only, the parts kept from the saved result keep the machine and libraries they were
    # measured with; the top-level record (save_result) is this run's
    measured_with = record.get("measured_with") or {
        part: {"machine": record.get("machine"), "libraries": record.get("libraries")}
        for part in ("speed", "memory", "accuracy")
        if part in record
    }
    for part in parts:
        measured_with[part] = measured_on()
    record["measured_with"] = measured_with
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if "speed" in parts:
            sp = bench_speed(tuple(args.size), work)
            record["speed"] = sp
            print(
                f"\n1. speed  {sp['size_xyz']}  gaussian(σ={sp['sigma_large']:.2f}) "
                f"{sp['gaussian_s']} s  pick {sp['pick_s']} s  ratio {sp['ratio']} "
                f"(vs slower Gaussian {sp['ratio_vs_slower_gaussian']})  goal ≤ 3  "
                f"[{sp['picks']} picks]"
            )
        if "memory" in parts:
            mem = bench_memory(args.big_gb, work)
            record["memory"] = mem
            print(
                f"2. memory {mem['size_xyz']}  file {mem['file_gb']} GB  peak RSS "
                f"{mem['peak_rss_gb']} GB  ({mem['pick_s']} s, {mem['picks']} picks)  goal ≤ 1.5 GB"
            )
    if "accuracy" in parts:
        acc = bench_accuracy(
            [0.1, 0.01], tuple(args.sim_shape), args.sim_particles, list(range(args.seeds))
        )
        record["accuracy"] = acc
        print("3. accuracy (pick within half a particle radius, one-to-one)")
        print(
            f"   {'SNR':>6} {'thr(sd)':>7} {'true':>6} {'picks':>6} {'recall':>7} {'precision':>9}"
        )
        for r in acc:
            print(
                f"   {r['snr']:>6} {r['threshold_sd']:>7} {r['particles']:>6} {r['picks']:>6} "
                f"{r['recall']:>7.3f} {r['precision']:>9.3f}"
            )
    print(f"saved {save_result(NAME, '', record)}")


if __name__ == "__main__":
    main()
