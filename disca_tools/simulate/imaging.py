"""Image formation for simulated subtomograms and tomograms: CTF, missing wedge, noise.

The model is the usual 3D approximation of tomographic imaging (as in the simulations of the DISCA
paper, Supplementary Note 1): the density is multiplied in Fourier space by a CTF that depends on the
spatial frequency magnitude and by a binary missing-wedge mask from the tilt range (the continuous
limit of projecting a tilt series and back-projecting it, by the Fourier slice theorem), then
Gaussian noise is added at a requested SNR. Not modelled: discrete tilt sampling, the defocus
gradient across tilted images, dose weighting, B-factor envelopes.

Signs
    ``defocus_um`` follows the paper: −5 µm means 5 µm *underfocus* (the usual imaging condition).
    The physical phase-contrast CTF, ``−(√(1−A²)·sin χ + A·cos χ)`` with
    ``χ = π λ Δz k² − π/2 Cs λ³ k⁴`` and underfocus ``Δz = −defocus`` > 0, is negative at low
    frequency: protein comes out dark, as in real tomograms. Subtomograms for RELION are protein
    positive (white), so the weight returned here is the transfer applied to the *protein-positive*
    map, ``W = √(1−A²)·sin χ + A·cos χ`` (× wedge), positive in its first lobe. The same ``W`` written
    as ``rlnCtfImage`` lets RELION compensate it. Tomograms are made with ``W`` and then negated.

Noise
    SNR = signal variance / noise variance, both over the voxels of the volume (see :func:`add_noise`
    and the set/tomogram functions for which voxels the signal variance is measured over). With
    ``noise_in_wedge`` the noise is white noise filtered by the missing wedge (no CTF: the CTF acts
    on the signal only), rescaled to exactly the requested variance in expectation.

SNR conventions (``snr_convention`` of the subtomogram simulator)
    ``"volume"`` (default): the SNR above, measured on the volume that is written; an SNR of 0.1
    means exactly that in the output. ``"aitom"``: the convention of the simulator used for the DISCA
    paper's Table S1 (AITom's ``reconstruction__simple_convolution``, itself a shortcut of its
    tilt-series back-projection simulator): the noise level is set from the variance ``S`` of the
    CTF × wedge filtered density, ``σ² = S·c/SNR`` with ``c`` = 1 / (fraction of white-noise variance
    that passes CTF × wedge); half of that noise passes the CTF, half a smooth low-pass (the detector
    MTF, Gaussian of σ = 0.2·N frequency pixels); then signal and noise are low-passed to
    ``⌊N·pixel(nm)/4⌋`` frequency pixels (smooth edge of 2), and the wedge and the Nyquist sphere
    applied. The low-pass removes most of the noise, so the variance ratio of the written volume is
    several times the nominal SNR (the simulator reports it as the *effective* SNR): the paper's
    "SNR 0.1" is not a volume SNR of 0.1. See :func:`aitom_radial` and :func:`aitom_noise_level`.

Missing wedge
    The beam is along z; tilting about ``tilt_axis`` (``"y"``: the usual single-axis tilt) by
    ±``tilt_range_deg`` samples the Fourier region ``|kz| ≤ |kx|·tan(θ)`` (``|ky|`` for an x tilt
    axis). ``tilt_range_deg >= 90`` means no wedge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft

_FFT_WORKERS = 2


@dataclass(frozen=True)
class Imaging:
    """Imaging parameters (paper defaults: 300 kV, Cs 2.7 mm, defocus −5 µm, tilt ±60°).

    ``apply_ctf=False`` leaves out the CTF (the wedge still applies); ``tilt_range_deg >= 90`` leaves
    out the wedge. ``noise_in_wedge`` (default) limits the noise to the sampled Fourier region, as
    noise added to the projections and back-projected is (the paper's simulation protocol); False
    gives white 3D noise.
    """

    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    defocus_um: float = -5.0
    tilt_range_deg: float = 60.0
    tilt_axis: str = "y"
    apply_ctf: bool = True
    noise_in_wedge: bool = True

    def __post_init__(self) -> None:
        if self.tilt_axis not in ("x", "y"):
            raise ValueError(f"tilt_axis must be 'x' or 'y', got {self.tilt_axis!r}")
        if not 0.0 <= self.amplitude_contrast < 1.0:
            raise ValueError(f"amplitude_contrast must be in [0, 1), got {self.amplitude_contrast}")
        if self.voltage_kv <= 0:
            raise ValueError(f"voltage must be positive, got {self.voltage_kv}")
        if self.tilt_range_deg <= 0:
            raise ValueError(f"tilt range must be positive, got {self.tilt_range_deg}")


NO_CTF_NO_WEDGE = Imaging(apply_ctf=False, tilt_range_deg=90.0)


def electron_wavelength_angst(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å."""
    v = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


def ctf_1d(k_inv_angst: np.ndarray, imaging: Imaging) -> np.ndarray:
    """The protein-positive transfer ``√(1−A²)·sin χ + A·cos χ`` at spatial frequencies (1/Å)."""
    k = np.asarray(k_inv_angst, dtype=np.float64)
    return _ctf_k2(k * k, imaging)


def _ctf_k2(k2: np.ndarray, imaging: Imaging) -> np.ndarray:
    """The transfer as a function of ``k²`` (1/Å²), computed in the dtype of ``k2``."""
    if not imaging.apply_ctf:
        return np.ones_like(k2)
    lam = electron_wavelength_angst(imaging.voltage_kv)
    dz = -imaging.defocus_um * 1e4  # underfocus in Å (positive for the paper's −5 µm)
    cs = imaging.cs_mm * 1e7
    a = imaging.amplitude_contrast
    # sin(χ + φ) with φ = asin(A) equals √(1−A²)·sin χ + A·cos χ: one transcendental per voxel
    c1 = k2.dtype.type(np.pi * lam * dz)
    c2 = k2.dtype.type(0.5 * np.pi * cs * lam**3)
    chi = k2 * (c1 - c2 * k2)
    chi += k2.dtype.type(math.asin(a))
    return np.sin(chi, out=chi)


def _axis_freqs(n: int, angpix: float, half: bool = False) -> np.ndarray:
    return (np.fft.rfftfreq(n, d=angpix) if half else np.fft.fftfreq(n, d=angpix)).astype(
        np.float64
    )


def _weight_block(
    kz: np.ndarray,
    ky: np.ndarray,
    kx: np.ndarray,
    imaging: Imaging,
    radial: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Weight on the grid spanned by 1D frequency arrays ``[z, y, x]`` (float32, possibly a
    read-only broadcast view: the wedge-only weight does not depend on the tilt axis' frequency).
    ``radial`` (a function of k² in 1/Å²) multiplies in an extra isotropic filter."""
    shape = (kz.size, ky.size, kx.size)
    kz3 = kz.astype(np.float32)[:, None, None]
    ky3 = ky.astype(np.float32)[None, :, None]
    kx3 = kx.astype(np.float32)[None, None, :]
    w = None
    if imaging.apply_ctf or radial is not None:
        k2 = kz3 * kz3 + ky3 * ky3 + kx3 * kx3
        if imaging.apply_ctf:
            w = _ctf_k2(k2, imaging)
        if radial is not None:
            r = radial(k2).astype(np.float32, copy=False)
            w = r if w is None else w * r
    if imaging.tilt_range_deg < 90.0:
        t = np.float32(math.tan(math.radians(imaging.tilt_range_deg)))
        perp = np.abs(kx3) if imaging.tilt_axis == "y" else np.abs(ky3)
        sampled = np.abs(kz3) <= perp * t + np.float32(1e-9)
        w = sampled.astype(np.float32) if w is None else w * sampled
    if w is None:
        w = np.ones((1, 1, 1), dtype=np.float32)
    return np.broadcast_to(w, shape)


def ctf_wedge_weight(
    shape_zyx: tuple[int, int, int], angpix: float, imaging: Imaging, layout: str = "centered"
) -> np.ndarray:
    """The 3D Fourier weight (CTF × missing wedge) for a volume of ``shape_zyx`` at ``angpix``.

    ``layout``: ``"centered"`` (full grid, zero frequency at index ``N // 2``: RELION's cubic 3D CTF
    layout), ``"fft"`` (full grid, numpy FFT order) or ``"rfft"`` (``numpy.fft.rfftn`` half grid:
    ``(nz, ny, nx // 2 + 1)``, zero frequency at [0, 0, 0], i.e. the FFTW half volume).
    """
    nz, ny, nx = (int(s) for s in shape_zyx)
    kz, ky = _axis_freqs(nz, angpix), _axis_freqs(ny, angpix)
    if layout == "rfft":
        return np.ascontiguousarray(
            _weight_block(kz, ky, _axis_freqs(nx, angpix, half=True), imaging)
        )
    w = np.ascontiguousarray(_weight_block(kz, ky, _axis_freqs(nx, angpix), imaging))
    if layout == "fft":
        return w
    if layout == "centered":
        return np.ascontiguousarray(np.fft.fftshift(w))
    raise ValueError(f"unknown layout {layout!r}")


def apply_imaging(
    volume_zyx: np.ndarray,
    angpix: float,
    imaging: Imaging,
    slab: int = 32,
    radial: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Apply CTF and missing wedge to a protein-positive volume (any shape); returns float32.

    The last three axes are ``[z, y, x]``; leading axes are a batch. Works on z slabs of the half
    spectrum so the weight never exists for the whole volume at once. ``radial`` (a function of k²
    in 1/Å²) multiplies in an extra isotropic filter (e.g. :func:`aitom_radial`).
    """
    vol = np.asarray(volume_zyx, dtype=np.float32)
    if not imaging.apply_ctf and imaging.tilt_range_deg >= 90.0 and radial is None:
        return vol.copy()
    return apply_imaging_filters(vol, angpix, imaging, [radial], slab)[0]


def apply_imaging_filters(
    volume_zyx: np.ndarray,
    angpix: float,
    imaging: Imaging,
    radials: Sequence[Callable[[np.ndarray], np.ndarray] | None],
    slab: int = 32,
) -> list[np.ndarray]:
    """:func:`apply_imaging` with each of ``radials`` (None: none), sharing one forward FFT."""
    vol = np.asarray(volume_zyx, dtype=np.float32)
    nz, ny, nx = vol.shape[-3:]
    axes = (-3, -2, -1)
    spec = scipy.fft.rfftn(vol, axes=axes, workers=_FFT_WORKERS)
    kz, ky = _axis_freqs(nz, angpix), _axis_freqs(ny, angpix)
    kx = _axis_freqs(nx, angpix, half=True)
    outs = []
    for i, radial in enumerate(radials):
        filtered = spec if i == len(radials) - 1 else spec.copy()  # the last one may reuse spec
        for z0 in range(0, nz, slab):
            z1 = min(nz, z0 + slab)
            filtered[..., z0:z1, :, :] *= _weight_block(kz[z0:z1], ky, kx, imaging, radial)
        out = scipy.fft.irfftn(filtered, s=(nz, ny, nx), axes=axes, workers=_FFT_WORKERS)
        outs.append(out.astype(np.float32, copy=False))
    return outs


def signal_variance(volume_zyx: np.ndarray, signal_mask: np.ndarray | None = None) -> float:
    """Variance of the noise-free signal: over the whole volume, or over ``signal_mask`` voxels."""
    vol = np.asarray(volume_zyx)
    if signal_mask is not None:
        vals = vol[np.asarray(signal_mask, dtype=bool)]
        if vals.size < 2:
            raise ValueError("signal_mask selects fewer than 2 voxels")
        return float(np.var(vals, dtype=np.float64))
    return float(np.var(vol, dtype=np.float64))


def _wedge_only(imaging: Imaging) -> Imaging | None:
    """The wedge part of ``imaging`` (no CTF), or None when the noise stays white."""
    if imaging is None or not imaging.noise_in_wedge or imaging.tilt_range_deg >= 90.0:
        return None
    return Imaging(
        tilt_range_deg=imaging.tilt_range_deg, tilt_axis=imaging.tilt_axis, apply_ctf=False
    )


def wedge_fraction(shape_zyx: tuple[int, int, int], imaging: Imaging, slab: int = 32) -> float:
    """Fraction of the full Fourier grid inside the sampled (non-missing) region."""
    w = _wedge_only(imaging)
    if w is None:
        return 1.0
    nz, ny, nx = (int(v) for v in shape_zyx)
    kz, ky, kx = _axis_freqs(nz, 1.0), _axis_freqs(ny, 1.0), _axis_freqs(nx, 1.0)
    inside = sum(
        int(np.count_nonzero(_weight_block(kz[z : z + slab], ky, kx, w)))
        for z in range(0, nz, slab)
    )
    return inside / float(nz * ny * nx)


def unit_noise(
    shape: tuple[int, ...], imaging: Imaging | None, rng: np.random.Generator, slab: int = 32
) -> np.ndarray:
    """Gaussian noise of unit expected variance over the last three axes ``[z, y, x]``.

    White, or limited to the sampled Fourier region when ``imaging.noise_in_wedge`` (and a wedge).
    Leading axes are a batch (e.g. ``(N, S, S, S)`` for a set of subtomograms).
    """
    noise = rng.standard_normal(shape, dtype=np.float32)
    w = _wedge_only(imaging)
    if w is None:
        return noise
    nz, ny, nx = shape[-3:]
    axes = (-3, -2, -1)
    spec = scipy.fft.rfftn(noise, axes=axes, workers=_FFT_WORKERS)
    kz, ky, kx = _axis_freqs(nz, 1.0), _axis_freqs(ny, 1.0), _axis_freqs(nx, 1.0, half=True)
    for z0 in range(0, nz, slab):
        spec[..., z0 : z0 + slab, :, :] *= _weight_block(kz[z0 : z0 + slab], ky, kx, w)
    out = scipy.fft.irfftn(spec, s=(nz, ny, nx), axes=axes, workers=_FFT_WORKERS).astype(
        np.float32, copy=False
    )
    out *= np.float32(1.0 / math.sqrt(wedge_fraction((nz, ny, nx), w, slab)))
    return out


def add_noise(
    volume_zyx: np.ndarray,
    snr: float,
    rng: np.random.Generator,
    signal_mask: np.ndarray | None = None,
    signal_var: float | None = None,
    imaging: Imaging | None = None,
) -> np.ndarray:
    """Add Gaussian noise so that SNR = signal variance / noise variance.

    The signal variance is that of the (imaged, noise-free) volume over all its voxels, or over the
    voxels of ``signal_mask`` when given, unless ``signal_var`` states it (e.g. a mean over a set).
    The noise is white unless ``imaging`` has ``noise_in_wedge`` and a wedge (see :func:`unit_noise`).
    ``snr = inf`` returns a float32 copy without noise.
    """
    vol = np.asarray(volume_zyx, dtype=np.float32)
    if snr is None or math.isinf(snr):
        return vol.copy()
    if not snr > 0:
        raise ValueError(f"snr must be positive (or inf), got {snr}")
    var = signal_variance(vol, signal_mask) if signal_var is None else float(signal_var)
    noise = unit_noise(vol.shape, imaging, rng)
    noise *= np.float32(math.sqrt(var / snr))
    noise += vol
    return noise


# ----------------------------------------------------------------------------- AITom's SNR convention

SNR_CONVENTIONS = ("volume", "aitom", "aitom-set")
AITOM_NOISE_FILTERS = ("signal", "variance", "ctf_noise", "mtf_noise")


def _soft_sphere(r: np.ndarray, radius: float, sigma: float) -> np.ndarray:
    """AITom's smooth sphere (``aitom.model.util.sphere_mask``): 1 inside ``radius``, outside
    ``exp(−((r − radius)/sigma)²)`` cut to 0 below ``e⁻³`` (radii in frequency pixels)."""
    out = np.ones_like(r)
    outside = r > radius
    edge = np.exp(-(((r[outside] - radius) / sigma) ** 2))
    out[outside] = np.where(edge < math.exp(-3.0), 0.0, edge)
    return out


def aitom_lowpass_radius(box: int, angpix: float) -> float:
    """AITom's final low-pass radius in frequency pixels of a ``box``³ volume:
    ``⌊(N/8) / Nyquist⌋`` with Nyquist in 1/nm, i.e. ``⌊N · pixel(nm) / 4⌋``."""
    return float(math.floor(box * angpix / 40.0 + 1e-9))


def aitom_radial(box: int, angpix: float, which: str) -> Callable[[np.ndarray], np.ndarray]:
    """The isotropic part of AITom's filters for a ``box``³ volume, as a function of k² (1/Å²).

    ``"signal"``: low-pass² (the density is low-passed before and after imaging) × Nyquist sphere;
    ``"variance"``: the Nyquist sphere alone (the signal variance ``S`` is measured after CTF ×
    wedge × sphere); ``"ctf_noise"``: low-pass × sphere (that noise then passes the CTF);
    ``"mtf_noise"``: low-pass × sphere × the smooth MTF low-pass (radius 1, σ = 0.2·N pixels).
    Combine with the CTF and wedge of an :class:`Imaging` (``apply_imaging(..., radial=...)``).
    """
    if which not in AITOM_NOISE_FILTERS:
        raise ValueError(f"which must be one of {AITOM_NOISE_FILTERS}, got {which!r}")
    scale = float(box) * float(angpix)  # 1/Å → frequency pixels of the box
    lowpass = aitom_lowpass_radius(box, angpix)

    def radial(k2: np.ndarray) -> np.ndarray:
        r = np.sqrt(np.asarray(k2, dtype=np.float64)) * scale
        out = (r <= box / 2.0 + 1e-4).astype(np.float64)  # float32 grids: keep r = N/2
        if which == "variance":
            return out
        bp = _soft_sphere(r, lowpass, 2.0)
        out *= bp * bp if which == "signal" else bp
        if which == "mtf_noise":
            out *= _soft_sphere(r, 1.0, 0.2 * box)
        return out

    return radial


def _mean_power(box: int, angpix: float, imaging: Imaging, which: str) -> float:
    """Mean over the full ``box``³ Fourier grid of the squared filter (= the variance a unit white
    noise keeps after it, by Parseval)."""
    k = _axis_freqs(box, angpix)
    w = _weight_block(k, k, k, imaging, aitom_radial(box, angpix, which))
    return float(np.mean(np.square(w, dtype=np.float64)))


def aitom_noise_level(
    box: int, angpix: float, imaging: Imaging, snr: float, signal_var: float
) -> tuple[float, float]:
    """``(σ, noise variance in the output)`` of AITom's convention for a set whose CTF × wedge ×
    sphere filtered density has variance ``signal_var`` (``σ``: each of the two white noises)."""
    c = 1.0 / max(_mean_power(box, angpix, imaging, "variance"), 1e-12)
    sigma2 = 0.5 * signal_var * c / snr
    mtf = replace(imaging, apply_ctf=False)
    kept = _mean_power(box, angpix, imaging, "ctf_noise") + _mean_power(
        box, angpix, mtf, "mtf_noise"
    )
    return math.sqrt(sigma2), sigma2 * kept


def aitom_noise(
    shape: tuple[int, ...],
    angpix: float,
    imaging: Imaging,
    sigma: float,
    rng: np.random.Generator,
    filter_box: int | None = None,
) -> np.ndarray:
    """AITom's noise for volumes of ``shape`` (last three axes a cube): two white noises of s.d.
    ``sigma``, one through CTF × low-pass, one through the MTF × low-pass, both × wedge × sphere.
    The filters are those of a ``filter_box``³ volume (default the shape's), so noise made in a
    larger box and cropped matches a signal imaged the same way."""
    grid = int(shape[-1])
    box = int(filter_box or grid)
    axes = (-3, -2, -1)
    k, kh = _axis_freqs(grid, angpix), _axis_freqs(grid, angpix, half=True)
    mtf = replace(imaging, apply_ctf=False)
    spec = scipy.fft.rfftn(
        rng.standard_normal(shape, dtype=np.float32), axes=axes, workers=_FFT_WORKERS
    )
    spec *= _weight_block(k, k, kh, imaging, aitom_radial(box, angpix, "ctf_noise"))
    other = scipy.fft.rfftn(
        rng.standard_normal(shape, dtype=np.float32), axes=axes, workers=_FFT_WORKERS
    )
    other *= _weight_block(k, k, kh, mtf, aitom_radial(box, angpix, "mtf_noise"))
    spec += other
    out = scipy.fft.irfftn(spec, s=(grid, grid, grid), axes=axes, workers=_FFT_WORKERS)
    out *= sigma
    return out.astype(np.float32, copy=False)
