"""Simulated subtomogram sets with ground truth (the DISCA paper's Table S1 protocol).

Each structure is resampled to the voxel size, given a uniform random orientation on SO(3) and a
small random shift, rotated with :func:`disca_tools.geometry.rotate_volume` (RELION's convention, so
the ground-truth angles and origins can be handed to RELION as they are), imaged (CTF + missing
wedge, :mod:`.imaging`) and given Gaussian noise at the requested SNR.

Output values are the image-formation output, protein positive, *not* normalised: writers and the
extractor normalise where they need to. In the default (``"volume"``) SNR convention the noise level
is one for the whole set:
``noise variance = mean over the set of each noise-free imaged subtomogram's variance (whole box) / SNR``,
so every subtomogram of a set has the same noise level, as in a real data set. The noise is limited
to the sampled Fourier region (``Imaging.noise_in_wedge``, default) or white. Signal and noise are
both made in the larger imaging box and cropped, as a subtomogram is cut from a tomogram.

``snr_convention="aitom"`` follows instead the simulator behind the paper's Table S1 (see
:mod:`.imaging`): the noise level comes from each particle's variance of the CTF × wedge filtered
density and the nominal SNR (``"aitom-set"``: from the set's mean of it), and signal and noise are
then low-passed, so the written volumes have a higher variance ratio than the nominal SNR; it is
reported as ``SubtomogramSet.effective_snr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..geometry import pad_or_crop, random_euler, rotate_volume
from ..runtime.log import progress
from .imaging import (
    SNR_CONVENTIONS,
    Imaging,
    aitom_noise,
    aitom_noise_level,
    aitom_radial,
    apply_imaging,
    apply_imaging_filters,
    unit_noise,
)
from .structures import load_structure, structure_label, structure_radius_px


@dataclass
class SubtomogramSet:
    """Simulated subtomograms and their ground truth.

    volumes: ``(N, S, S, S)`` float32, ``[n, z, y, x]``. labels: ``(N,)`` 0-based class index into
    ``class_names``. angles_deg: ``(N, 3)`` RELION ZYZ (rot, tilt, psi). shifts_xyz: ``(N, 3)`` voxels,
    the particle centre relative to the box centre (``N // 2``); RELION's origin is ``−shift·angpix``.
    references: noise-free, un-rotated maps at the output sampling (box ``S``), keyed by class name.
    noise_sigma: the standard deviation of the added noise in the written volumes (0 for ``snr = inf``;
    its root mean square over the set where the level is per particle, ``"aitom"``).
    snr: the nominal SNR in ``snr_convention``; effective_snr: mean signal variance of the written
    volumes / noise variance in them (equal to ``snr`` in the ``"volume"`` convention).
    """

    volumes: np.ndarray
    labels: np.ndarray
    angles_deg: np.ndarray
    shifts_xyz: np.ndarray
    class_names: list[str]
    references: dict[str, np.ndarray]
    angpix: float = 1.0
    snr: float = math.inf
    imaging: Imaging = field(default_factory=Imaging)
    noise_sigma: float = 0.0
    signal_variance: float = 0.0
    snr_convention: str = "volume"
    effective_snr: float = math.inf

    def __len__(self) -> int:
        return int(self.volumes.shape[0])

    @property
    def box(self) -> int:
        return int(self.volumes.shape[-1])


def simulate_subtomogram_set(
    structures: list[str],
    n_per_class: int,
    box: int,
    angpix: float,
    snr: float,
    imaging: Imaging,
    seed: int,
    max_shift_px: float = 1.0,
    return_clean: bool = False,
    image_box: int | None = None,
    snr_convention: str = "volume",
) -> SubtomogramSet | tuple[SubtomogramSet, np.ndarray]:
    """Simulate ``n_per_class`` subtomograms (box ``box``) of each structure, shuffled.

    ``structures`` are shipped names or MRC paths (one class each, in order). Shifts are uniform in
    ``[−max_shift_px, max_shift_px]`` per axis. ``snr = inf`` adds no noise. With ``return_clean``
    also returns the noise-free imaged volumes (to measure the SNR). Each particle is imaged in a
    box of ``image_box`` (default ``box + 2·⌈box/4⌉``: room for the CTF's delocalisation, no
    wrap-around) and cropped to ``box``. ``snr_convention``: ``"volume"``, ``"aitom"`` or
    ``"aitom-set"`` (module docstring).
    """
    if not structures:
        raise ValueError("no structures given")
    if n_per_class < 1 or box < 4 or angpix <= 0:
        raise ValueError(f"bad sizes: n_per_class={n_per_class}, box={box}, angpix={angpix}")
    if snr is not None and not (snr > 0):
        raise ValueError(f"snr must be positive (or inf), got {snr}")
    if snr_convention not in SNR_CONVENTIONS:
        raise ValueError(f"snr_convention must be one of {SNR_CONVENTIONS}, got {snr_convention!r}")
    aitom = snr_convention.startswith("aitom")
    rng = np.random.default_rng(seed)
    names = [structure_label(s) for s in structures]
    if len(set(names)) != len(names):
        raise ValueError(f"structures named twice: {names}")
    maps = [load_structure(s, angpix) for s in structures]
    references = {n: load_structure(s, angpix, box) for n, s in zip(names, structures, strict=True)}

    n = n_per_class * len(structures)
    labels = rng.permutation(np.repeat(np.arange(len(structures)), n_per_class))
    angles = random_euler(n, rng)
    shifts = (
        rng.uniform(-max_shift_px, max_shift_px, size=(n, 3))
        if max_shift_px > 0
        else np.zeros((n, 3))
    )
    clean, aitom_var = image_particles(
        maps, labels, angles, shifts, box, angpix, imaging, aitom, image_box, max_shift_px
    )

    sig_var = float(np.mean(np.var(clean.reshape(n, -1), axis=1, dtype=np.float64)))
    if snr is None or math.isinf(snr):
        volumes, sigma, effective = (clean.copy() if return_clean else clean), 0.0, math.inf
    else:
        if aitom:
            # per particle: the noise's s.d. scales with √S (aitom_noise_level is linear in S)
            per_particle = aitom_var if snr_convention == "aitom" else np.full(n, aitom_var.mean())
            white_sd, noise_var = aitom_noise_level(box, angpix, imaging, snr, 1.0)
            white_sd = white_sd * np.sqrt(per_particle)
            noise_var = float(np.mean(noise_var * per_particle))
            sigma, effective = math.sqrt(noise_var), sig_var / noise_var
        else:
            sigma, effective = math.sqrt(sig_var / snr), float(snr)
        # without return_clean the noise goes into the same buffer (memory: one copy of the set).
        # The noise is made in the imaging box and cropped, as the signal is: both then leak the
        # same way into the frequencies the filters removed (as in a subtomogram cut from a
        # tomogram), so no frequency of the written volume has signal and no noise
        volumes = clean.copy() if return_clean else clean
        big = image_box_size(box, image_box)
        crop = (slice(None),) + (slice(big // 2 - box // 2, big // 2 - box // 2 + box),) * 3
        step = max(1, (64 * 48**3) // big**3)
        for i0 in range(0, n, step):
            shape = (len(volumes[i0 : i0 + step]), big, big, big)
            if aitom:
                noise = aitom_noise(shape, angpix, imaging, 1.0, rng, filter_box=box)[crop]
                noise *= white_sd[i0 : i0 + step, None, None, None].astype(np.float32)
            else:
                noise = unit_noise(shape, imaging, rng)[crop]
                noise *= np.float32(sigma)
            volumes[i0 : i0 + step] += noise
    result = SubtomogramSet(
        volumes=volumes,
        labels=labels.astype(np.int64),
        angles_deg=angles,
        shifts_xyz=shifts.astype(np.float64),
        class_names=names,
        references=references,
        angpix=float(angpix),
        snr=float(snr),
        imaging=imaging,
        noise_sigma=sigma,
        signal_variance=sig_var,
        snr_convention=snr_convention,
        effective_snr=float(effective),
    )
    return (result, clean) if return_clean else result


def image_box_size(box: int, image_box: int | None = None) -> int:
    """The box particles are imaged in before they are cropped to ``box``: ``image_box``, by
    default ``box + 2·⌈box/4⌉`` (room for the CTF's delocalisation, no wrap-around)."""
    return max(int(image_box or box + 2 * math.ceil(box / 4)), box)


def image_particles(
    maps: list[np.ndarray],
    labels: np.ndarray,
    angles_deg: np.ndarray,
    shifts_xyz: np.ndarray,
    box: int,
    angpix: float,
    imaging: Imaging,
    aitom: bool = False,
    image_box: int | None = None,
    max_shift_px: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Noise-free imaged particles: ``maps[labels[i]]`` rotated by ``angles_deg[i]`` (RELION ZYZ),
    shifted by ``shifts_xyz[i]`` voxels, imaged (CTF, wedge; with ``aitom`` AITom's signal
    low-pass) in a box of ``image_box`` (default ``box + 2·⌈box/4⌉``) and cropped to ``box``.
    ``max_shift_px``: the largest shift the rotation boxes allow for (default: the largest given).

    Returns ``(volumes (N, box, box, box) float32, per-particle variance of the CTF × wedge ×
    sphere filtered density that sets AITom's noise level, or None without aitom)``. This is the
    noise-free part of :func:`simulate_subtomogram_set`, for any poses.
    """
    n = len(labels)
    if max_shift_px is None:
        max_shift_px = float(np.max(np.abs(shifts_xyz))) if n else 0.0
    # image a larger box around each particle and crop: the CTF and wedge spread density beyond
    # the box as they do in a tomogram, and nothing wraps around (periodic FFT) into the crop
    big = image_box_size(box, image_box)
    lo = big // 2 - box // 2
    # rotate each map only into the box its density can reach, then zero-pad to ``big``
    reach = [
        min(big, 2 * math.ceil(structure_radius_px(m, 0.01) + abs(max_shift_px) * math.sqrt(3)) + 3)
        for m in maps
    ]
    clean = np.empty((n, box, box, box), dtype=np.float32)
    # AITom: the noise level comes from the CTF × wedge × sphere filtered density's variance, the
    # written signal is that density low-passed (twice); both filters are defined on the box grid
    aitom_var = np.empty(n, dtype=np.float64) if aitom else None
    signal_filter = aitom_radial(box, angpix, "signal") if aitom else None
    variance_filter = aitom_radial(box, angpix, "variance") if aitom else None
    chunk = max(1, min(n, (64 * 48**3) // big**3))
    batch = np.empty((chunk, big, big, big), dtype=np.float32)
    for i0 in progress(range(0, n, chunk), total=-(-n // chunk), desc="simulate subtomograms"):
        i1 = min(n, i0 + chunk)
        for j, i in enumerate(range(i0, i1)):
            r = reach[labels[i]]
            sub = rotate_volume(
                maps[labels[i]],
                angles_deg=angles_deg[i],
                center_offset_xyz=shifts_xyz[i],
                order=1,
                output_shape_zyx=(r, r, r),
            )
            batch[j] = sub if r == big else pad_or_crop(sub, (big, big, big))
        crop = (slice(None), slice(lo, lo + box), slice(lo, lo + box), slice(lo, lo + box))
        if aitom:  # one forward FFT for both filters
            ref, imaged = apply_imaging_filters(
                batch[: i1 - i0], angpix, imaging, [variance_filter, signal_filter]
            )
            aitom_var[i0:i1] = np.var(ref[crop].reshape(i1 - i0, -1), axis=1, dtype=np.float64)
        else:
            imaged = apply_imaging(batch[: i1 - i0], angpix, imaging, radial=signal_filter)
        clean[i0:i1] = imaged[crop]
    return clean, aitom_var
