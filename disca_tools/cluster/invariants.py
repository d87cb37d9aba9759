"""Rotation-invariant descriptors of subtomograms (to start the EM loop from the data itself).

A subtomogram's class does not depend on the particle's orientation, so clusters that start DISCA's
self-training should not either: the network is trained on rotated copies carrying the same label
and cannot learn labels that follow orientation. PCA of the raw voxels is not rotation invariant
(its clusters are partly orientation clusters, which YOPO cannot fit); these descriptors are.

For each spherical shell of radius r = 1 … S/2 − 1 voxels about the box centre (``S // 2``, the
rotation centre of RELION and of the training augmentation), the volume is sampled on a
Gauss–Legendre × uniform grid of the sphere (trilinear interpolation) and expanded in spherical
harmonics up to degree ``l_max``: coefficients ``c_lm(r)``. A rotation turns the coefficients of
degree l of every shell by the same unitary matrix (the Wigner D-matrix of degree l), so for any two
shells r ≤ r′ the cross power ``p_l(r, r′) = Σ_m c_lm(r) conj(c_lm(r′))`` is unchanged by it. The
descriptor is the shell means (the radial density profile, with its sign) and, for every degree
l ≥ 1 and every pair of shells, ``sign(p) · sqrt(|p|)`` (a root, so that it scales with the density
as the means do). The diagonal r = r′ is the shell's power in degree l (Kazhdan, Funkhouser &
Rusinkiewicz, SGP 2003); the pairs r ≠ r′ add how the shells are turned relative to one another
(the radial "power spectrum" of the SOAP descriptor: Bartók, Kondor & Csányi, Phys. Rev. B 87,
184115, 2013), which the per-shell powers lose, and noise independent between shells adds nothing
to their expectation. The missing wedge is fixed in the microscope frame, so the descriptors of one
structure still vary a little with its orientation.

:func:`fourier_invariant_descriptors` does the same on the log power spectrum (shells of spatial
frequency about the origin). A power spectrum does not change when the particle is shifted, so these
are also translation invariant (picks are rarely centred to the voxel), and every shell integrates the
whole box: the total scattering power per frequency — size and mass — survives far more noise than a
real-space shell does. Only even degrees are kept (a real volume's power spectrum is centrosymmetric,
so its odd-degree coefficients vanish). :func:`invariant_features` uses both sets.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft
from scipy.special import roots_legendre, sph_harm_y

from ..runtime.log import check_abort


@lru_cache(maxsize=8)  # the same grid for every batch and both descriptor sets
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
    grid = (dirs, weights, np.stack(basis, axis=1))
    for a in grid:
        a.flags.writeable = False  # cached: shared by every caller
    return grid


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
    shells = box // 2 - 1
    return shells + l_max * shells * (shells + 1) // 2


def fourier_descriptor_size(box: int, l_max: int) -> int:
    """Length of :func:`fourier_invariant_descriptors` for a ``box``³ volume."""
    return (box // 2 - 1) * (1 + l_max // 2)


def _check_cubic(vols: np.ndarray) -> np.ndarray:
    vols = np.asarray(vols)
    if vols.ndim != 4 or len(set(vols.shape[1:])) != 1:
        raise ValueError(f"expected cubic volumes (B, S, S, S), got {vols.shape}")
    return vols


def _shell_coefficients(grids: np.ndarray, l_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Per shell r = 1 … S/2 − 1 about voxel S // 2 of ``grids`` (B, S, S, S): the shell means
    (B, R) and the spherical-harmonic coefficients of degrees 1 … ``l_max`` (B, R, M)."""
    s = grids.shape[-1]
    dirs, weights, basis = _sphere_grid(l_max)
    means, coefs = [], []
    for r in range(1, s // 2):
        f = _trilinear(grids, s // 2 + r * dirs[:, ::-1])  # (x, y, z) → (z, y, x) indices
        means.append((f @ weights) / (4 * np.pi))
        coefs.append((f * weights) @ basis)
    return np.stack(means, axis=1), np.stack(coefs, axis=1)


def _degree_slices(l_max: int) -> list[slice]:
    """Columns of each degree 1 … ``l_max`` in :func:`_sphere_grid`'s basis."""
    return [slice(deg * deg - 1, (deg + 1) ** 2 - 1) for deg in range(1, l_max + 1)]


# Degrees used by :func:`invariant_features`. Real-space shells: at ±60° SNR 0.03 and at ±40° SNR 0.1
# (400 per class) degrees up to 10 separate the classes better than up to 6 (benchmarks/ACCURACY.md, session 14).
# The power spectrum's even degrees up to 10 instead of 6 changed nothing measurable there.
SHELL_L_MAX = 10
SPECTRUM_L_MAX = 6


def rotation_invariant_descriptors(vols: np.ndarray, l_max: int = SHELL_L_MAX) -> np.ndarray:
    """Shell means and signed roots of the cross-shell spherical-harmonic power of ``vols``
    (B, S, S, S): (B, F), F = :func:`shell_descriptor_size`.

    Ordered [the R = S/2 − 1 shell means, then for l = 1 … ``l_max`` the pairs r ≤ r′ in
    ``np.triu_indices(R)`` order].
    """
    vols = _check_cubic(vols)
    means, coefs = _shell_coefficients(vols, l_max)
    pairs = np.triu_indices(coefs.shape[1])
    out = [means]
    for cols in _degree_slices(l_max):
        c = coefs[:, :, cols]
        cross = np.einsum("brm,bsm->brs", c, c.conj()).real[:, pairs[0], pairs[1]]
        out.append(np.sign(cross) * np.sqrt(np.abs(cross)))
    return np.concatenate(out, axis=1).astype(np.float32)


def fourier_invariant_descriptors(vols: np.ndarray, l_max: int = SPECTRUM_L_MAX) -> np.ndarray:
    """Rotation- and translation-invariant descriptors of the power spectra of ``vols`` (B, S, S, S).

    The spectrum is ``log(|FFT|² + 0.01 · its mean)`` (the offset keeps the empty missing wedge from
    dominating), centred on frequency 0; per frequency shell k = 1 … S/2 − 1: the shell mean and the
    amplitude of each even degree 2 … l_max. F = (S/2 − 1) · (1 + l_max // 2).
    """
    vols = _check_cubic(vols)
    power = np.abs(scipy.fft.fftn(vols.astype(np.float32), axes=(1, 2, 3), workers=-1)) ** 2
    power += 0.01 * power.mean(axis=(1, 2, 3), keepdims=True)
    log_power = np.fft.fftshift(np.log(power), axes=(1, 2, 3))  # frequency 0 at voxel S // 2
    means, coefs = _shell_coefficients(log_power, l_max)
    amps = [np.linalg.norm(coefs[:, :, cols], axis=2) for cols in _degree_slices(l_max)[1::2]]
    return np.stack([means, *amps], axis=2).reshape(len(vols), -1).astype(np.float32)


def invariant_features(store, rows: np.ndarray, batch: int = 256) -> np.ndarray:
    """:func:`rotation_invariant_descriptors` and :func:`fourier_invariant_descriptors` of the
    normalised store ``rows``, streamed, side by side, with every column standardised (zero mean,
    unit s.d.): ``(N, F)`` float32 (ample for PCA input), filled and standardised in place."""
    from ..model.data import gather

    rows = np.asarray(rows)
    out = None
    for start in range(0, len(rows), batch):
        check_abort()
        vols = gather(store, rows[start : start + batch])
        part = np.hstack(
            [rotation_invariant_descriptors(vols), fourier_invariant_descriptors(vols)]
        )
        if out is None:
            out = np.empty((len(rows), part.shape[1]), np.float32)
        out[start : start + len(part)] = part
    return _standardise_in_place(out)


def standardise_columns(x: np.ndarray) -> np.ndarray:
    """``x`` (N, F) with every column at zero mean and unit s.d. (constant columns: zero), float64."""
    return _standardise_in_place(np.array(x, dtype=np.float64))


def _standardise_in_place(x: np.ndarray, columns: int = 16) -> np.ndarray:
    """Standardise ``x``'s columns in place, a block of ``columns`` at a time (moments in float64):
    the only temporary is one block, not a copy of ``x``."""
    for j in range(0, x.shape[1], columns):
        block = x[:, j : j + columns]
        mean = block.mean(axis=0, dtype=np.float64)
        sd = block.std(axis=0, dtype=np.float64)
        block -= mean.astype(x.dtype)
        block /= np.where(sd > 0, sd, 1.0).astype(x.dtype)
    return x
