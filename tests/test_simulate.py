"""disca_simulate: structures, image formation, subtomogram sets, tomograms and the CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import correlation as _cc  # noqa: E402

from disca_tools.cli.simulate import main as simulate_main
from disca_tools.geometry import euler_to_matrix, rotate_volume
from disca_tools.io.mrc import read_info, read_volume, write_volume
from disca_tools.io.star import read_particles, read_star_blocks
from disca_tools.runtime.errors import UserError
from disca_tools.simulate.imaging import (
    NO_CTF_NO_WEDGE,
    Imaging,
    add_noise,
    aitom_lowpass_radius,
    aitom_noise,
    aitom_noise_level,
    aitom_radial,
    apply_imaging,
    apply_imaging_filters,
    ctf_1d,
    ctf_wedge_weight,
    electron_wavelength_angst,
    unit_noise,
    wedge_fraction,
)
from disca_tools.simulate.structures import list_structures, load_structure, structure_radius_px
from disca_tools.simulate.subtomograms import image_particles, simulate_subtomogram_set
from disca_tools.simulate.tomogram import simulate_tomogram


def _com_xyz(vol: np.ndarray) -> np.ndarray:
    w = np.clip(vol, 0, None).astype(np.float64)
    z, y, x = np.indices(vol.shape)
    return np.array([(w * x).sum(), (w * y).sum(), (w * z).sum()]) / w.sum()


# ----------------------------------------------------------------------------- structures


def test_shipped_structures_and_loading():
    names = list_structures()
    assert len(names) >= 6 and {"4v4r", "3j9i", "4cr2"} <= set(names)
    ribo = load_structure("4V4R", 10.0)  # shipped at 10 Å, box 66: case-insensitive name
    assert ribo.shape == (66, 66, 66) and ribo.dtype == np.float32
    half = load_structure("4v4r", 20.0)
    assert half.shape == (33, 33, 33)
    # protein positive, background ~0, density integral (Å³-weighted) kept by resampling
    assert half.max() > 0 and abs(float(half.min())) < 0.1 * float(half.max())  # Fourier ringing
    assert half.sum() * 20.0**3 == pytest.approx(ribo.sum() * 10.0**3, rel=1e-3)
    assert load_structure("4v4r", 20.0, box=24).shape == (24, 24, 24)
    # extent: ribosome ≈ 27 nm across (NOTICE.md) → radius ≈ 13.5 nm = 13.5 voxels at 10 Å
    # (the radius is about the box centre, the rotation centre, so a little over half the span)
    assert 12.0 < structure_radius_px(ribo) < 18.0
    assert structure_radius_px(load_structure("1s3x", 10.0)) < 6.0  # 7 nm protein


def test_user_map_and_bad_structure(tmp_path):
    g = np.arange(20) - 10
    blob = np.exp(-(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) / 8.0)
    p = write_volume(tmp_path / "blob.mrc", -blob.astype(np.float32) + 3.0, 5.0)  # dark, offset
    vol = load_structure(str(p), 10.0)
    assert vol.shape == (10, 10, 10)
    assert vol[5, 5, 5] == vol.max() > 0  # made protein positive with background 0
    assert abs(float(vol[0, 0, 0])) < 1e-2 * float(vol.max())
    with pytest.raises(UserError, match=r"^nosuch: not a shipped structure"):
        load_structure("nosuch", 10.0)
    with pytest.raises(UserError, match="angpix must be positive"):
        load_structure("4v4r", 0.0)


# ----------------------------------------------------------------------------- imaging


def test_wavelength_at_300kv():
    assert electron_wavelength_angst(300.0) == pytest.approx(0.019687, rel=1e-4)
    assert electron_wavelength_angst(200.0) == pytest.approx(0.025079, rel=1e-4)


def test_ctf_first_zero_and_defocus_sign():
    """W = √(1−A²)·sin χ + A·cos χ = sin(χ + asin A): first zero where χ = π − asin A."""
    im = Imaging()  # 300 kV, Cs 2.7 mm, −5 µm (underfocus), A = 0.07
    lam, dz, cs = electron_wavelength_angst(300.0), 5e4, 2.7e7
    # solve π λ dz k² − π/2 Cs λ³ k⁴ = π − asin(A) for k² (quadratic in k²)
    a_, b_, c_ = 0.5 * np.pi * cs * lam**3, -np.pi * lam * dz, np.pi - math.asin(0.07)
    k0 = math.sqrt((-b_ - math.sqrt(b_ * b_ - 4 * a_ * c_)) / (2 * a_))
    # without Cs: 1/k0 = √(λ·dz / (1 − asin(A)/π)) = √(0.019687·5e4 / 0.97772) = 31.73 Å
    assert 1 / k0 == pytest.approx(31.73, abs=0.1)
    k = np.linspace(0, 1 / 25, 4001)
    w = ctf_1d(k, im)
    assert w[0] == pytest.approx(0.07)  # amplitude contrast at k = 0
    first = k[np.argmax(w < 0)]
    assert first == pytest.approx(k0, rel=2e-3)
    assert np.all(w[k < 0.9 * k0] > 0)  # protein positive in the first lobe
    over = ctf_1d(k[(k > 0.01) & (k < 0.03)], Imaging(defocus_um=+5.0))  # overfocus: inverted
    assert np.all(over < 0)
    assert np.all(ctf_1d(k, Imaging(apply_ctf=False)) == 1.0)


def test_weight_layouts_and_missing_wedge():
    n, angpix = 16, 10.0
    im = Imaging(tilt_range_deg=60.0)
    cen = ctf_wedge_weight((n, n, n), angpix, im)
    fft = ctf_wedge_weight((n, n, n), angpix, im, layout="fft")
    half = ctf_wedge_weight((n, n, n), angpix, im, layout="rfft")
    np.testing.assert_array_equal(cen, np.fft.fftshift(fft))
    np.testing.assert_array_equal(half, fft[:, :, : n // 2 + 1])
    c = n // 2
    assert cen[c, c, c] == pytest.approx(0.07)  # origin at N/2 (RELION's cubic layout)
    # wedge about y, beam along z: kz axis missing, kx axis and ky axis sampled
    assert cen[c + 3, c, c] == 0.0
    assert cen[c, c, c + 3] != 0.0 and cen[c, c + 3, c] != 0.0
    # boundary: |kz| ≤ |kx|·tan 60°
    assert cen[c + 5, c, c + 3] != 0.0  # 5 ≤ 3·1.732
    assert cen[c + 6, c, c + 3] == 0.0  # 6 > 5.196
    sampled = ctf_wedge_weight((n, n, n), angpix, Imaging(apply_ctf=False, tilt_range_deg=60.0)) > 0
    kz, _, kx = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    frac = sampled[np.hypot(kx, kz) > 2].mean()
    assert frac == pytest.approx(120.0 / 180.0, abs=0.05)  # ±60° of 180° sampled
    assert cen[c + 3, c + 2, c] == 0.0  # tilt axis y: ky does not help
    xaxis = ctf_wedge_weight((n, n, n), angpix, Imaging(apply_ctf=False, tilt_axis="x"))
    assert xaxis[c + 3, c + 2, c] == 1.0 and xaxis[c + 3, c, c + 2] == 0.0  # |kz| ≤ |ky|·tan 60°
    assert xaxis[c, c, c + 3] == 1.0  # the kz = 0 plane is always sampled
    assert np.all(ctf_wedge_weight((n, n, n), angpix, NO_CTF_NO_WEDGE) == 1.0)


def test_apply_imaging_is_the_fourier_product_on_any_shape():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((20, 12, 15)).astype(np.float32)
    im = Imaging(tilt_range_deg=45.0)
    direct = np.real(np.fft.ifftn(np.fft.fftn(vol) * ctf_wedge_weight(vol.shape, 8.0, im, "fft")))
    np.testing.assert_allclose(apply_imaging(vol, 8.0, im, slab=7), direct, atol=1e-4)
    np.testing.assert_array_equal(apply_imaging(vol, 8.0, NO_CTF_NO_WEDGE), vol)


def test_imaged_protein_stays_positive():
    ref = load_structure("3j9i", 14.0, box=24)
    img = apply_imaging(ref, 14.0, Imaging())
    assert _cc(img, ref) > 0.5  # the first CTF lobe dominates: same contrast, not inverted


def test_add_noise_snr():
    rng = np.random.default_rng(1)
    clean = load_structure("4v4r", 14.0, box=40)
    noisy = add_noise(clean, 0.1, rng)
    measured = clean.var() / (noisy - clean).var()
    assert measured == pytest.approx(0.1, rel=0.03)
    mask = clean > 0.1 * clean.max()
    noisy_m = add_noise(clean, 0.5, rng, signal_mask=mask)
    assert clean[mask].var() / (noisy_m - clean).var() == pytest.approx(0.5, rel=0.03)
    assert np.array_equal(add_noise(clean, math.inf, rng), clean)
    with pytest.raises(ValueError):
        add_noise(clean, 0.0, rng)


def test_noise_limited_to_the_wedge_unit_variance():
    rng = np.random.default_rng(3)
    im = Imaging(tilt_range_deg=45.0)
    noise = unit_noise((40, 24, 24, 24), im, rng)
    assert noise.var() == pytest.approx(1.0, rel=0.02)
    missing = (
        ctf_wedge_weight((24, 24, 24), 10.0, Imaging(apply_ctf=False, tilt_range_deg=45.0), "fft")
        == 0
    )
    power = np.abs(np.fft.fftn(noise, axes=(1, 2, 3))) ** 2
    assert power[:, missing].mean() < 1e-8 * power[:, ~missing].mean()
    assert wedge_fraction((24, 24, 24), im) == pytest.approx(1 - missing.mean())
    white = unit_noise((40, 24, 24, 24), Imaging(tilt_range_deg=45.0, noise_in_wedge=False), rng)
    wp = np.abs(np.fft.fftn(white, axes=(1, 2, 3))) ** 2
    assert wp[:, missing].mean() == pytest.approx(wp[:, ~missing].mean(), rel=0.05)
    assert unit_noise((8, 8, 8), NO_CTF_NO_WEDGE, rng).var() == pytest.approx(1.0, rel=0.3)


# ----------------------------------------------------------------------------- subtomogram sets


def test_subtomogram_set_shapes_labels_snr(small_subtomogram_set):
    s = small_subtomogram_set
    assert s.volumes.shape == (30, 24, 24, 24) and s.volumes.dtype == np.float32
    assert sorted(np.bincount(s.labels)) == [10, 10, 10]
    assert s.class_names == ["1bxn", "3j9i", "4v4r"]
    assert set(s.references) == set(s.class_names)
    assert all(r.shape == (24, 24, 24) for r in s.references.values())
    assert s.angles_deg.shape == (30, 3) and s.shifts_xyz.shape == (30, 3)
    assert np.all(np.abs(s.shifts_xyz) <= 1.0) and np.abs(s.shifts_xyz).max() > 0.3
    assert s.labels[:10].tolist() != sorted(s.labels[:10].tolist())  # shuffled


def test_subtomogram_set_measured_snr_and_reproducible():
    args = (["1bxn", "3j9i"], 20, 24, 14.0, 0.05, Imaging(), 7)
    s, clean = simulate_subtomogram_set(*args, return_clean=True)
    noise = s.volumes - clean
    measured = float(np.mean(clean.reshape(len(s), -1).var(axis=1)) / noise.var())
    assert measured == pytest.approx(0.05, rel=0.03)
    again = simulate_subtomogram_set(*args)
    np.testing.assert_array_equal(again.volumes, s.volumes)
    np.testing.assert_array_equal(again.angles_deg, s.angles_deg)
    other = simulate_subtomogram_set(["1bxn", "3j9i"], 20, 24, 14.0, 0.05, Imaging(), 8)
    assert not np.array_equal(other.angles_deg, s.angles_deg)


def _radius_px(box: int) -> np.ndarray:
    k = np.fft.fftfreq(box) * box
    return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)


def test_aitom_noise_level_from_first_principles():
    """No CTF, no wedge: σ² = ½·S·c/SNR with c = 1 / (fraction of the grid inside Nyquist), and the
    output noise keeps exactly the predicted variance, all of it inside the low-pass."""
    box, angpix, snr, s_var = 24, 10.0, 0.1, 3.0
    assert aitom_lowpass_radius(24, 10.0) == 6 and aitom_lowpass_radius(24, 14.0) == 8
    r = _radius_px(box)
    inside_nyquist = float(np.mean(r <= box / 2))
    sigma, out_var = aitom_noise_level(box, angpix, NO_CTF_NO_WEDGE, snr, s_var)
    assert sigma**2 == pytest.approx(0.5 * s_var / inside_nyquist / snr, rel=1e-6)
    noise = aitom_noise(
        (64, box, box, box), angpix, NO_CTF_NO_WEDGE, sigma, np.random.default_rng(0)
    )
    assert noise.var() == pytest.approx(out_var, rel=0.03)
    assert out_var < 0.15 * (2 * sigma**2)  # most of the two nominal noises is low-passed away
    power = (np.abs(np.fft.fftn(noise, axes=(1, 2, 3))) ** 2).mean(axis=0)
    assert power[r > 6 + 5 * 2].sum() < 1e-4 * power.sum()  # the Gaussian edge (σ 2) beyond 6


def test_aitom_noise_respects_the_wedge():
    im = Imaging(tilt_range_deg=45.0)
    sigma, _ = aitom_noise_level(24, 14.0, im, 0.1, 1.0)
    noise = aitom_noise((20, 24, 24, 24), 14.0, im, sigma, np.random.default_rng(1))
    missing = (
        ctf_wedge_weight((24, 24, 24), 14.0, Imaging(apply_ctf=False, tilt_range_deg=45.0), "fft")
        == 0
    )
    power = np.abs(np.fft.fftn(noise, axes=(1, 2, 3))) ** 2
    assert power[:, missing].mean() < 1e-8 * power[:, ~missing].mean()


def test_several_filters_from_one_fft_equal_separate_calls():
    vols = np.random.default_rng(2).normal(size=(3, 20, 20, 20)).astype(np.float32)
    im = Imaging(tilt_range_deg=50.0)
    radials = [aitom_radial(20, 14.0, "variance"), None, aitom_radial(20, 14.0, "signal")]
    together = apply_imaging_filters(vols, 14.0, im, radials, slab=7)
    for out, radial in zip(together, radials, strict=True):
        np.testing.assert_allclose(out, apply_imaging(vols, 14.0, im, radial=radial), atol=1e-6)
    assert not np.allclose(together[0], together[1], atol=1e-3)  # the filters did differ


def test_subtomogram_set_aitom_convention_reports_its_effective_snr():
    args = (["1bxn", "3j9i"], 16, 24, 14.0, 0.05, Imaging(), 7)
    s, clean = simulate_subtomogram_set(*args, return_clean=True, snr_convention="aitom")
    assert s.snr == 0.05 and s.snr_convention == "aitom"
    measured = float(np.mean(clean.reshape(len(s), -1).var(axis=1)) / (s.volumes - clean).var())
    assert s.effective_snr == pytest.approx(measured, rel=0.05)
    assert s.effective_snr > 1.3 * s.snr  # the paper's nominal SNR understates the volume's
    # the written signal is low-passed at ⌊24·1.4/4⌋ = 8 pixels (edge σ 2)
    power = (np.abs(np.fft.fftn(clean, axes=(1, 2, 3))) ** 2).mean(axis=0)
    assert power[_radius_px(24) > 8 + 5 * 2].sum() < 1e-4 * power.sum()
    # same orientations and labels as the volume convention: only the image formation differs
    v = simulate_subtomogram_set(*args)
    np.testing.assert_array_equal(v.angles_deg, s.angles_deg)
    assert v.effective_snr == 0.05
    with pytest.raises(ValueError, match="snr_convention"):
        simulate_subtomogram_set(*args, snr_convention="projection")


@pytest.mark.parametrize("convention", ["volume", "aitom"])
def test_no_frequency_of_a_subtomogram_has_signal_without_noise(convention):
    """Signal and noise are made in the imaging box and cropped alike: the crop spreads signal
    into the frequencies the wedge and low-pass removed, and must spread noise there too, or a
    classifier could read the class from noise-free frequencies (as it could when only the
    signal was cropped: there the ratio below was ~10¹⁴)."""
    s, clean = simulate_subtomogram_set(
        ["4v4r", "3j9i"], 30, 24, 14.0, 0.05, Imaging(), 4, return_clean=True,
        snr_convention=convention,
    )  # fmt: skip
    signal = (np.abs(np.fft.rfftn(clean, axes=(1, 2, 3))) ** 2).mean(axis=0)
    noise = (np.abs(np.fft.rfftn(s.volumes - clean, axes=(1, 2, 3))) ** 2).mean(axis=0)
    per_frequency = signal / np.maximum(noise, 1e-30)
    assert per_frequency.max() < 1000 * signal.sum() / noise.sum()


def test_aitom_noise_level_is_per_particle_and_aitom_set_one_level_for_the_set():
    """AITom's do_reconstruction sets each particle's noise from its own filtered density, so a
    big structure gets more noise than a small one at the same nominal SNR; aitom-set does not."""
    args = (["4v4r", "1bxn"], 12, 24, 14.0, 0.05, Imaging(), 3)
    per, clean = simulate_subtomogram_set(*args, return_clean=True, snr_convention="aitom")
    one, clean_one = simulate_subtomogram_set(*args, return_clean=True, snr_convention="aitom-set")
    np.testing.assert_array_equal(clean, clean_one)  # the conventions differ in the noise only
    maps = [load_structure(n, 14.0) for n in per.class_names]
    _, variance = image_particles(
        maps, per.labels, per.angles_deg, per.shifts_xyz, 24, 14.0, Imaging(), True, None, 1.0
    )
    big, small = per.labels == 0, per.labels == 1
    assert variance[big].mean() > 3 * variance[small].mean()  # the ribosome has far more density

    def noise_var(s, c):
        return (s.volumes - c).reshape(len(s), -1).var(axis=1)

    ratio = noise_var(per, clean) / variance
    assert ratio.std() < 0.15 * ratio.mean()  # noise ∝ the particle's own density
    level = noise_var(one, clean)
    assert level.std() < 0.15 * level.mean()  # one level for the set
    assert noise_var(per, clean)[big].mean() > 3 * noise_var(per, clean)[small].mean()
    assert per.noise_sigma**2 == pytest.approx(noise_var(per, clean).mean(), rel=0.1)


@pytest.mark.parametrize("convention", ["volume", "aitom"])
def test_image_particles_at_given_poses_reproduces_the_simulated_set(convention):
    """image_particles is the set's noise-free imaging: at the set's poses it gives its clean
    volumes, and imaging another structure at the same poses gives that structure's volumes."""
    args = (["1bxn", "3j9i"], 6, 24, 14.0, 0.05, Imaging(), 5)
    s, clean = simulate_subtomogram_set(*args, return_clean=True, snr_convention=convention)
    maps = [load_structure(n, 14.0) for n in s.class_names]
    aitom = convention == "aitom"
    again, variance = image_particles(
        maps, s.labels, s.angles_deg, s.shifts_xyz, 24, 14.0, Imaging(), aitom, max_shift_px=1.0
    )
    np.testing.assert_array_equal(again, clean)
    assert (variance is not None) == aitom
    swapped, _ = image_particles(
        maps, 1 - s.labels, s.angles_deg, s.shifts_xyz, 24, 14.0, Imaging(), aitom
    )
    other = simulate_subtomogram_set(
        ["3j9i", "1bxn"], 6, 24, 14.0, math.inf, Imaging(), 5, snr_convention=convention
    )
    np.testing.assert_array_equal(other.angles_deg, s.angles_deg)  # same draws, maps swapped
    np.testing.assert_allclose(swapped, other.volumes, atol=1e-5 * np.abs(clean).max())
    assert _cc(swapped[0], clean[0]) < 0.9  # the other structure really is different


def test_subtomogram_ground_truth_angles_and_shifts():
    """Un-rotating each noise-free subtomogram by its angles gives its reference; shifts move it."""
    s = simulate_subtomogram_set(
        ["3j9i", "1bxn"], 4, 32, 10.0, math.inf, NO_CTF_NO_WEDGE, 3, max_shift_px=2.0
    )
    full = {n: load_structure(n, 10.0) for n in s.class_names}
    for i in range(len(s)):
        name = s.class_names[s.labels[i]]
        centred = rotate_volume(full[name], angles_deg=s.angles_deg[i], output_shape_zyx=(32,) * 3)
        moved = _com_xyz(s.volumes[i]) - _com_xyz(centred)
        np.testing.assert_allclose(moved, s.shifts_xyz[i], atol=0.15)
        # back to the reference frame: sub(x) = ref(M(x − c − d) + c) ⇒ ref(y) = sub(Mᵀ(y − c) + c + d),
        # which is rotate_volume with matrix Mᵀ and offset e = −M·d
        m = euler_to_matrix(s.angles_deg[i])
        back = rotate_volume(s.volumes[i], matrix_xyz=m.T, center_offset_xyz=-(m @ s.shifts_xyz[i]))
        ref = s.references[name]
        assert _cc(back, ref) > 0.9
        other = s.references[s.class_names[1 - s.labels[i]]]
        assert _cc(back, ref) > _cc(back, other) + 0.1


# ----------------------------------------------------------------------------- tomograms


def test_tomogram_particles_placed_without_overlap(small_tomogram):
    t = small_tomogram
    p = t.particles
    assert t.volume_zyx.shape == t.clean_zyx.shape == (64, 160, 160)
    assert list(p.columns) == [
        "x_px",
        "y_px",
        "z_px",
        "class_number",
        "class_name",
        "rot",
        "tilt",
        "psi",
    ]
    assert len(p) == 12 and sorted(p["class_number"].value_counts().tolist()) == [4, 4, 4]
    xyz = p[["x_px", "y_px", "z_px"]].to_numpy()
    r = np.array([t.radii_px[n] for n in p["class_name"]])
    assert np.all(xyz - r[:, None] >= -1) and np.all(
        xyz + r[:, None] <= np.array([160, 160, 64]) + 1
    )
    d = np.linalg.norm(xyz[:, None] - xyz[None], axis=2) + np.eye(len(p)) * 1e9
    assert np.all(d >= r[:, None] + r[None, :])
    assert all(p["class_name"][i] == t.class_names[p["class_number"][i] - 1] for i in range(len(p)))


def test_tomogram_protein_dark_and_snr(small_tomogram):
    t = small_tomogram
    # the same placement without CTF/wedge (same seed: noise is drawn after placement)
    plain = simulate_tomogram(
        ["1bxn", "3j9i", "4v4r"], (160, 160, 64), 12, 14.0, math.inf, NO_CTF_NO_WEDGE, seed=0
    )
    assert plain.particles.equals(t.particles)
    assert plain.clean_zyx.min() < -5 * plain.clean_zyx.max()  # protein dark, background ~0
    assert _cc(t.clean_zyx, plain.clean_zyx) > 0.3  # the CTF keeps that contrast
    noise = t.volume_zyx - t.clean_zyx
    assert abs(float(noise.mean())) < 0.05 * float(noise.std())
    assert t.signal_variance / noise.var() == pytest.approx(0.5, rel=0.03)


def test_tomogram_ground_truth_coordinates_and_angles():
    t = simulate_tomogram(
        ["3j9i", "1bxn"], (120, 120, 60), 6, 10.0, math.inf, NO_CTF_NO_WEDGE, seed=4
    )
    for _, row in t.particles.iterrows():
        x, y, z = int(row.x_px), int(row.y_px), int(row.z_px)
        box = -t.clean_zyx[z - 16 : z + 16, y - 16 : y + 16, x - 16 : x + 16]  # protein positive
        if box.shape != (32, 32, 32):
            continue
        m = euler_to_matrix([row.rot, row.tilt, row.psi])
        back = rotate_volume(box, matrix_xyz=m.T)
        ref = load_structure(row.class_name, 10.0, box=32)
        assert _cc(back, ref) > 0.85, row.class_name


def test_tomogram_too_crowded_is_a_user_error():
    with pytest.raises(UserError, match="--n-particles 60: could only place"):
        simulate_tomogram(["4v4r"], (64, 64, 40), 60, 10.0, 1.0, Imaging(), seed=0)


# ----------------------------------------------------------------------------- CLI


def test_cli_subtomograms_outputs(simulated_subtomogram_project, monkeypatch):
    monkeypatch.chdir(simulated_subtomogram_project)
    table = read_particles("Sim/particles.star")
    df = table.particles
    assert len(df) == 24 and table.image_angpix() == 14.0
    assert int(table.optics["rlnImageSize"].iloc[0]) == 24
    assert int(table.optics["rlnImageDimensionality"].iloc[0]) == 3
    assert sorted(df["rlnClassNumber"].value_counts().tolist()) == [8, 8, 8]
    assert df["rlnImageName"].iloc[0] == "Sim/Subtomograms/sub_000001.mrc"
    assert set(df["rlnCtfImage"]) == {"Sim/ctf.mrc"}
    assert (
        np.abs(df[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy()).max()
        <= 14.0
    )
    store = np.load("Sim/subtomograms.npy", mmap_mode="r")
    names = Path("Sim/subtomograms_names.txt").read_text().split()
    assert store.shape == (24, 24, 24, 24) and store.dtype == np.float32
    assert names == df["rlnImageName"].tolist()
    for i in (0, 23):
        vol, angpix = read_volume(names[i])
        assert angpix == pytest.approx(14.0)
        np.testing.assert_array_equal(vol, store[i])
    ctf, _ = read_volume("Sim/ctf.mrc")
    assert ctf.shape == (24, 24, 24) and ctf[12, 12, 12] == pytest.approx(0.07)
    classes = Path("Sim/classes.tsv").read_text().splitlines()
    assert classes == [
        "class_number\tclass_name\tsource",
        "1\t1bxn\t1bxn",
        "2\t3j9i\t3j9i",
        "3\t4v4r\t4v4r",
    ]
    for n in ("1bxn", "3j9i", "4v4r"):
        assert read_info(f"Sim/references/{n}.mrc").shape_xyz == (24, 24, 24)
    assert Path("Sim/note.txt").read_text().count("disca_simulate subtomograms --o Sim") == 1
    # refuses to overwrite: exit 2, nothing changed
    before = Path("Sim/particles.star").read_bytes()
    assert simulate_main(["subtomograms", "--o", "Sim", "--structures", "1bxn", "-q"]) == 2
    assert Path("Sim/particles.star").read_bytes() == before


def test_cli_float16_store_and_no_noise(project_dir):
    args = [
        "subtomograms",
        "--o",
        "F",
        "--structures",
        "1bxn,3j9i",
        "--n-per-class",
        "3",
        "--box",
        "16",
    ]
    args += ["--angpix", "16", "--snr", "inf", "--float16", "--no-ctf", "--tilt-range", "90", "-q"]
    assert simulate_main(args) == 0
    store = np.load("F/subtomograms.npy")
    assert store.dtype == np.float16 and store.shape == (6, 16, 16, 16)
    vol, _ = read_volume("F/Subtomograms/sub_000001.mrc")
    assert read_info("F/Subtomograms/sub_000001.mrc").dtype == np.float32
    np.testing.assert_allclose(
        store[0].astype(np.float32), vol, rtol=2e-3, atol=1e-3 * np.abs(vol).max()
    )
    assert np.all(read_volume("F/ctf.mrc")[0] == 1.0)
    # --overwrite with fewer particles and a trailing slash: clean names, no stale files
    args[2] = "F/"
    args[args.index("--n-per-class") + 1] = "1"
    assert simulate_main(args) == 2  # refuses without --overwrite
    assert simulate_main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in Path("F/Subtomograms").iterdir()) == [
        "sub_000001.mrc",
        "sub_000002.mrc",
    ]
    names = Path("F/subtomograms_names.txt").read_text().split()
    assert names == ["F/Subtomograms/sub_000001.mrc", "F/Subtomograms/sub_000002.mrc"]
    assert read_particles("F/particles.star").particles["rlnImageName"].tolist() == names


def test_cli_aitom_convention_records_the_effective_snr(project_dir):
    args = ["subtomograms", "--o", "A", "--structures", "1bxn", "--n-per-class", "4", "--box", "24"]
    assert (
        simulate_main([*args, "--angpix", "14", "--snr", "0.1", "--snr-convention", "aitom", "-q"])
        == 0
    )
    import json

    results = json.loads(Path("A/run.json").read_text())["results"]
    assert results["snr_convention"] == "aitom"
    assert results["effective_snr"] > 0.1
    assert results["noise_sigma"] > 0


def test_cli_bad_input_writes_nothing(project_dir, capsys):
    assert simulate_main(["subtomograms", "--o", "X", "--structures", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch: not a shipped structure" in err[0]
    assert not Path("X").exists()
    assert (
        simulate_main(["tomogram", "--o", "X", "--structures", "1bxn", "--shape", "100,100"]) == 2
    )
    assert "--shape" in capsys.readouterr().err
    assert simulate_main(["subtomograms", "--o", "X", "--structures", "1bxn", "--snr", "-1"]) == 2
    assert not Path("X").exists()
    assert simulate_main(["nonsense", "--o", "X"]) == 2
    capsys.readouterr()
    for bad in (
        ["tomogram", "--o", "X", "--structures", "1bxn", "--snr-convention", "aitom"],
        [
            "subtomograms",
            "--o",
            "X",
            "--structures",
            "1bxn",
            "--snr-convention",
            "aitom",
            "--white-noise",
        ],
    ):
        assert simulate_main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("disca_simulate: error: --"), err
    assert not Path("X").exists()
    Path("fake.mrc").write_text("not a map\n" * 200)
    assert simulate_main(["subtomograms", "--o", "X", "--structures", "fake.mrc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fake.mrc: not an MRC file" in err[0]
    assert not Path("X").exists()


def test_bin_wrapper_bad_input_exit_2_one_line(project_dir):
    """The installed-style executable: one line on stderr, exit 2, no traceback, nothing written."""
    exe = Path(__file__).resolve().parent.parent / "bin" / "disca_simulate"
    res = subprocess.run(
        [sys.executable, str(exe), "tomogram", "--o", "Y", "--structures", "4v4r", "--snr", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == "disca_simulate: error: --snr: must be positive or inf, got 0.0"
    assert not Path("Y").exists()


def test_cli_tomogram_outputs(project_dir):
    args = ["tomogram", "--o", "T", "--structures", "3j9i", "1bxn", "--shape", "96,80,40"]
    args += "--n-particles 4 --angpix 12 --snr 0.5 --seed 1 --no-ctf --tilt-range 90 -q".split()
    assert simulate_main(args) == 0
    tomo, angpix = read_volume("T/tomogram.mrc")
    clean, _ = read_volume("T/tomogram_noisefree.mrc")
    assert tomo.shape == clean.shape == (40, 80, 96) and angpix == pytest.approx(12.0)
    t31 = read_particles("T/particles.star")
    assert len(t31) == 4 and set(t31.particles["rlnMicrographName"]) == {"T/tomogram.mrc"}
    assert clean.min() < -5 * clean.max()  # no CTF, no wedge: protein dark, background ~0
    t5 = read_particles("T/relion5/particles.star")
    np.testing.assert_allclose(t5.coords_at(12.0), t31.coords_px, atol=1e-6)
    blocks = read_star_blocks("T/relion5/optimisation_set.star")
    assert "T/relion5/tomograms.star" in str(blocks)
    np.testing.assert_array_equal(
        t5.particles["rlnClassNumber"].to_numpy(int), t31.particles["rlnClassNumber"].to_numpy(int)
    )


def test_cli_as_relion_external_job(project_dir, capsys):
    """RELION passes parameters as --label value: the mode can be given as --mode."""
    Path("External/job007").mkdir(parents=True)
    args = ["--o", "External/job007/", "--mode", "subtomograms", "--structures", "1bxn"]
    args += ["--n-per-class", "2", "--box", "16", "--angpix", "16", "--j", "1", "-q"]
    assert simulate_main(args) == 0
    job = Path("External/job007")
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert "External/job007/particles.star" in (job / "RELION_OUTPUT_NODES.star").read_text()
    names = read_particles(job / "particles.star").particles["rlnImageName"].tolist()
    assert names == [
        "External/job007/Subtomograms/sub_000001.mrc",
        "External/job007/Subtomograms/sub_000002.mrc",
    ]
    assert simulate_main(["--o", "Q", "--structures", "1bxn"]) == 2
    assert "mode: say what to simulate" in capsys.readouterr().err
