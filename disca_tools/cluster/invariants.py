"""Rotation-invariant descriptors of subtomograms (to start the EM loop from the data itself).

A subtomogram's class does not depend on the particle's orientation, so clusters that start DISCA's
self-training should not either: the network is trained on rotated copies carrying the same label
and cannot learn labels that follow orientation. PCA of the raw voxels is not rotation invariant
(its clusters are partly orientation clusters, which YOPO cannot fit); these descriptors are.

For each spherical shell of radius r = 1 … S/2 − 1 voxels about the box centre (``S // 2``, the
rotation centre of RELION and of the training augmentation), the volume is sampled on a
Gauss–Legendre × uniform grid of the sphere (trilinear interpolation) and expanded in spherical
harmonics up to degree ``l_max``. The descriptor is the shell mean (the radial density profile, with
its sign) and, for every degree l ≥ 1, the root of the shell's power in that degree,
``sqrt(Σ_m |c_lm(r)|²)``, which a rotation leaves unchanged (Kazhdan, Funkhouser & Rusinkiewicz,
SGP 2003). The missing wedge is fixed in the microscope frame, so the descriptors of one structure
still vary a little with its orientation; the noise adds a constant expected power to every shell.
"""

from __future__ import annotations

import numpy as np
from scipy.special import roots_legendre, sph_harm_y

from ..runtime.log import check_abort


def _sphere_grid(l_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors (P, 3) as (x, y, z), quadrature weights (P,), and the basis conj(Y_lm) (P, M)."""
    n_theta = l_max + 2
    n_phi = 2 * l_max + 4
    u, w_u = roots_legendre(n_theta)  # u = cos θ
    theta = np.arccos(u)
    phi = np.arange(n_phi) * (2 * np.pi / n_phi)
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    weights = np.repeat(w_u, n_phi) * (2 * np.pi / n_phi)
    th, ph = th.ravel(), ph.ravel()
    dirs = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], axis=1)
    basis = [
        np.conj(sph_harm_y(deg, m, th, ph))
        for deg in range(1, l_max + 1)
        for m in range(-deg, deg + 1)
    ]
    return dirs, weights, np.stack(basis, axis=1)


def _trilinear(vols: np.ndarray, points_zyx: np.ndarray) -> np.ndarray:
    """Values of ``vols`` (B, S, S, S) at ``points_zyx`` (P, 3), linear interpolation: (B, P)."""
    s = vols.shape[-1]
    p = np.clip(points_zyx, 0, s - 1 - 1e-6)
    i0 = np.floor(p).astype(np.int64)
    f = p - i0
    out = np.zeros((vols.shape[0], len(p)), dtype=np.float64)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (
                    (f[:, 0] if dz else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dx else 1 - f[:, 2])
                )
                out += vols[:, i0[:, 0] + dz, i0[:, 1] + dy, i0[:, 2] + dx] * w
    return out


def shell_descriptor_size(box: int, l_max: int) -> int:
    """Length of :func:`rotation_invariant_descriptors` for a ``box``³ volume."""
    return (box // 2 - 1) * (1 + l_max)


def rotation_invariant_descriptors(vols: np.ndarray, l_max: int = 6) -> np.ndarray:
    """Shell means and per-degree spherical-harmonic amplitudes of ``vols`` (B, S, S, S): (B, F).

    F = (S/2 − 1) · (1 + l_max), ordered shell by shell: [mean, amplitude l=1, …, l=l_max].
    """
    vols = np.asarray(vols)
    if vols.ndim != 4 or len(set(vols.shape[1:])) != 1:
        raise ValueError(f"expected cubic volumes (B, S, S, S), got {vols.shape}")
    s = vols.shape[-1]
    dirs, weights, basis = _sphere_grid(l_max)
    degrees = np.concatenate([[deg] * (2 * deg + 1) for deg in range(1, l_max + 1)])
    centre = s // 2
    out = []
    for r in range(1, s // 2):
        pts = centre + r * dirs[:, ::-1]  # (x, y, z) → (z, y, x) indices
        f = _trilinear(vols, pts)  # (B, P)
        mean = (f @ weights) / (4 * np.pi)
        coeff = (f * weights) @ basis  # (B, M)
        power = np.abs(coeff) ** 2
        amp = np.stack(
            [np.sqrt(power[:, degrees == deg].sum(axis=1)) for deg in range(1, l_max + 1)], axis=1
        )
        out.append(np.concatenate([mean[:, None], amp], axis=1))
    return np.concatenate(out, axis=1).astype(np.float32)


def invariant_features(store, rows: np.ndarray, l_max: int = 6, batch: int = 256) -> np.ndarray:
    """:func:`rotation_invariant_descriptors` of the normalised store ``rows``, streamed, with every
    column standardised (zero mean, unit s.d.): ``(N, F)`` float64."""
    from ..model.data import gather

    rows = np.asarray(rows)
    parts = []
    for start in range(0, len(rows), batch):
        check_abort()
        parts.append(
            rotation_invariant_descriptors(gather(store, rows[start : start + batch]), l_max)
        )
    x = np.concatenate(parts).astype(np.float64)
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
