"""Geometry conventions: the only place they live.

Coordinates
    Volumes are numpy arrays indexed ``[z, y, x]``; vectors here are ``(x, y, z)`` unless a name
    says ``zyx``. Pixel coordinates are 0-based with the centre of the first voxel at 0 (RELION).
    The box centre of an N-box is ``N // 2`` (RELION's extraction puts the particle there).

Orientations (RELION)
    Euler angles ``(rot, tilt, psi)`` in degrees, intrinsic ZYZ. A subtomogram of reference ``ref``
    with those angles satisfies, in ``(x, y, z)`` about the box centre ``c``::

        sub(x) = ref(M · (x − c − d) + c),   M = Rotation.from_euler("ZYZ", angles, degrees=True)

    where ``d`` is where the particle's centre sits relative to the box centre. RELION's origin
    offsets are the opposite: the particle centre is at ``coordinate − origin``, so ``d = −origin``.
    This was checked against ``relion_reconstruct`` (tests/test_relion_roundtrip.py).

RELION 5 centred coordinates
    ``centred_Å = (px_bin1 − size_bin1 / 2) · tilt_series_angpix`` with ``size`` = rlnTomoSizeX/Y/Z in
    bin-1 tilt-series pixels; a tomogram at binning ``b`` has voxel size ``b · tilt_series_angpix``
    and ``px_b = px_bin1 / b``. (Some tools use ``size/2 − 1``; we write ``size/2`` as RELION does.)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.spatial.transform import Rotation

# ----------------------------------------------------------------------------- Euler angles


def euler_to_matrix(angles_deg: ArrayLike) -> np.ndarray:
    """RELION ZYZ Euler angles ``(rot, tilt, psi)`` in degrees → rotation matrices ``(..., 3, 3)``."""
    a = np.asarray(angles_deg, dtype=np.float64)
    return (
        Rotation.from_euler("ZYZ", a.reshape(-1, 3), degrees=True)
        .as_matrix()
        .reshape(*a.shape[:-1], 3, 3)
    )


def matrix_to_euler(matrices: ArrayLike) -> np.ndarray:
    """Rotation matrices ``(..., 3, 3)`` → RELION ZYZ Euler angles ``(rot, tilt, psi)`` in degrees."""
    m = np.asarray(matrices, dtype=np.float64)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gimbal lock warning: the angles are still valid
            e = Rotation.from_matrix(m.reshape(-1, 3, 3)).as_euler("ZYZ", degrees=True)
    return e.reshape(*m.shape[:-2], 3)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly (Haar measure) on SO(3)."""
    return Rotation.random(n, random_state=rng).as_matrix().reshape(n, 3, 3)


def random_euler(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniform random orientations as RELION ZYZ Euler angles in degrees, shape ``(n, 3)``."""
    return matrix_to_euler(random_rotations(n, rng))


def rotation_angle_deg(matrices: ArrayLike) -> np.ndarray:
    """The rotation angle (0–180°) of each matrix."""
    m = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    cos = (np.trace(m, axis1=1, axis2=2) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


# ----------------------------------------------------------------------------- volumes


def box_center(shape_zyx: tuple[int, ...]) -> np.ndarray:
    """The rotation centre ``N // 2`` per axis, returned as ``(x, y, z)``."""
    return np.array([shape_zyx[2] // 2, shape_zyx[1] // 2, shape_zyx[0] // 2], dtype=np.float64)


def rotate_volume(
    volume_zyx: np.ndarray,
    matrix_xyz: ArrayLike | None = None,
    angles_deg: ArrayLike | None = None,
    center_offset_xyz: ArrayLike = (0.0, 0.0, 0.0),
    order: int = 1,
    fill: float | str = 0.0,
    rng: np.random.Generator | None = None,
    output_shape_zyx: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Rotate (and shift) a volume by a particle's orientation, RELION's convention.

    Returns ``sub`` with ``sub(x) = ref(M · (x − c − d) + c)`` where ``M`` comes from ``matrix_xyz``
    or RELION ``angles_deg`` and ``d = center_offset_xyz`` (voxels). Voxels whose source lies outside
    the input are set to ``fill``: a number, or ``"noise"`` for N(mean, std) of the input (as the
    paper's augmentation fills corners), drawn from ``rng``.
    ``output_shape_zyx`` (same centre convention) allows placing a small map into a larger box.
    """
    vol = np.asarray(volume_zyx, dtype=np.float32)
    if matrix_xyz is None:
        if angles_deg is None:
            raise ValueError("give matrix_xyz or angles_deg")
        matrix_xyz = euler_to_matrix(angles_deg)
    m = np.asarray(matrix_xyz, dtype=np.float64).reshape(3, 3)
    out_shape = tuple(output_shape_zyx) if output_shape_zyx is not None else vol.shape
    perm = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float64)
    a = perm @ m @ perm
    c_out = perm @ box_center(out_shape)
    c_in = perm @ box_center(vol.shape)
    d = perm @ np.asarray(center_offset_xyz, dtype=np.float64)
    b = c_in - a @ (c_out + d)
    if isinstance(fill, str):
        if fill != "noise":
            raise ValueError(f"unknown fill {fill!r}")
        out = ndimage.affine_transform(
            vol,
            a,
            b,
            output_shape=out_shape,
            order=order,
            mode="constant",
            cval=np.nan,
            prefilter=order > 1,
        )
        holes = np.isnan(out)
        if holes.any():
            rng = rng if rng is not None else np.random.default_rng()
            out[holes] = rng.normal(float(vol.mean()), float(vol.std()), int(holes.sum())).astype(
                np.float32
            )
        return out
    return ndimage.affine_transform(
        vol,
        a,
        b,
        output_shape=out_shape,
        order=order,
        mode="constant",
        cval=float(fill),
        prefilter=order > 1,
    )


def resample_volume(
    volume_zyx: np.ndarray, from_angpix: float, to_angpix: float, box: int | None = None
) -> np.ndarray:
    """Resample a map to another voxel size (Fourier crop/pad, keeping the box centre at ``N // 2``).

    ``box`` pads or crops the result (centred) to a cube of that size.
    """
    vol = np.asarray(volume_zyx, dtype=np.float32)
    if abs(from_angpix - to_angpix) > 1e-6 * to_angpix:
        factor = from_angpix / to_angpix
        new_shape = tuple(max(1, int(round(s * factor))) for s in vol.shape)
        vol = _fourier_resize(vol, new_shape) * float(np.prod(new_shape) / np.prod(vol.shape))
    if box is not None:
        vol = pad_or_crop(vol, (box, box, box))
    return vol.astype(np.float32)


def _fourier_resize(vol: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
    """Crop or zero-pad the centred spectrum to ``new_shape`` (band-limited resampling)."""
    f = np.fft.fftshift(np.fft.fftn(vol))
    out = np.zeros(new_shape, dtype=np.complex128)
    src, dst = [], []
    for old, new in zip(vol.shape, new_shape, strict=True):
        n = min(old, new)
        so, sn = old // 2 - n // 2, new // 2 - n // 2
        src.append(slice(so, so + n))
        dst.append(slice(sn, sn + n))
    out[tuple(dst)] = f[tuple(src)]
    return np.real(np.fft.ifftn(np.fft.ifftshift(out))).astype(np.float32)


def pad_or_crop(vol: np.ndarray, shape_zyx: tuple[int, int, int], fill: float = 0.0) -> np.ndarray:
    """Centre-pad or centre-crop to ``shape_zyx`` keeping the ``N // 2`` centre voxel in place."""
    out = np.full(shape_zyx, fill, dtype=vol.dtype)
    src, dst = [], []
    for old, new in zip(vol.shape, shape_zyx, strict=True):
        n = min(old, new)
        so, sn = old // 2 - n // 2, new // 2 - n // 2
        src.append(slice(so, so + n))
        dst.append(slice(sn, sn + n))
    out[tuple(dst)] = vol[tuple(src)]
    return out


# ----------------------------------------------------------------------------- coordinates


def rescale_pixels(coords_px: ArrayLike, from_angpix: float, to_angpix: float) -> np.ndarray:
    """Pixel coordinates at one voxel size → another (``px · from / to``, as RELION and Warp do)."""
    return np.asarray(coords_px, dtype=np.float64) * (float(from_angpix) / float(to_angpix))


def centered_angst_to_pixels(
    centered_angst: ArrayLike,
    size_bin1_xyz: ArrayLike,
    tilt_series_angpix: float,
    binning: float = 1.0,
) -> np.ndarray:
    """RELION 5 ``rlnCenteredCoordinate*Angst`` → pixels of a tomogram at ``binning``."""
    px_bin1 = (
        np.asarray(centered_angst, dtype=np.float64) / tilt_series_angpix
        + np.asarray(size_bin1_xyz, dtype=np.float64) / 2.0
    )
    return px_bin1 / float(binning)


def pixels_to_centered_angst(
    coords_px: ArrayLike, size_bin1_xyz: ArrayLike, tilt_series_angpix: float, binning: float = 1.0
) -> np.ndarray:
    """Pixels of a tomogram at ``binning`` → RELION 5 ``rlnCenteredCoordinate*Angst``."""
    px_bin1 = np.asarray(coords_px, dtype=np.float64) * float(binning)
    return (px_bin1 - np.asarray(size_bin1_xyz, dtype=np.float64) / 2.0) * tilt_series_angpix
