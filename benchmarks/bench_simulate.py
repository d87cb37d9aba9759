"""Benchmark disca_simulate: tomogram speed and measured versus requested SNR.

    .venv/bin/python benchmarks/bench_simulate.py [--quick]

1. A 512×512×128 tomogram with 200 particles of 5 real structures at 10 Å (CTF, ±60° wedge, SNR 0.1):
   wall time of ``simulate_tomogram`` and its parts (placement, imaging), side by side with the naive
   alternative of rotating a whole-volume copy per particle (timed on 2 particles, scaled to 200).
2. Measured SNR = signal variance / variance of (noisy − clean), for subtomogram sets at the paper's
   SNRs (0.1 … 0.001; signal variance over each whole box, averaged over the set) and for tomograms
   (signal variance over the particles' extent spheres), versus the requested SNR.

Prints a table and saves ``benchmarks/results/bench_simulate.json`` (and slices of the tomogram in
``bench_simulate_tomogram.png``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import RESULTS, peak_rss_mb, save_figure, save_result  # noqa: E402

from disca_tools.geometry import random_euler, rotate_volume  # noqa: E402
from disca_tools.simulate.imaging import Imaging, apply_imaging  # noqa: E402
from disca_tools.simulate.structures import load_structure  # noqa: E402
from disca_tools.simulate.subtomograms import simulate_subtomogram_set  # noqa: E402
from disca_tools.simulate.tomogram import simulate_tomogram  # noqa: E402

STRUCTURES = ["4v4r", "3j9i", "1bxn", "3cf3", "1qvr"]


def _json_number(value) -> float | str:
    """NumPy scalars as JSON numbers; a non-finite one as its name."""
    return float(value) if math.isfinite(value) else str(value)


def _tomogram_speed(shape_xyz, n_particles, angpix, seed=0) -> dict:
    imaging = Imaging()
    t0 = time.perf_counter()
    sim = simulate_tomogram(STRUCTURES, shape_xyz, n_particles, angpix, 0.1, imaging, seed)
    total = time.perf_counter() - t0
    # parts: imaging alone on the same volume
    t0 = time.perf_counter()
    apply_imaging(sim.clean_zyx, angpix, imaging)
    t_imaging = time.perf_counter() - t0
    noise = sim.volume_zyx - sim.clean_zyx
    measured_snr = sim.signal_variance / float(noise.var(dtype=np.float64))
    del noise
    _figure(sim)
    # naive alternative: place a map in a zero volume the size of the tomogram, rotate all of it
    nx, ny, nz = shape_xyz
    vol = np.zeros((nz, ny, nx), dtype=np.float32)
    m = load_structure(STRUCTURES[0], angpix)
    # the map's centre on the volume's centre, cut to the volume where the map is larger (thin z)
    cut = tuple(min(a, b) for a, b in zip(m.shape, vol.shape, strict=True))
    src = tuple(slice((a - c) // 2, (a - c) // 2 + c) for a, c in zip(m.shape, cut, strict=True))
    dst = tuple(slice((a - c) // 2, (a - c) // 2 + c) for a, c in zip(vol.shape, cut, strict=True))
    vol[dst] = m[src]
    angles = random_euler(2, np.random.default_rng(0))
    t0 = time.perf_counter()
    for a in angles:
        rotate_volume(vol, angles_deg=a, order=1)
    naive_per_particle = (time.perf_counter() - t0) / 2
    return {
        "shape_xyz": list(shape_xyz),
        "n_particles": n_particles,
        "angpix": angpix,
        "seconds_total": total,
        "seconds_imaging": t_imaging,
        "seconds_placement_and_noise": total - t_imaging,
        "naive_full_volume_rotation_seconds_per_particle": naive_per_particle,
        "naive_extrapolated_seconds": naive_per_particle * n_particles,
        "speedup_vs_naive": naive_per_particle * n_particles / total,
        "requested_snr": 0.1,
        "measured_snr": measured_snr,
    }


def _figure(sim) -> None:
    """Central xy and xz slices of the noise-free and noisy tomogram (protein dark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(sim.particles["z_px"].median())
    y = int(sim.particles["y_px"].iloc[0])
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), gridspec_kw={"height_ratios": [4, 1]})
    for col, (vol, label) in enumerate(
        ((sim.clean_zyx, "noise-free"), (sim.volume_zyx, "SNR 0.1"))
    ):
        ax[0, col].imshow(vol[z], cmap="gray")
        ax[0, col].set_title(f"{label}: xy slice z={z}")
        ax[1, col].imshow(vol[:, y, :], cmap="gray", aspect="auto")
        ax[1, col].set_title(f"xz slice y={y} (missing wedge ±60° about y)")
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    save_figure(fig, RESULTS / "bench_simulate_tomogram.png", dpi=70)
    plt.close(fig)


def _subtomogram_snr(snrs, n_per_class, box, angpix) -> list[dict]:
    rows = []
    for snr in snrs:
        t0 = time.perf_counter()
        s, clean = simulate_subtomogram_set(
            STRUCTURES, n_per_class, box, angpix, snr, Imaging(), seed=1, return_clean=True
        )
        dt = time.perf_counter() - t0
        noise_var = float((s.volumes - clean).var(dtype=np.float64))
        sig_var = float(np.mean(clean.reshape(len(s), -1).var(axis=1, dtype=np.float64)))
        rows.append(
            {
                "kind": "subtomograms",
                "requested_snr": snr,
                "measured_snr": sig_var / noise_var,
                "n": len(s),
                "box": box,
                "seconds": dt,
                "subtomograms_per_second": len(s) / dt,
            }
        )
    return rows


def _tomogram_snr(snrs, shape_xyz, n_particles, angpix) -> list[dict]:
    rows = []
    for snr in snrs:
        sim = simulate_tomogram(STRUCTURES, shape_xyz, n_particles, angpix, snr, Imaging(), seed=2)
        noise_var = float((sim.volume_zyx - sim.clean_zyx).var(dtype=np.float64))
        rows.append(
            {
                "kind": "tomogram",
                "requested_snr": snr,
                "measured_snr": sim.signal_variance / noise_var,
                "n": n_particles,
                "shape_xyz": list(shape_xyz),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        speed_shape, speed_n, n_per_class, tomo_shape = (256, 256, 64), 40, 20, (192, 192, 80)
    else:
        speed_shape, speed_n, n_per_class, tomo_shape = (512, 512, 128), 200, 100, (256, 256, 96)

    speed = _tomogram_speed(speed_shape, speed_n, 10.0)
    snrs = [0.1, 0.03, 0.01, 0.003, 0.001]
    snr_rows = _subtomogram_snr(snrs, n_per_class, 24, 12.0)
    snr_rows += _tomogram_snr([0.1, 0.01], tomo_shape, 30, 10.0)
    peak_mb = peak_rss_mb()

    print(
        f"\nTomogram {speed['shape_xyz']} with {speed['n_particles']} particles at {speed['angpix']} Å"
    )
    print(f"  simulate_tomogram total           {speed['seconds_total']:8.2f} s")
    print(f"    imaging (CTF + wedge, FFT)       {speed['seconds_imaging']:8.2f} s")
    print(f"    placement + noise                {speed['seconds_placement_and_noise']:8.2f} s")
    print(
        f"  naive whole-volume rotation        {speed['naive_extrapolated_seconds']:8.1f} s "
        f"({speed['naive_full_volume_rotation_seconds_per_particle']:.2f} s/particle × {speed_n}, "
        f"extrapolated) → {speed['speedup_vs_naive']:.0f}× slower"
    )
    print(f"  peak RSS of this process          {peak_mb:8.0f} MB")
    print("\nRequested vs measured SNR")
    print(f"  {'kind':<13}{'requested':>10}{'measured':>10}{'ratio':>8}  details")
    for r in [{"kind": "tomogram*", **speed}] + snr_rows:
        extra = (
            f"n={r['n']} box={r['box']} ({r['subtomograms_per_second']:.0f}/s)"
            if r["kind"] == "subtomograms"
            else f"shape={r['shape_xyz']}"
        )
        ratio = r["measured_snr"] / r["requested_snr"]
        print(
            f"  {r['kind']:<13}{r['requested_snr']:>10.3g}{r['measured_snr']:>10.4g}{ratio:>8.3f}  {extra}"
        )
    print("  (* the speed run's tomogram)")

    record = {
        "benchmark": "bench_simulate",
        "tomogram_speed": speed,
        "snr": snr_rows,
        "peak_rss_mb": peak_mb,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    name = "bench_simulate_quick" if args.quick else "bench_simulate"
    out = save_result(name, "", record, json_default=_json_number)
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
