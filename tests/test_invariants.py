"""Rotation-invariant shell descriptors (the --init invariants start of the EM loop)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from disca_tools.cluster.invariants import (
    SHELL_L_MAX,
    fourier_descriptor_size,
    fourier_invariant_descriptors,
    rotation_invariant_descriptors,
    shell_descriptor_size,
    standardise_columns,
)
from disca_tools.geometry import rotate_volume


def _smooth_volume(seed: int, box: int = 24) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(box, box, box))
    return gaussian_filter(v, 2.0).astype(np.float32)


def test_grid_rotation_leaves_descriptors_unchanged():
    """A 90° turn about z about the box centre (25³: centre 12 is a voxel) maps the sampling grid
    onto itself, so the descriptors agree to round-off; the radial profile is the shell mean."""
    v = _smooth_volume(0, 25)
    turned = np.rot90(v, k=1, axes=(1, 2)).copy()  # about z, centre (12, 12)
    a, b = rotation_invariant_descriptors(np.stack([v, turned]))
    # shells r = 1 … 11: 11 means, then 66 shell pairs for each of l = 1 … 10
    assert a.shape == (shell_descriptor_size(25, SHELL_L_MAX),) == (11 + 10 * 66,)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    const = rotation_invariant_descriptors(np.full((1, 25, 25, 25), 3.0, np.float32))[0]
    np.testing.assert_allclose(const[:11], 3.0, rtol=1e-5)  # shell means
    np.testing.assert_allclose(const[11:], 0.0, atol=1e-5)  # no l ≥ 1 power


def test_cross_shell_power_sees_shells_turned_against_each_other():
    """Turn the inner ball of a volume by 90° about z against the rest: every shell's own power is
    unchanged (each shell is turned as a whole), but the pairs of an inner and an outer shell are
    not, so only the cross-shell terms tell the two volumes apart."""
    v = _smooth_volume(6, 25)
    z, y, x = np.indices(v.shape) - 12
    inner = np.sqrt(x**2 + y**2 + z**2) < 7.5
    twisted = np.where(inner, np.rot90(v, k=1, axes=(1, 2)), v)
    a, b = rotation_invariant_descriptors(np.stack([v, twisted]))
    r, s = np.triu_indices(11)
    r, s = r + 1, s + 1  # the shell radii of each pair, r ≤ s
    # trilinear samples of shell r reach voxels within r + √3: r ≤ 5 all inner, r ≥ 10 all outer
    same_side = ((r <= 5) & (s <= 5)) | (r >= 10)
    across = (r <= 5) & (s >= 10)
    blocks = [slice(11 + 66 * deg, 11 + 66 * (deg + 1)) for deg in range(10)]  # l = 1 … 10
    for block in blocks:
        np.testing.assert_allclose(a[block][same_side], b[block][same_side], rtol=1e-4, atol=1e-5)
    changed = np.concatenate([np.abs(a[block] - b[block])[across] for block in blocks])
    assert changed.mean() > 0.2 * np.abs(a[11:]).mean()


def test_any_rotation_changes_descriptors_far_less_than_a_different_volume():
    v, other = _smooth_volume(1), _smooth_volume(2)
    rng = np.random.default_rng(3)
    turned = [rotate_volume(v, angles_deg=rng.uniform(0, 180, 3), order=1) for _ in range(3)]
    d = rotation_invariant_descriptors(np.stack([v, other, *turned]))

    def rel(a, b):
        return float(np.abs(a - b).mean() / np.abs(a).mean())

    changes = [rel(d[0], t) for t in d[2:]]
    assert max(changes) < 0.15  # interpolation blur only
    assert rel(d[0], d[1]) > 3 * max(changes)


def test_fourier_descriptors_ignore_shifts_and_grid_rotations():
    """A circular shift leaves the power spectrum unchanged, a 90° turn about z turns it on a grid
    that maps onto itself (25³): both give the same descriptors to round-off."""
    v = _smooth_volume(4, 25)
    shifted = np.roll(v, (3, -2, 5), axis=(0, 1, 2))
    turned = np.rot90(v, k=1, axes=(1, 2)).copy()
    d = fourier_invariant_descriptors(np.stack([v, shifted, turned]))
    assert d.shape == (3, fourier_descriptor_size(25, 6)) == (3, 11 * 4)  # mean, l = 2, 4, 6
    np.testing.assert_allclose(d[1], d[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d[2], d[0], rtol=1e-4, atol=1e-4)
    # the real-space descriptors are about the box centre, so the shift does change them
    a, b = rotation_invariant_descriptors(np.stack([v, shifted]))
    assert np.abs(a - b).mean() > 0.1 * np.abs(a).mean()


def test_fourier_descriptors_follow_size_not_orientation():
    """Two sizes of one blob: the spectra differ far more than any rotation of one of them does."""
    box = 24
    z, y, x = np.indices((box, box, box)) - box // 2
    small = np.exp(-(x**2 / 8 + y**2 / 4 + z**2 / 2) / 2).astype(np.float32)
    large = np.exp(-(x**2 / 32 + y**2 / 16 + z**2 / 8) / 2).astype(np.float32)
    rng = np.random.default_rng(5)
    turned = [rotate_volume(small, angles_deg=rng.uniform(0, 180, 3), order=1) for _ in range(3)]
    d = fourier_invariant_descriptors(np.stack([small, large, *turned]))
    by_rotation = max(float(np.abs(d[0] - t).mean()) for t in d[2:])
    assert float(np.abs(d[0] - d[1]).mean()) > 5 * by_rotation


def test_bad_shapes():
    with pytest.raises(ValueError, match="cubic"):
        rotation_invariant_descriptors(np.zeros((2, 24, 24, 20), np.float32))
    with pytest.raises(ValueError, match="cubic"):
        fourier_invariant_descriptors(np.zeros((2, 24, 20, 24), np.float32))


def test_standardise_columns_works_block_by_block_like_the_direct_formula():
    """Columns are standardised in blocks (no copy of the matrix); the result equals the direct
    (x − mean) / s.d. over all columns, also across block edges, and constant columns become 0."""
    rng = np.random.default_rng(4)
    x = rng.normal(loc=rng.uniform(-50, 50, 40), scale=rng.uniform(0.1, 10, 40), size=(300, 40))
    x[:, 17] = 7.0
    got = standardise_columns(x)
    sd = x.std(axis=0)
    want = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.all(got[:, 17] == 0.0) and not np.shares_memory(got, x)
