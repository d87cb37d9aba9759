"""Simulated subtomogram sets with ground truth (the DISCA paper's Table S1 protocol).

Each structure is resampled to the voxel size, given a uniform random orientation on SO(3) and a
small random shift, rotated with :func:`disca_tools.geometry.rotate_volume` (RELION's convention, so
the ground-truth angles and origins can be handed to RELION as they are), imaged (CTF + missing
wedge, :mod:`.imaging`) and given white Gaussian noise at the requested SNR.

Output values are the image-formation output, protein positive, *not* normalised: writers and the
extractor normalise where they need to. The noise level is one for the whole set:
``noise variance = mean over the set of each noise-free imaged subtomogram's variance (whole box) / SNR``,
so every subtomogram of a set has the same noise, as in a real data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..geometry import random_euler, rotate_volume
from ..runtime.log import progress
from .imaging import Imaging, apply_imaging
from .structures import load_structure, structure_label


@dataclass
class SubtomogramSet:
    """Simulated subtomograms and their ground truth.

    volumes: ``(N, S, S, S)`` float32, ``[n, z, y, x]``. labels: ``(N,)`` 0-based class index into
    ``class_names``. angles_deg: ``(N, 3)`` RELION ZYZ (rot, tilt, psi). shifts_xyz: ``(N, 3)`` voxels,
    the particle centre relative to the box centre (``N // 2``); RELION's origin is ``−shift·angpix``.
    references: noise-free, un-rotated maps at the output sampling (box ``S``), keyed by class name.
    noise_sigma: the standard deviation of the added noise (0 for ``snr = inf``).
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
) -> SubtomogramSet | tuple[SubtomogramSet, np.ndarray]:
    """Simulate ``n_per_class`` subtomograms (box ``box``) of each structure, shuffled.

    ``structures`` are shipped names or MRC paths (one class each, in order). Shifts are uniform in
    ``[−max_shift_px, max_shift_px]`` per axis. ``snr = inf`` adds no noise. With ``return_clean``
    also returns the noise-free imaged volumes (to measure the SNR).
    """
    if not structures:
        raise ValueError("no structures given")
    if n_per_class < 1 or box < 4 or angpix <= 0:
        raise ValueError(f"bad sizes: n_per_class={n_per_class}, box={box}, angpix={angpix}")
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
    clean = np.empty((n, box, box, box), dtype=np.float32)
    for i in progress(range(n), total=n, desc="simulate subtomograms", unit="subtomo"):
        sub = rotate_volume(
            maps[labels[i]],
            angles_deg=angles[i],
            center_offset_xyz=shifts[i],
            order=1,
            output_shape_zyx=(box, box, box),
        )
        clean[i] = apply_imaging(sub, angpix, imaging)

    sig_var = float(np.mean(np.var(clean.reshape(n, -1), axis=1, dtype=np.float64)))
    if snr is None or math.isinf(snr):
        volumes, sigma = (clean.copy() if return_clean else clean), 0.0
    else:
        if not snr > 0:
            raise ValueError(f"snr must be positive (or inf), got {snr}")
        sigma = math.sqrt(sig_var / snr)
        # without return_clean the noise goes into the same buffer (memory: one copy of the set)
        volumes = clean.copy() if return_clean else clean
        for i0 in range(0, n, 256):
            chunk = rng.standard_normal(volumes[i0 : i0 + 256].shape, dtype=np.float32)
            chunk *= np.float32(sigma)
            volumes[i0 : i0 + 256] += chunk
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
    )
    return (result, clean) if return_clean else result
