"""Geometry conventions: Euler angles, rotating volumes, uniform SO(3), coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from disca_tools.geometry import (
    box_center,
    centered_angst_to_pixels,
    euler_to_matrix,
    matrix_to_euler,
    pad_or_crop,
    pixels_to_centered_angst,
    random_euler,
    random_rotations,
    resample_volume,
    rescale_pixels,
    rotate_volume,
    rotation_angle_deg,
)


def _point_volume(n: int, xyz: tuple[int, int, int]) -> np.ndarray:
    vol = np.zeros((n, n, n), dtype=np.float32)
    vol[xyz[2], xyz[1], xyz[0]] = 1.0
    return vol


def _argmax_xyz(vol: np.ndarray) -> tuple[int, int, int]:
    z, y, x = np.unravel_index(int(np.argmax(vol)), vol.shape)
    return int(x), int(y), int(z)


# ----------------------------------------------------------------------------- Euler angles


def test_euler_matrix_round_trip():
    rng = np.random.default_rng(0)
    angles = random_euler(500, rng)
    m = euler_to_matrix(angles)
    assert m.shape == (500, 3, 3)
    np.testing.assert_allclose(
        m @ np.transpose(m, (0, 2, 1)), np.broadcast_to(np.eye(3), m.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(m), 1.0, atol=1e-12)
    back = euler_to_matrix(matrix_to_euler(m))
    np.testing.assert_allclose(back, m, atol=1e-9)
    # RELION's ranges: rot, psi in (−180, 180], tilt in [0, 180]
    e = matrix_to_euler(m)
    assert np.all((e[:, 1] >= 0) & (e[:, 1] <= 180))
    assert np.all(np.abs(e[:, [0, 2]]) <= 180)


def test_euler_is_intrinsic_zyz_by_hand():
    """(rot, tilt, psi) = Rz(rot)·Ry(tilt)·Rz(psi), written out by hand."""

    def rz(a):
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])

    rot, tilt, psi = 30.0, 50.0, -70.0
    np.testing.assert_allclose(
        euler_to_matrix([rot, tilt, psi]), rz(rot) @ ry(tilt) @ rz(psi), atol=1e-12
    )
    # a batch keeps its leading shape
    assert euler_to_matrix(np.zeros((2, 4, 3))).shape == (2, 4, 3, 3)


def test_gimbal_lock_angles_still_round_trip():
    for tilt in (0.0, 180.0):
        m = euler_to_matrix([40.0, tilt, 25.0])
        np.testing.assert_allclose(euler_to_matrix(matrix_to_euler(m)), m, atol=1e-9)


# ----------------------------------------------------------------------------- rotate_volume


@pytest.mark.parametrize("n", [16, 15])
def test_rotate_volume_90_degrees_about_z(n):
    """sub(x) = ref(M·(x − c) + c): a point at ref p lands at c + Mᵀ(p − c)."""
    c = box_center((n, n, n)).astype(int)
    p = (c[0] + 3, c[1], c[2])  # +x of the centre
    ref = _point_volume(n, p)
    sub = rotate_volume(ref, angles_deg=[90.0, 0.0, 0.0])
    # M = Rz(90): Mᵀ·(3, 0, 0) = (0, −3, 0)
    assert _argmax_xyz(sub) == (c[0], c[1] - 3, c[2])
    assert sub.max() == pytest.approx(1.0, abs=1e-6)


def test_rotate_volume_90_degrees_about_y_and_composition():
    n = 17
    c = box_center((n, n, n)).astype(int)
    ref = _point_volume(n, (c[0], c[1], c[2] + 4))  # +z of the centre
    sub = rotate_volume(ref, angles_deg=[0.0, 90.0, 0.0])
    # M = Ry(90) = [[0,0,1],[0,1,0],[−1,0,0]]; Mᵀ·(0,0,4) = (−4, 0, 0)
    assert _argmax_xyz(sub) == (c[0] - 4, c[1], c[2])
    # a full ZYZ rotation agrees with its matrix
    ang = [30.0, 90.0, 180.0]
    m = euler_to_matrix(ang)
    np.testing.assert_allclose(
        rotate_volume(ref, angles_deg=ang, order=1), rotate_volume(ref, matrix_xyz=m, order=1)
    )


def test_rotate_volume_inverse_and_shift():
    rng = np.random.default_rng(1)
    vol = np.zeros((24, 24, 24), dtype=np.float32)
    vol[6:18, 8:16, 10:14] = rng.random((12, 8, 4))
    m = euler_to_matrix([90.0, 90.0, 90.0])  # a 90° permutation: exact on the grid
    back = rotate_volume(rotate_volume(vol, matrix_xyz=m), matrix_xyz=m.T)
    np.testing.assert_allclose(back, vol, atol=1e-5)
    # shift d: the content moves by +d
    shifted = rotate_volume(vol, matrix_xyz=np.eye(3), center_offset_xyz=(2.0, -1.0, 3.0))
    np.testing.assert_allclose(
        shifted[3 + 6 : 3 + 18, -1 + 8 : -1 + 16, 2 + 10 : 2 + 14], vol[6:18, 8:16, 10:14]
    )


def test_rotate_volume_output_shape_keeps_centre():
    n = 31
    c = box_center((n, n, n)).astype(int)
    ref = _point_volume(n, (c[0] + 2, c[1] + 1, c[2] - 3))
    small = rotate_volume(ref, matrix_xyz=np.eye(3), output_shape_zyx=(12, 12, 12))
    assert _argmax_xyz(small) == (6 + 2, 6 + 1, 6 - 3)


def test_rotate_volume_noise_fill():
    vol = np.ones((16, 16, 16), dtype=np.float32)
    vol[::2] = 3.0
    out = rotate_volume(
        vol, angles_deg=[45.0, 45.0, 0.0], fill="noise", rng=np.random.default_rng(0)
    )
    assert not np.isnan(out).any()
    corner = out[0, 0, 0:3]
    assert np.all(corner != 0.0)


# ----------------------------------------------------------------------------- uniform SO(3)


def test_random_rotations_are_uniform_on_so3():
    """Rotation angle CDF (θ − sin θ)/π (KS test) and uniform rotation axes / first columns."""
    rng = np.random.default_rng(2024)
    m = random_rotations(4000, rng)
    theta = np.radians(rotation_angle_deg(m))

    def cdf(t):
        return (t - np.sin(t)) / np.pi

    assert stats.kstest(theta, cdf).pvalue > 0.01
    # the reference code's SVD draw is not uniform: the test must be able to tell
    u, _, _ = np.linalg.svd(rng.random((4000, 3, 3)))
    u = u * np.sign(np.linalg.det(u))[:, None, None]
    assert stats.kstest(np.radians(rotation_angle_deg(u)), cdf).pvalue < 1e-6
    # axes: each component of a uniform unit vector is uniform on [−1, 1]
    for col in range(3):
        for comp in range(3):
            assert stats.kstest(m[:, comp, col], stats.uniform(-1, 2).cdf).pvalue > 0.001
    # Euler angles drawn the same way: cos(tilt) uniform, rot and psi uniform
    e = random_euler(4000, np.random.default_rng(5))
    assert stats.kstest(np.cos(np.radians(e[:, 1])), stats.uniform(-1, 2).cdf).pvalue > 0.001
    assert stats.kstest(e[:, 0], stats.uniform(-180, 360).cdf).pvalue > 0.001
    assert stats.kstest(e[:, 2], stats.uniform(-180, 360).cdf).pvalue > 0.001


def test_random_rotations_are_reproducible():
    a = random_euler(5, np.random.default_rng(9))
    b = random_euler(5, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- volumes and coordinates


def test_pad_or_crop_keeps_centre_voxel():
    for old, new in ((10, 16), (11, 16), (16, 9), (15, 10)):
        vol = np.zeros((old, old, old), dtype=np.float32)
        vol[old // 2, old // 2, old // 2] = 1.0
        out = pad_or_crop(vol, (new, new, new))
        assert out.shape == (new, new, new)
        assert out[new // 2, new // 2, new // 2] == 1.0


def test_resample_volume_preserves_centre_and_mass():
    n = 32
    g = np.arange(n) - n // 2
    blob = np.exp(
        -(g[:, None, None] ** 2 + g[None, :, None] ** 2 + (g[None, None, :] - 3) ** 2) / 18.0
    )
    out = resample_volume(blob.astype(np.float32), 5.0, 10.0)
    assert out.shape == (16, 16, 16)
    # the density integral in Å³ is kept: sum · angpix³
    assert out.sum() * 10.0**3 == pytest.approx(blob.sum() * 5.0**3, rel=1e-3)
    z, y, x = np.unravel_index(int(np.argmax(out)), out.shape)
    assert (z, y) == (8, 8) and x in (9, 10)  # +3 voxels at 5 Å = +1.5 voxels at 10 Å
    assert resample_volume(blob.astype(np.float32), 5.0, 5.0, box=20).shape == (20, 20, 20)


def test_centered_angst_pixels_round_trip():
    size = np.array([4000, 4000, 2000])
    ts_angpix = 1.35
    # by hand: px_bin1 = c/ts + size/2; at binning 4 divide by 4
    c = np.array([[135.0, -270.0, 0.0]])
    px = centered_angst_to_pixels(c, size, ts_angpix, binning=4)
    np.testing.assert_allclose(px, [[(100 + 2000) / 4, (-200 + 2000) / 4, 1000 / 4]])
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1000, size=(50, 3))
    back = centered_angst_to_pixels(
        pixels_to_centered_angst(pts, size, ts_angpix, 8), size, ts_angpix, 8
    )
    np.testing.assert_allclose(back, pts, atol=1e-9)


def test_rescale_pixels():
    np.testing.assert_allclose(rescale_pixels([[10.0, 20.0, 30.0]], 5.0, 10.0), [[5.0, 10.0, 15.0]])
