"""Reference-based 3D classification of clustered subtomograms, the pose marginalised.

DISCA's classes come from features that do not align the subtomograms. This stage takes them as
the starting point of a multi-reference expectation-maximisation in the style of maximum-likelihood
3D classification (Scheres et al. 2009; RELION's Class3D), adapted to subtomograms with a missing
wedge (wedge-weighted references as in Bartesaghi et al. 2008):

* model: subtomogram ``x_i = W · L · ref_k(R_r · (x − c) + c) + noise`` with ``W`` the missing wedge
  (tilt axis y or x, beam z), ``L`` a low-pass, ``R_r`` one of ``rotations`` uniform random
  rotations (RELION's convention, :mod:`disca_tools.geometry`), white noise of one variance
  ``σ²`` estimated from the data (at cryo-ET SNR the variance of a subtomogram is mostly noise);
* E-step: the log-likelihood of every (class, rotation) pair, ``ℓ_kr = (x·p_kr − |p_kr|²/2) / σ²``,
  and their posterior ``softmax_kr(ℓ_kr / T)`` with a temperature ``T`` that softens it (T = 1: the
  plain likelihood);
* M-step: each reference is the posterior-weighted sum of the subtomograms rotated back into the
  reference frame, divided by the sum of the back-rotated wedges plus a small regulariser (a
  Wiener-like wedge correction);
* the first ``hold_iterations`` keep every particle in its starting class (pose only), so the
  references are aligned before particles may move; then classes may change, and the loop stops
  when ≥ ``stable_fraction`` of the labels stay put or after ``iterations``.

* translations: each particle's centre ``d`` (its offset from the box centre) is searched locally:
  after each E-step, the peak of the cross-correlation of the particle (moved by −d) with its most
  probable (class, pose) projection, within ``ceil(max_shift_px)`` voxels and refined to a sub-voxel
  position, is added to ``d``, which is held within ``±max_shift_px`` per axis of its starting
  value (the box centre, or the centre given, e.g. by RELION origins); the next iteration
  reads every particle moved by −d (a Fourier phase ramp). The translation a class's map shares with
  its particles is removed each iteration (the map moved to its particles' mean offset seen in its
  frame), so maps stay centred. One translation per particle, not marginalised (RELION's
  Class3D marginalises over a grid of them). Off by default (``max_shift_px`` 0): on the
  simulated Table S1 cells it raised the fixed point reached from the true classes at ±60°/SNR 0.01
  but lowered what was reached from DISCA's classes (benchmarks/ACCURACY.md, session 32).

* split-and-merge (:func:`split_and_merge`, opt-in): EM from DISCA's classes can stop in a local
  optimum where two structures share a class and another structure is spread over two. Each
  round tries merging a pair of maps that look alike after alignment while splitting another
  class (its least probable members seed the freed class) and keeps the trial that beats the
  classification continued as long (after Ueda et al. 2000), judged by a held-out
  log-likelihood: each half of the particles scored against maps made from the other half,
  since with few particles per class maps fit their members' noise and the classification's
  own log-likelihood can prefer a wrong trial (benchmarks/ACCURACY.md, sessions 34–35).

Not modelled (left to RELION's Class3D/Refine3D after this stage): the CTF (one wedge for all
particles, not each particle's 3D CTF weight), symmetry.

Memory: the projections (K·R × voxels in the mask) and the M-step's sums (K·R × S³), both float32,
plus one batch of subtomograms: nothing grows with N. Time per iteration is linear in N, K and R.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.special import logsumexp, softmax

from ..geometry import random_rotations
from ..runtime.errors import UserError
from ..runtime.log import check_abort, logger, progress

ReadBatch = Callable[[int, int], np.ndarray]
_CHUNK = 256  # rotations rotated at once (one compiled shape, plus the remainder's)


@dataclass(frozen=True)
class ClassifyConfig:
    """Settings of :func:`classify_with_poses` (defaults: those measured in benchmarks/ACCURACY.md)."""

    rotations: int = 1000
    iterations: int = 40  # at most (8 held + 32 free); stops when ≥ stable_fraction stay
    hold_iterations: int = 8  # at SNR 0.01 the maps still sharpen after 3 (benchmarks/ACCURACY.md)
    temperature: float = 5.0
    lowpass_px: float = 3.0  # period of the low-pass cut-off in voxels (1/3 cycle per voxel)
    max_tilt_deg: float = 60.0  # ≥ 90: no missing wedge
    tilt_axis: str = "y"
    batch_size: int = 256
    seed: int = 0
    stable_fraction: float = 0.99
    max_shift_px: float = 0.0  # > 0: each particle's centre searched within this of its start
    regularisation: float = (
        0.05  # λ of the wedge correction, a fraction of each class's largest weight
    )
    # split-and-merge (:func:`split_and_merge`): rounds after the classification, 0 for none
    split_merge_rounds: int = 0
    split_merge_pairs: int = 2  # the most similar pairs of maps tried as merges each round
    split_merge_iterations: int = 15  # iterations of each trial (3 of them held)
    split_fraction: float = 1.0 / 3.0  # a split class's least probable members: the new class
    # what ranks the trials: "held-out" (each half of the particles scored against maps made from
    # the other half) or "likelihood" (the classification's own log-likelihood)
    split_merge_judge: str = "held-out"

    def check(self) -> None:
        """Raise a UserError for settings that cannot work."""
        if self.rotations < 1:
            raise UserError(f"--rotations: must be at least 1, got {self.rotations}")
        if self.iterations < 1:
            raise UserError(f"--iterations: must be at least 1, got {self.iterations}")
        if not 0 <= self.hold_iterations <= self.iterations:
            raise UserError(
                f"--hold-iterations: must be between 0 and --iterations ({self.iterations}), "
                f"got {self.hold_iterations}"
            )
        if self.temperature <= 0:
            raise UserError(f"--temperature: must be positive, got {self.temperature}")
        if self.lowpass_px < 2.0:
            raise UserError(
                f"low-pass: a period of {self.lowpass_px:g} voxels is beyond Nyquist (need ≥ 2)"
            )
        if self.max_tilt_deg <= 0:
            raise UserError(f"--max-tilt-deg: must be positive, got {self.max_tilt_deg}")
        if self.tilt_axis not in ("x", "y"):
            raise UserError(f"--tilt-axis: must be x or y, got {self.tilt_axis!r}")
        if self.max_shift_px < 0:
            raise UserError(f"--max-shift-px: must be ≥ 0, got {self.max_shift_px}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size: must be at least 1, got {self.batch_size}")
        if self.split_merge_rounds < 0 or self.split_merge_pairs < 1:
            raise UserError(
                f"--split-merge-rounds must be ≥ 0 and --split-merge-pairs ≥ 1, got "
                f"{self.split_merge_rounds} and {self.split_merge_pairs}"
            )
        if self.split_merge_iterations < 4:
            raise UserError(
                f"split-and-merge iterations: need at least 4 (3 held), got {self.split_merge_iterations}"
            )
        if self.split_merge_judge not in ("held-out", "likelihood"):
            raise UserError(
                f"--split-merge-judge: must be held-out or likelihood, got {self.split_merge_judge!r}"
            )
        if not 0.0 < self.split_fraction < 1.0:
            raise UserError(f"split fraction: must be in (0, 1), got {self.split_fraction}")
        if not 0.0 < self.stable_fraction <= 1.0:
            raise UserError(f"stable fraction: must be in (0, 1], got {self.stable_fraction}")


@dataclass
class ClassifyResult:
    """The classification: 0-based ``labels`` (empty classes dropped, renumbered in order;
    ``classes`` gives each kept class's starting label),
    the chosen class's posterior, the most probable pose within it (matrices ``(N, 3, 3)`` on
    ``(x, y, z)``: ``particle(x) ≈ reference(M · (x − c − d) + c)`` with ``d`` the particle's
    row of ``offsets``), the references ``(K, S, S, S)`` and one history row per iteration
    (``log_likelihood``: the mean over particles of ``log Σ_kr exp(ℓ_kr) / (K R)``, up to a
    constant set by the data and the filter: compare runs on the same particles and settings)."""

    labels: np.ndarray
    classes: np.ndarray
    posterior: np.ndarray
    poses: np.ndarray
    references: np.ndarray
    history: list[dict] = field(default_factory=list)
    converged: bool = False
    offsets: np.ndarray | None = None  # (N, 3) x y z voxels: each particle's centre − box centre
    moves: list[dict] = field(default_factory=list)  # split-and-merge trials, one row each
    noise_variance: float = 1.0  # σ² of the likelihood (low-passed voxels in the mask)


def missing_wedge_weight(box: int, max_tilt_deg: float, tilt_axis: str = "y") -> np.ndarray:
    """The sampled Fourier region of a ±``max_tilt_deg`` tilt series, centred layout (float32
    0/1; all ones from 90°)."""
    from ..simulate.imaging import Imaging, ctf_wedge_weight

    if max_tilt_deg >= 90.0:
        return np.ones((box, box, box), np.float32)
    imaging = Imaging(tilt_range_deg=max_tilt_deg, tilt_axis=tilt_axis, apply_ctf=False)
    return ctf_wedge_weight((box, box, box), 1.0, imaging, "centered").astype(np.float32)


def lowpass_weight(box: int, period_px: float) -> np.ndarray:
    """A fourth-order Gaussian low-pass ``exp(−½ (f / f₀)⁴)``, ``f₀ = 1 / period_px`` cycles per
    voxel, centred layout (float32)."""
    f = np.fft.fftshift(np.fft.fftfreq(box))
    fz, fy, fx = np.meshgrid(f, f, f, indexing="ij")
    radius = np.sqrt(fz**2 + fy**2 + fx**2) * period_px
    return np.exp(-0.5 * radius**4).astype(np.float32)


def fourier_filter(
    vols: np.ndarray, weight_centered: np.ndarray, shifts_xyz: np.ndarray | None = None
) -> np.ndarray:
    """Multiply the Fourier transform of each volume of ``vols`` (..., S, S, S) by a centred
    weight (float32 result); with ``shifts_xyz`` ((B, 3) voxels, x y z) each volume is also
    moved by its shift, ``out(x) = vol(x − shift)`` (a phase ramp: circular, sub-voxel)."""
    box = vols.shape[-1]
    w = np.fft.ifftshift(weight_centered)[..., : box // 2 + 1]
    spec = np.fft.rfftn(vols, axes=(-3, -2, -1)) * w
    if shifts_xyz is not None:
        f, fh = np.fft.fftfreq(box), np.fft.rfftfreq(box)
        d = np.asarray(shifts_xyz, np.float64)
        phase = (
            d[:, 2, None, None, None] * f[None, :, None, None]
            + d[:, 1, None, None, None] * f[None, None, :, None]
            + d[:, 0, None, None, None] * fh[None, None, None, :]
        )
        spec = spec * np.exp(-2j * np.pi * phase)
    return np.fft.irfftn(spec, s=vols.shape[-3:], axes=(-3, -2, -1)).astype(np.float32)


def best_shifts(vols: np.ndarray, models: np.ndarray, reach_px: int = 2) -> np.ndarray:
    """``(B, 3)`` shifts (x y z voxels) that best overlay each model on its volume, ``vol(x) ≈
    model(x − shift)``: the peak of their cross-correlation within ``reach_px`` voxels of no shift
    along each axis, refined to a sub-voxel position by a parabola through the peak and its two
    neighbours on each axis."""
    box = vols.shape[-1]
    axes = (-3, -2, -1)
    cc = np.fft.irfftn(
        np.fft.rfftn(vols, axes=axes) * np.conj(np.fft.rfftn(models, axes=axes)),
        s=vols.shape[-3:], axes=axes,
    )  # fmt: skip
    steps = np.arange(-reach_px - 1, reach_px + 2)  # the window and one voxel beyond, for the fit
    win = cc[np.ix_(np.arange(len(cc)), steps % box, steps % box, steps % box)]
    inner = win[:, 1:-1, 1:-1, 1:-1].reshape(len(cc), -1)
    peak = np.stack(np.unravel_index(inner.argmax(axis=1), (2 * reach_px + 1,) * 3), axis=1) + 1
    out = np.empty((len(cc), 3))
    rows = np.arange(len(cc))
    for axis in range(3):  # array axes z, y, x → shift components 2, 1, 0
        lo, hi = peak.copy(), peak.copy()
        lo[:, axis] -= 1
        hi[:, axis] += 1
        c0 = win[rows, peak[:, 0], peak[:, 1], peak[:, 2]]
        cm = win[rows, lo[:, 0], lo[:, 1], lo[:, 2]]
        cp = win[rows, hi[:, 0], hi[:, 1], hi[:, 2]]
        curve = cm - 2.0 * c0 + cp
        frac = np.where(curve < 0, 0.5 * (cm - cp) / np.where(curve < 0, curve, -1.0), 0.0)
        out[:, 2 - axis] = steps[peak[:, axis]] + np.clip(frac, -0.5, 0.5)
    return out


def sphere_mask(box: int) -> np.ndarray:
    """Flat boolean mask of the voxels within ``box // 2 − 1`` of the box centre."""
    r = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(r, r, r, indexing="ij")
    return (np.sqrt(zz**2 + yy**2 + xx**2) <= box // 2 - 1).ravel()


def rotate_many(vols: np.ndarray, mats: np.ndarray) -> np.ndarray:
    """``out[j](x) = vols[j](mats[j] · (x − c) + c)`` (trilinear, zero outside the box)."""
    from ..model.data import compiled_rotation

    v = np.ascontiguousarray(vols, dtype=np.float32)
    m = np.ascontiguousarray(mats, dtype=np.float32)
    return np.asarray(compiled_rotation()(v, m, np.zeros_like(v)))


def project(
    refs: np.ndarray, rots: np.ndarray, weight: np.ndarray, mask: np.ndarray, chunk: int = _CHUNK
) -> np.ndarray:
    """Every reference under every rotation, Fourier-weighted (wedge × low-pass) and cut to the
    mask: ``(K · R, mask voxels)``, class-major, built in chunks of rotations."""
    k, n_rot = len(refs), len(rots)
    out = np.empty((k * n_rot, int(mask.sum())), np.float32)
    for c in range(k):
        for s in range(0, n_rot, chunk):
            m = rots[s : s + chunk]
            rotated = rotate_many(np.broadcast_to(refs[c], (len(m), *refs.shape[1:])), m)
            filtered = fourier_filter(rotated, weight).reshape(len(m), -1)
            out[c * n_rot + s : c * n_rot + s + len(m)] = filtered[:, mask]
    return out


def back_rotate_sum(
    sums: np.ndarray, rots_t: np.ndarray, box: int, chunk: int = _CHUNK
) -> np.ndarray:
    """``Σ_r rot(sums[k, r], R_rᵀ)`` for each class: ``sums`` is ``(K, R, box³)``."""
    k, n_rot = sums.shape[:2]
    out = np.zeros((k, box, box, box), np.float32)
    for c in range(k):
        for s in range(0, n_rot, chunk):
            vols = sums[c, s : s + chunk].reshape(-1, box, box, box)
            out[c] += rotate_many(vols, rots_t[s : s + chunk]).sum(axis=0)
    return out


def wedge_corrected(sums: np.ndarray, wedge_sums: np.ndarray, regularisation: float) -> np.ndarray:
    """Maps from ``(K, S, S, S)`` sums of back-rotated particles and of their back-rotated
    wedges (centred Fourier layout): each sum's spectrum divided by its wedge sum plus
    ``regularisation`` × that class's largest (a Wiener-like wedge correction; float32)."""
    k = len(sums)
    spec = np.fft.fftshift(np.fft.fftn(sums, axes=(1, 2, 3)), axes=(1, 2, 3))
    lam = regularisation * wedge_sums.reshape(k, -1).max(axis=1) + 1e-6
    return np.fft.ifftn(
        np.fft.ifftshift(spec / (wedge_sums + lam[:, None, None, None]), axes=(1, 2, 3)),
        axes=(1, 2, 3),
    ).real.astype(np.float32)


def pair_log_likelihoods(
    rows: np.ndarray, projections: np.ndarray, half_norms: np.ndarray, sigma2: float
) -> np.ndarray:
    """``(B, K·R)`` log-likelihood of each particle (masked voxels, ``(B, M)``) under each
    (class, rotation) projection, up to a constant: ``(x·p − |p|²/2) / σ²``."""
    return (rows @ projections.T - half_norms) / sigma2


def _rotations(config: ClassifyConfig) -> np.ndarray:
    """The classification's ``rotations`` uniform random rotations (float32), set by its seed."""
    return random_rotations(config.rotations, np.random.default_rng(config.seed)).astype(np.float32)


def filtered_batches(
    read: ReadBatch,
    n: int,
    lp: np.ndarray,
    batch_size: int,
    offsets: np.ndarray | None = None,
    desc: str | None = None,
    wanted: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Each batch's first index and its subtomograms low-passed by ``lp``, each moved by minus
    its row of ``offsets`` (none: as read); with ``desc``, reported as progress. With ``wanted``
    (one bool per particle), batches holding none of the wanted particles are not read."""
    starts = range(0, n, batch_size)
    for start in starts if desc is None else progress(starts, desc=desc, unit="batch"):
        check_abort()
        stop = min(start + batch_size, n)
        if wanted is not None and not wanted[start:stop].any():
            continue
        moved_by = None if offsets is None else -offsets[start:stop]
        yield start, fourier_filter(read(start, stop), lp, moved_by)


def initial_references(
    read: ReadBatch,
    n: int,
    labels: np.ndarray,
    k: int,
    lp: np.ndarray,
    batch_size: int,
    offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """The low-passed unaligned mean of each class and the noise variance ``σ²`` (the variance of
    the low-passed voxels inside the mask), in one pass over the data."""
    sums = None
    mask = None
    total = total2 = 0.0
    count = 0
    for start, x in filtered_batches(read, n, lp, batch_size, offsets, desc="references"):
        if sums is None:
            sums = np.zeros((k, *x.shape[1:]), np.float64)
            mask = sphere_mask(x.shape[-1])
        batch_labels = labels[start : start + len(x)]
        for c in np.unique(batch_labels):
            sums[c] += x[batch_labels == c].sum(axis=0, dtype=np.float64)
        xm = x.reshape(len(x), -1)[:, mask]
        total += float(xm.sum(dtype=np.float64))
        total2 += float(np.square(xm, dtype=np.float64).sum())
        count += xm.size
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    refs = (sums / np.maximum(sizes, 1.0)[:, None, None, None]).astype(np.float32)
    mean = total / count
    return refs, max(total2 / count - mean * mean, 1e-12)


def classify_with_poses(
    read: ReadBatch,
    n: int,
    labels: np.ndarray,
    config: ClassifyConfig,
    initial: np.ndarray | None = None,
    offsets: np.ndarray | None = None,
) -> ClassifyResult:
    """Refine the classes ``labels`` (0-based, N) of the ``n`` subtomograms that ``read(start,
    stop)`` returns (normalised, float32, (B, S, S, S)) by multi-reference classification with the
    pose marginalised (module docstring). ``initial`` (K, S, S, S) replaces the classes' unaligned
    means as starting references (tests, known structures); ``offsets`` (N, 3) are the
    particles' known centres relative to the box centre (x y z voxels; e.g. from RELION origins),
    the start of the translation search."""
    config.check()
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or n == 0:
        raise UserError(f"classes: need one label per particle ({n}), got shape {labels.shape}")
    if labels.min() < 0:
        raise UserError("classes: labels must be ≥ 0")
    k = int(labels.max()) + 1
    first = read(0, 1)
    if first.ndim != 4 or len(set(first.shape[1:])) != 1:
        raise UserError(f"subtomograms: need cubic volumes, got shape {first.shape[1:]}")
    box = int(first.shape[-1])
    rots = _rotations(config)
    n_rot = len(rots)
    lp = lowpass_weight(box, config.lowpass_px)
    wedge = missing_wedge_weight(box, config.max_tilt_deg, config.tilt_axis)
    mask = sphere_mask(box)
    vox = box**3
    mib = (k * n_rot * (vox + int(mask.sum())) + n_rot * vox) * 4 / 2**20
    logger.info(
        "3D classification: %d particles, %d classes, %d rotations, box %d (%.0f MiB of fixed arrays)",
        n, k, n_rot, box, mib,
    )  # fmt: skip
    search_shifts = config.max_shift_px > 0
    if offsets is None:
        offsets = np.zeros((n, 3))
    offsets = np.array(offsets, np.float64)
    start_offsets = offsets.copy()
    if offsets.shape != (n, 3):
        raise UserError(f"offsets: need ({n}, 3), got {offsets.shape}")
    moved = search_shifts or bool(np.any(offsets))
    reach = max(1, int(np.ceil(config.max_shift_px)))

    refs, sigma2 = initial_references(
        read, n, labels, k, lp, config.batch_size, offsets if moved else None
    )
    if initial is not None:
        if initial.shape != (k, box, box, box):
            raise UserError(
                f"initial references: need shape {(k, box, box, box)}, got {initial.shape}"
            )
        refs = fourier_filter(np.asarray(initial, np.float32), lp)
    # the wedge of a pose seen from the reference frame: the wedge rotated by R_rᵀ
    rots_t = np.ascontiguousarray(np.transpose(rots, (0, 2, 1)))
    wedge_back = np.concatenate(
        [
            rotate_many(np.broadcast_to(wedge, (len(m), box, box, box)), m).reshape(len(m), vox)
            for m in (rots_t[s : s + _CHUNK] for s in range(0, n_rot, _CHUNK))
        ]
    )
    current = labels.copy()
    posterior = np.zeros(n, np.float32)
    pose_index = np.zeros(n, np.int64)
    history: list[dict] = []
    converged = False
    projection_weight = wedge * lp
    log_pairs = float(np.log(k * n_rot))  # the uniform prior over (class, rotation)
    for it in range(config.iterations):
        t0 = time.time()
        hold = it < config.hold_iterations
        proj = project(refs, rots, projection_weight, mask)
        half_norm = 0.5 * np.einsum("ij,ij->i", proj, proj)
        sums = np.zeros((k * n_rot, vox), np.float32)
        weights = np.zeros(k * n_rot, np.float64)
        new = np.empty(n, np.int64)
        new_offsets = offsets.copy()
        log_likelihood = 0.0
        batches = filtered_batches(
            read, n, lp, config.batch_size, offsets if moved else None, desc=f"iteration {it}"
        )
        for start, x in batches:
            b = len(x)
            flat = x.reshape(b, vox)
            loglik = pair_log_likelihoods(flat[:, mask], proj, half_norm, sigma2)  # (b, K·R)
            log_likelihood += float(logsumexp(loglik, axis=1).sum()) - b * log_pairs
            score = loglik / config.temperature
            if hold:
                keep = np.zeros((b, k, 1), bool)
                keep[np.arange(b), labels[start : start + b]] = True
                score = np.where(keep, score.reshape(b, k, n_rot), -np.inf).reshape(b, -1)
            g = softmax(score, axis=1)
            per_class = g.reshape(b, k, n_rot)
            class_post = per_class.sum(axis=2)
            lab = class_post.argmax(axis=1)
            new[start : start + b] = lab
            posterior[start : start + b] = class_post[np.arange(b), lab]
            pose_index[start : start + b] = per_class[np.arange(b), lab].argmax(axis=1)
            if search_shifts:  # the centre that best fits the most probable (class, pose)
                models = np.zeros((b, vox), np.float32)
                models[:, mask] = proj[lab * n_rot + pose_index[start : start + b]]
                step = best_shifts(x, models.reshape(x.shape), reach)
                new_offsets[start : start + b] = offsets[start : start + b] + step
            sums += g.T @ flat
            weights += g.sum(axis=0)
        changed = float(np.mean(new != current))
        current = new
        # M-step: back-rotate every (class, pose) sum into its reference frame, correct the wedge
        back = back_rotate_sum(sums.reshape(k, n_rot, vox), rots_t, box)
        denom = (weights.reshape(k, n_rot).astype(np.float32) @ wedge_back).reshape(
            k, box, box, box
        )
        new_refs = wedge_corrected(back, denom, config.regularisation)
        sizes = np.bincount(current, minlength=k)
        occupied = sizes > 0
        refs[occupied] = new_refs[occupied]  # an emptied class keeps its last reference
        if search_shifts:
            # the translation a class's map shares with its particles is not determined by the
            # data: each map is moved to its particles' mean offset, seen in its own frame
            # (M·d), and that part is taken off their offsets (Mᵀ·t), so the maps stay centred
            new_offsets = np.clip(
                new_offsets,
                start_offsets - config.max_shift_px,
                start_offsets + config.max_shift_px,
            )
            pose_mats = rots[pose_index].astype(np.float64)
            for c in np.flatnonzero(occupied):
                members = current == c
                t = np.einsum("nij,nj->i", pose_mats[members], new_offsets[members]) / members.sum()
                new_offsets[members] -= pose_mats[members].transpose(0, 2, 1) @ t
                refs[c] = fourier_filter(refs[c][None], np.ones_like(lp), t[None])[0]
            shift_moved = float(np.sqrt(((new_offsets - offsets) ** 2).sum(axis=1)).mean())
            offsets = new_offsets
        row = {
            "iteration": it,
            "held": hold,
            "changed_fraction": round(changed, 5),
            "mean_posterior": round(float(posterior.mean()), 5),
            "log_likelihood": round(log_likelihood / n, 4),
            "mean_shift_change_px": round(shift_moved, 4) if search_shifts else 0.0,
            "sizes": sizes.tolist(),
            "seconds": round(time.time() - t0, 2),
        }
        history.append(row)
        logger.info(
            "3D classification iteration %d%s: %.2f %% of labels changed, sizes %s, mean "
            "posterior %.3f, log-likelihood %.2f per particle, %.1f s",
            it, " (classes held)" if hold else "", 100 * changed, sizes.tolist(),
            row["mean_posterior"], row["log_likelihood"], row["seconds"],
        )  # fmt: skip
        if not hold and changed <= 1.0 - config.stable_fraction:
            converged = True
            break
    used = np.flatnonzero(np.bincount(current, minlength=k))
    renumber = np.full(k, -1, np.int64)
    renumber[used] = np.arange(len(used))
    return ClassifyResult(
        labels=renumber[current],
        classes=used,
        posterior=posterior,
        poses=rots[pose_index],
        offsets=offsets,
        references=refs[used],
        history=history,
        converged=converged,
        noise_variance=sigma2,
    )


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Each row less its mean, scaled to unit length (float32)."""
    rows = rows - rows.mean(axis=1, keepdims=True)
    return (rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def map_similarity(refs: np.ndarray, n_rotations: int = 2000, seed: int = 0) -> np.ndarray:
    """``(K, K)`` aligned similarity of maps: the largest normalised correlation inside the sphere
    of map ``a`` rotated by any of ``n_rotations`` uniform rotations (and the identity) with map
    ``b``, made symmetric by averaging ``(a, b)`` and ``(b, a)``. One map's rotations are held
    at a time (rotations × voxels in the sphere)."""
    box = refs.shape[-1]
    mask = sphere_mask(box)
    rots = random_rotations(n_rotations, np.random.default_rng(seed)).astype(np.float32)
    rots[0] = np.eye(3, dtype=np.float32)
    flat = np.ones((box, box, box), np.float32)
    r = _unit_rows(refs.reshape(len(refs), -1)[:, mask])
    best = np.stack(
        [(_unit_rows(project(ref[None], rots, flat, mask)) @ r.T).max(axis=0) for ref in refs]
    )
    return 0.5 * (best + best.T)


def aligned_means(
    read: ReadBatch,
    n: int,
    groups: np.ndarray,
    n_groups: int,
    poses: np.ndarray,
    lp: np.ndarray,
    batch_size: int,
    offsets: np.ndarray | None = None,
    wedge: np.ndarray | None = None,
    regularisation: float = 0.05,
) -> np.ndarray:
    """The mean of each group's low-passed particles rotated into their map's frame by their
    poses (``groups``: a group index per particle, −1 for none), in one pass over the data.
    With ``wedge`` (centred Fourier weight) each mean is wedge-corrected as the M-step's maps are
    (divided by its members' back-rotated wedges plus ``regularisation`` × their largest)."""
    sums = wedges = None
    for start, x in filtered_batches(read, n, lp, batch_size, offsets, wanted=groups >= 0):
        stop = start + len(x)
        take = np.flatnonzero(groups[start:stop] >= 0)
        # the whole batch is rotated: one shape per batch size, not one per member count
        back_poses = np.transpose(poses[start:stop], (0, 2, 1))
        back = rotate_many(x, back_poses)
        if sums is None:
            sums = np.zeros((n_groups, *x.shape[1:]), np.float64)
            wedges = None if wedge is None else np.zeros_like(sums)
        np.add.at(sums, groups[start + take], back[take])
        if wedges is not None:
            seen = rotate_many(np.broadcast_to(wedge, x.shape), back_poses)
            np.add.at(wedges, groups[start + take], seen[take])
    counts = np.bincount(groups[groups >= 0], minlength=n_groups).astype(np.float64)
    means = sums / np.maximum(counts, 1.0)[:, None, None, None]
    if wedge is None:
        return means.astype(np.float32)
    return wedge_corrected(
        means, wedges / np.maximum(counts, 1.0)[:, None, None, None], regularisation
    )


def held_out_log_likelihoods(
    read: ReadBatch, n: int, result: ClassifyResult, config: ClassifyConfig
) -> np.ndarray:
    """``(N,)`` the log-likelihood of each particle, class and pose marginalised as in the
    classification's history, under maps made without it: the particles are cut into two
    halves (alternate particles) and each half is scored against the other half's maps (each
    class's members in that half at their most probable pose, their wedge-corrected aligned
    mean). Maps that fit their own members' noise gain nothing here, so classifications with
    different classes can be ranked fairly, whatever their class sizes. One pass over the data
    for the maps and one for the scores; memory: twice the classification's projections."""
    k = len(result.references)
    box = result.references.shape[-1]
    lp = lowpass_weight(box, config.lowpass_px)
    wedge = missing_wedge_weight(box, config.max_tilt_deg, config.tilt_axis)
    mask = sphere_mask(box)
    offsets = result.offsets if result.offsets is not None and np.any(result.offsets) else None
    half = np.arange(n) % 2
    maps = aligned_means(
        read, n, 2 * result.labels + half, 2 * k, result.poses, lp, config.batch_size,
        offsets, wedge, config.regularisation,
    )  # fmt: skip
    rots = _rotations(config)
    log_pairs = float(np.log(k * len(rots)))
    # the projections of the maps of half 1 score half 0 and those of half 0 score half 1
    projections = [project(maps[1 - h :: 2], rots, wedge * lp, mask) for h in (0, 1)]
    half_norms = [0.5 * np.einsum("ij,ij->i", p, p) for p in projections]
    out = np.empty(n)
    for start, x in filtered_batches(read, n, lp, config.batch_size, offsets):
        stop = start + len(x)
        flat = x.reshape(len(x), -1)[:, mask]
        for h in (0, 1):
            rows = np.flatnonzero(half[start:stop] == h)
            if len(rows):
                loglik = pair_log_likelihoods(
                    flat[rows], projections[h], half_norms[h], result.noise_variance
                )
                out[start + rows] = logsumexp(loglik, axis=1) - log_pairs
    return out


def _continued(history: list[dict], more: list[dict]) -> list[dict]:
    """``history`` followed by ``more``, whose iterations are numbered on from it."""
    return history + [{**h, "iteration": len(history) + h["iteration"]} for h in more]


def _ended_with(base: ClassifyResult, before: ClassifyResult, moves: list[dict]) -> ClassifyResult:
    """``base`` (a round's continued classification) as split-and-merge's result: its history
    after ``before``'s, every trial so far in ``moves``."""
    base.history = _continued(before.history, base.history)
    base.moves = moves
    return base


def split_and_merge(
    read: ReadBatch,
    n: int,
    result: ClassifyResult,
    config: ClassifyConfig,
    offsets: np.ndarray | None = None,
) -> ClassifyResult:
    """Leave the local optimum a classification ``result`` may be stuck in by split-and-merge
    moves (after Ueda et al. 2000, SMEM), K kept. Each round: the classification continued for
    ``split_merge_iterations`` (the baseline); then, for each of the ``split_merge_pairs`` pairs
    of maps most alike after alignment (:func:`map_similarity`) and each other class, a trial
    that merges the pair into one class and splits the other class, its ``split_fraction`` least
    probable members seeding the freed class (their aligned mean its map), run for as many
    iterations from the baseline's maps. The trial with the highest score replaces the baseline
    if it beats the baseline's, and the classification is rerun from it with ``config``;
    otherwise the rounds stop. The score (``split_merge_judge``): by default the mean held-out
    log-likelihood (:func:`held_out_log_likelihoods`), and a trial beats the baseline only when
    its particles' mean gain exceeds two standard errors of that gain (paired over particles);
    or the classification's own mean log-likelihood, which with few particles per class
    favours maps that fit their members' noise. ``moves`` in the result lists every trial."""
    k = len(result.references)
    if config.split_merge_rounds == 0 or k < 3:
        return result
    trial_config = replace(
        config,
        iterations=config.split_merge_iterations,
        hold_iterations=3,
        stable_fraction=1.0,
        split_merge_rounds=0,
    )
    box = result.references.shape[-1]
    lp = lowpass_weight(box, config.lowpass_px)
    moves = list(result.moves)

    def judged(res: ClassifyResult) -> tuple[float, np.ndarray | None]:
        """The judge's score, and with the held-out judge each particle's."""
        if config.split_merge_judge == "likelihood":
            return res.history[-1]["log_likelihood"], None
        per_particle = held_out_log_likelihoods(read, n, res, config)
        return round(float(per_particle.mean()), 4), per_particle

    for round_ in range(config.split_merge_rounds):
        base = classify_with_poses(
            read, n, result.labels, trial_config, initial=result.references, offsets=offsets
        )
        base.classes = result.classes[base.classes]  # each kept class's input label
        base_ll = base.history[-1]["log_likelihood"]
        k = len(base.references)
        if k < 3:
            return _ended_with(base, result, moves)
        base_score, base_per_particle = judged(base)
        similarity = map_similarity(base.references, seed=config.seed)
        pairs = sorted(
            ((similarity[a, b], a, b) for a in range(k) for b in range(a + 1, k)), reverse=True
        )[: config.split_merge_pairs]
        # each class's split (its least probable members to the freed class) does not depend
        # on the pair merged: the aligned means of both parts of every class in one pass
        splits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        groups = np.full(n, -1, np.int64)
        for c in range(k):
            members = np.flatnonzero(base.labels == c)
            n_low = int(np.ceil(config.split_fraction * len(members)))
            if 1 <= n_low < len(members):
                low = members[np.argsort(base.posterior[members], kind="stable")[:n_low]]
                groups[members], groups[low] = 2 * c, 2 * c + 1
                splits[c] = (members, low)
        means = aligned_means(read, n, groups, 2 * k, base.poses, lp, config.batch_size, offsets)
        best = None
        for sim_ab, a, b in pairs:
            for c in (c for c in splits if c not in (a, b)):
                members, low = splits[c]
                labels = base.labels.copy()
                labels[labels == b] = a
                labels[low] = b
                initial = base.references.copy()
                initial[c], initial[b] = means[2 * c], means[2 * c + 1]
                logger.info(
                    "split-and-merge round %d: merge classes %d and %d (similarity %.3f), split "
                    "class %d (%d of %d members to class %d)",
                    round_, a + 1, b + 1, sim_ab, c + 1, len(low), len(members), b + 1,
                )  # fmt: skip
                trial = classify_with_poses(
                    read, n, labels, trial_config, initial=initial, offsets=offsets
                )
                ll = trial.history[-1]["log_likelihood"]
                kept = len(trial.references) == k
                trial_score = gain_se = None  # a class emptied: not a candidate
                beats = False
                if kept:
                    trial_score, per_particle = judged(trial)
                    beats = trial_score > base_score
                    if per_particle is not None:  # paired over particles: gain > 2 SE
                        gain = per_particle - base_per_particle
                        gain_se = round(float(gain.std(ddof=1) / np.sqrt(n)), 4)
                        beats = float(gain.mean()) > 2.0 * gain_se
                logger.info(
                    "split-and-merge round %d trial: score %s per particle (baseline %.2f, "
                    "standard error of the gain %s), log-likelihood %.2f (baseline %.2f), sizes %s",
                    round_, trial_score, base_score, gain_se, ll, base_ll,
                    trial.history[-1]["sizes"],
                )  # fmt: skip
                moves.append(
                    {
                        "round": round_,
                        "merged": [a + 1, b + 1],
                        "similarity": round(float(sim_ab), 4),
                        "split": c + 1,
                        "log_likelihood": ll,
                        "baseline_log_likelihood": base_ll,
                        "score": trial_score,
                        "baseline_score": base_score,
                        "gain_standard_error": gain_se,
                        "classes_kept": len(trial.references),
                        "accepted": False,
                    }
                )
                if beats and (best is None or trial_score > best[0]):
                    best = (trial_score, trial, len(moves) - 1)
        if best is None:
            logger.info("split-and-merge round %d: no trial beat the baseline; stopped", round_)
            return _ended_with(base, result, moves)
        moves[best[2]]["accepted"] = True
        logger.info(
            "split-and-merge round %d: accepted (score %.2f against %.2f); refining",
            round_, best[0], base_score,
        )  # fmt: skip
        refined = classify_with_poses(
            read,
            n,
            best[1].labels,
            replace(config, split_merge_rounds=0),
            initial=best[1].references,
            offsets=offsets,
        )
        refined.classes = base.classes[best[1].classes][refined.classes]
        # the output's lineage: the classification, then each accepted trial's rerun
        refined.history = _continued(result.history, refined.history)
        result = refined
    result.moves = moves
    return result
