"""Simulated crowded tomograms with ground truth.

Particles of the given structures are placed without overlap (centre distance ≥
``min_separation_factor · (r_i + r_j)``, ``r`` = the structure's extent radius) at uniform random
orientations, each rotated map added as a small box (never rotating the whole volume). The whole
volume is then imaged at once (CTF + missing wedge in Fourier space, on z slabs of the half spectrum)
and white Gaussian noise is added at the requested SNR.

SNR here is the variance of the imaged noise-free tomogram *over the voxels inside the particles'
extent spheres* divided by the noise variance (measuring over the whole volume would make the SNR
depend on how crowded the tomogram is).

Contrast: like real cryo-ET tomograms, both returned volumes have protein DARK (the imaged,
protein-positive volume is negated). Subtomograms extracted for RELION must be inverted back.
Coordinates are integer voxel positions (0-based, RELION), so the ground truth is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..geometry import random_euler, rotate_volume
from ..runtime.errors import UserError
from ..runtime.log import logger, progress
from .imaging import Imaging, apply_imaging, signal_variance, unit_noise
from .structures import load_structure, structure_label, structure_radius_px

PARTICLE_COLUMNS = ("x_px", "y_px", "z_px", "class_number", "class_name", "rot", "tilt", "psi")


@dataclass
class TomogramSimulation:
    """A simulated tomogram (protein dark) and its ground truth.

    volume_zyx: noisy tomogram. clean_zyx: the same without noise. particles: one row per particle,
    columns ``x_px, y_px, z_px`` (voxel indices), ``class_number`` (1-based), ``class_name``,
    ``rot, tilt, psi`` (RELION ZYZ degrees). radii_px: extent radius of each class (voxels).
    """

    volume_zyx: np.ndarray
    clean_zyx: np.ndarray
    particles: pd.DataFrame
    angpix: float
    class_names: list[str]
    radii_px: dict[str, float]
    snr: float = math.inf
    noise_sigma: float = 0.0
    signal_variance: float = 0.0


def _place_centres(
    radii: np.ndarray,
    classes: np.ndarray,
    shape_xyz: tuple[int, int, int],
    factor: float,
    rng: np.random.Generator,
    max_tries: int = 2000,
) -> np.ndarray:
    """Random integer centres inside the volume with no two particles closer than factor·(ri + rj)."""
    n = classes.size
    centres = np.zeros((n, 3), dtype=np.int64)
    placed_r = np.zeros(n)
    hi = np.asarray(shape_xyz, dtype=np.int64)
    for i in range(n):
        r = radii[classes[i]]
        lo_i = np.minimum(np.ceil(r).astype(np.int64), hi // 2)
        hi_i = np.maximum(hi - lo_i, lo_i + 1)
        for _ in range(max_tries // 50):
            cand = rng.integers(lo_i, hi_i, size=(50, 3))
            if i:
                d = np.linalg.norm(cand[:, None, :] - centres[None, :i, :], axis=2)
                ok = np.all(d >= factor * (r + placed_r[None, :i]), axis=1)
            else:
                ok = np.ones(50, dtype=bool)
            if ok.any():
                centres[i] = cand[int(np.argmax(ok))]
                placed_r[i] = r
                break
        else:
            raise UserError(
                f"--n-particles {n}: could only place {i} non-overlapping particles in a "
                f"{shape_xyz[0]}x{shape_xyz[1]}x{shape_xyz[2]} volume; use fewer or a larger --shape"
            )
    return centres


def _box_slices(shape: tuple[int, ...], box_shape: tuple[int, ...], centre_xyz: np.ndarray):
    """(volume slices, box slices) placing a box's ``N // 2`` voxel at ``centre_xyz``, clipped."""
    starts = [int(centre_xyz[2]) - box_shape[0] // 2, int(centre_xyz[1]) - box_shape[1] // 2]
    starts.append(int(centre_xyz[0]) - box_shape[2] // 2)
    dst, src = [], []
    for s, b, v in zip(starts, box_shape, shape, strict=True):
        a0, a1 = max(s, 0), min(s + b, v)
        if a1 <= a0:
            return None
        dst.append(slice(a0, a1))
        src.append(slice(a0 - s, a1 - s))
    return tuple(dst), tuple(src)


def simulate_tomogram(
    structures: list[str],
    shape_xyz: tuple[int, int, int],
    n_particles: int,
    angpix: float,
    snr: float,
    imaging: Imaging,
    seed: int,
    min_separation_factor: float = 1.0,
) -> TomogramSimulation:
    """Simulate a crowded tomogram of ``shape_xyz`` voxels with ``n_particles`` particles.

    Classes are assigned round-robin then shuffled (balanced), orientations uniform on SO(3).
    """
    if not structures:
        raise ValueError("no structures given")
    nx, ny, nz = (int(s) for s in shape_xyz)
    if min(nx, ny, nz) < 8 or n_particles < 0 or angpix <= 0:
        raise ValueError(
            f"bad sizes: shape={shape_xyz}, n_particles={n_particles}, angpix={angpix}"
        )
    if snr is not None and not (snr > 0):
        raise ValueError(f"snr must be positive (or inf), got {snr}")
    rng = np.random.default_rng(seed)
    names = [structure_label(s) for s in structures]
    maps = [load_structure(s, angpix) for s in structures]
    radii = np.array([structure_radius_px(m) for m in maps])
    classes = rng.permutation(np.arange(n_particles) % len(structures))
    centres = _place_centres(radii, classes, (nx, ny, nz), min_separation_factor, rng)
    angles = random_euler(n_particles, rng) if n_particles else np.zeros((0, 3))

    clean = np.zeros((nz, ny, nx), dtype=np.float32)
    mask = np.zeros((nz, ny, nx), dtype=bool)
    # rotate into boxes reaching the maps' faint outskirts (1% of max); separation and the SNR mask
    # use the extent radius (10% of max)
    boxes = [int(2 * math.ceil(structure_radius_px(m, 0.01)) + 3) for m in maps]
    spheres = []
    for b, r in zip(boxes, radii, strict=True):
        g = np.arange(b) - b // 2
        spheres.append(
            (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= r * r
        )
    for i in progress(
        range(n_particles), total=n_particles, desc="place particles", unit="particle"
    ):
        c = classes[i]
        sub = rotate_volume(
            maps[c], angles_deg=angles[i], order=1, output_shape_zyx=(boxes[c],) * 3
        )
        sl = _box_slices(clean.shape, sub.shape, centres[i])
        if sl is not None:
            dst, src = sl
            clean[dst] += sub[src]
            mask[dst] |= spheres[c][src]

    logger.debug("imaging %s volume", clean.shape)
    clean = apply_imaging(clean, angpix, imaging)
    sig_var = signal_variance(clean, mask) if mask.any() else signal_variance(clean)
    if snr is None or math.isinf(snr):
        noisy, sigma = clean.copy(), 0.0
    else:
        sigma = math.sqrt(sig_var / snr)
        noisy = unit_noise(clean.shape, imaging, rng)
        noisy *= np.float32(sigma)
        noisy += clean
    np.negative(clean, out=clean)  # protein dark, as in real tomograms
    np.negative(noisy, out=noisy)

    particles = pd.DataFrame(
        {
            "x_px": centres[:, 0].astype(np.float64),
            "y_px": centres[:, 1].astype(np.float64),
            "z_px": centres[:, 2].astype(np.float64),
            "class_number": classes.astype(np.int64) + 1,
            "class_name": [names[c] for c in classes],
            "rot": angles[:, 0],
            "tilt": angles[:, 1],
            "psi": angles[:, 2],
        }
    )
    return TomogramSimulation(
        volume_zyx=noisy,
        clean_zyx=clean,
        particles=particles,
        angpix=float(angpix),
        class_names=names,
        radii_px={n: float(r) for n, r in zip(names, radii, strict=True)},
        snr=float(snr),
        noise_sigma=sigma,
        signal_variance=sig_var,
    )
