"""Reference-based 3D classification of clustered subtomograms, the pose marginalised.

DISCA's classes come from features that do not align the subtomograms. This stage takes them as
the starting point of a multi-reference expectation-maximisation in the style of maximum-likelihood
3D classification (Scheres et al. 2009; RELION's Class3D), adapted to subtomograms with a missing
wedge (wedge-weighted references as in Bartesaghi et al. 2008):

* model: subtomogram ``x_i = W · L · ref_k(R_r · (x − c) + c) + noise`` with ``W`` the missing wedge
  (tilt axis y or x, beam z), ``L`` a low-pass, ``R_r`` one of ``rotations`` uniform random
  rotations (RELION's convention, :mod:`disca_tools.geometry`), white noise of one variance
  ``σ²`` estimated from the data (at cryo-ET SNR the variance of a subtomogram is mostly noise);
* E-step: the posterior of every (class, rotation) pair from ``(x·p_kr − |p_kr|²/2) / (σ² T)``
  with a temperature ``T`` that softens the posteriors (T = 1: the plain likelihood);
* M-step: each reference is the posterior-weighted sum of the subtomograms rotated back into the
  reference frame, divided by the sum of the back-rotated wedges plus a small regulariser (a
  Wiener-like wedge correction);
* the first ``hold_iterations`` keep every particle in its starting class (pose only), so the
  references are aligned before particles may move; then classes may change, and the loop stops
  when ≥ ``stable_fraction`` of the labels stay put or after ``iterations``.

Not modelled (left to RELION's Class3D/Refine3D after this stage): translations (particles must sit
within a voxel or two of the box centre, as extraction at the picked centres leaves them), the CTF
(one wedge for all particles, not each particle's 3D CTF weight), symmetry.

Memory: the projections (K·R × voxels in the mask) and the M-step's sums (K·R × S³), both float32,
plus one batch of subtomograms: nothing grows with N. Time per iteration is linear in N, K and R.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import softmax

from ..geometry import random_rotations
from ..runtime.errors import UserError
from ..runtime.log import check_abort, logger, progress

ReadBatch = Callable[[int, int], np.ndarray]
_CHUNK = 256  # rotations rotated at once (one compiled shape, plus the remainder's)


@dataclass(frozen=True)
class ClassifyConfig:
    """Settings of :func:`classify_with_poses` (defaults: those measured in benchmarks/ACCURACY.md)."""

    rotations: int = 1000
    iterations: int = 25  # at most (RELION Class3D's default); stops when ≥ stable_fraction stay
    hold_iterations: int = 3
    temperature: float = 5.0
    lowpass_px: float = 4.0  # period of the low-pass cut-off in voxels (0.25 cycles/voxel)
    max_tilt_deg: float = 60.0  # ≥ 90: no missing wedge
    tilt_axis: str = "y"
    batch_size: int = 256
    seed: int = 0
    stable_fraction: float = 0.99
    regularisation: float = (
        0.05  # λ of the wedge correction, a fraction of each class's largest weight
    )

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
        if self.batch_size < 1:
            raise UserError(f"--batch-size: must be at least 1, got {self.batch_size}")
        if not 0.0 < self.stable_fraction <= 1.0:
            raise UserError(f"stable fraction: must be in (0, 1], got {self.stable_fraction}")


@dataclass
class ClassifyResult:
    """The classification: 0-based ``labels`` (empty classes dropped, renumbered in order;
    ``classes`` gives each kept class's starting label),
    the chosen class's posterior, the most probable pose within it (matrices ``(N, 3, 3)`` on
    ``(x, y, z)``: ``particle(x) ≈ reference(M · (x − c) + c)``), the references ``(K, S, S, S)``
    and one history row per iteration."""

    labels: np.ndarray
    classes: np.ndarray
    posterior: np.ndarray
    poses: np.ndarray
    references: np.ndarray
    history: list[dict] = field(default_factory=list)
    converged: bool = False


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


def fourier_filter(vols: np.ndarray, weight_centered: np.ndarray) -> np.ndarray:
    """Multiply the Fourier transform of each volume of ``vols`` (..., S, S, S) by a centred
    weight (float32 result)."""
    w = np.fft.ifftshift(weight_centered)[..., : vols.shape[-1] // 2 + 1]
    spec = np.fft.rfftn(vols, axes=(-3, -2, -1)) * w
    return np.fft.irfftn(spec, s=vols.shape[-3:], axes=(-3, -2, -1)).astype(np.float32)


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


def initial_references(
    read: ReadBatch, n: int, labels: np.ndarray, k: int, lp: np.ndarray, batch_size: int
) -> tuple[np.ndarray, float]:
    """The low-passed unaligned mean of each class and the noise variance ``σ²`` (the variance of
    the low-passed voxels inside the mask), in one pass over the data."""
    sums = None
    mask = None
    total = total2 = 0.0
    count = 0
    for start in progress(range(0, n, batch_size), desc="references", unit="batch"):
        x = fourier_filter(read(start, min(start + batch_size, n)), lp)
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
) -> ClassifyResult:
    """Refine the classes ``labels`` (0-based, N) of the ``n`` subtomograms that ``read(start,
    stop)`` returns (normalised, float32, (B, S, S, S)) by multi-reference classification with the
    pose marginalised (module docstring). ``initial`` (K, S, S, S) replaces the classes' unaligned
    means as starting references (tests, known structures)."""
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
    rng = np.random.default_rng(config.seed)
    rots = random_rotations(config.rotations, rng).astype(np.float32)
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
    refs, sigma2 = initial_references(read, n, labels, k, lp, config.batch_size)
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
    for it in range(config.iterations):
        t0 = time.time()
        hold = it < config.hold_iterations
        proj = project(refs, rots, projection_weight, mask)
        half_norm = 0.5 * np.einsum("ij,ij->i", proj, proj)
        sums = np.zeros((k * n_rot, vox), np.float32)
        weights = np.zeros(k * n_rot, np.float64)
        new = np.empty(n, np.int64)
        for start in progress(range(0, n, config.batch_size), desc=f"iteration {it}", unit="batch"):
            check_abort()
            x = fourier_filter(read(start, min(start + config.batch_size, n)), lp)
            b = len(x)
            flat = x.reshape(b, vox)
            score = (flat[:, mask] @ proj.T - half_norm) / (sigma2 * config.temperature)
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
            sums += g.T @ flat
            weights += g.sum(axis=0)
        changed = float(np.mean(new != current))
        current = new
        # M-step: back-rotate every (class, pose) sum into its reference frame, correct the wedge
        back = back_rotate_sum(sums.reshape(k, n_rot, vox), rots_t, box)
        denom = (weights.reshape(k, n_rot).astype(np.float32) @ wedge_back).reshape(
            k, box, box, box
        )
        spec = np.fft.fftshift(np.fft.fftn(back, axes=(1, 2, 3)), axes=(1, 2, 3))
        lam = config.regularisation * denom.reshape(k, -1).max(axis=1) + 1e-6
        new_refs = np.fft.ifftn(
            np.fft.ifftshift(spec / (denom + lam[:, None, None, None]), axes=(1, 2, 3)),
            axes=(1, 2, 3),
        ).real.astype(np.float32)
        sizes = np.bincount(current, minlength=k)
        occupied = sizes > 0
        refs[occupied] = new_refs[occupied]  # an emptied class keeps its last reference
        row = {
            "iteration": it,
            "held": hold,
            "changed_fraction": round(changed, 5),
            "mean_posterior": round(float(posterior.mean()), 5),
            "sizes": sizes.tolist(),
            "seconds": round(time.time() - t0, 2),
        }
        history.append(row)
        logger.info(
            "3D classification iteration %d%s: %.2f %% of labels changed, sizes %s, mean "
            "posterior %.3f, %.1f s",
            it, " (classes held)" if hold else "", 100 * changed, sizes.tolist(),
            row["mean_posterior"], row["seconds"],
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
        references=refs[used],
        history=history,
        converged=converged,
    )
