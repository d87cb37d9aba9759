"""Template-free particle picking: Difference of Gaussians, local maxima, non-maximum suppression.

The paper's picker (Zeng et al., supplementary "Preprocessing"): ``I_DoG = G(σ1) − G(σ2)`` with
``σ1 > σ2``, local maxima of ``I_DoG`` above a threshold ``C``, and a minimum distance between peaks
(15 voxels by default) keeping the stronger one. For dark protein (the cryo-ET default) that map is
positive on particles; for bright protein the sign is flipped, so a pick's score is always positive.

Out of core
    The volume is processed in 3D blocks read from a memory map. Each block carries a halo as wide
    as both Gaussian kernels plus the 3×3×3 local-maximum neighbourhood, so every interior voxel sees
    exactly the input the whole-volume computation sees: picks and scores are bit-identical to
    processing the whole volume at once (``tests/test_pick.py`` proves it), while memory is bounded
    by the block size. Blocks span the whole z extent when that fits the budget (tomograms are thin).
    Blocks are read with ``os.pread`` (not through the mapping, whose pages would stay resident).
    With ``threshold_sd`` on a volume much larger than a block, candidates are pruned with a
    conservative floor estimated from a few sample regions; if that estimate turns out above the
    exact threshold the volume is scanned again, so the result is still exact.

Speed
    Both Gaussians are separable float32 filters; the wider one is applied as a cascade on the
    narrower one (``G(σ1) = G(√(σ1²−σ2²)) ∘ G(σ2)``), which costs less than one Gaussian of σ1.
    Local maxima come from a separable 3×3×3 maximum filter; the threshold is applied before
    non-maximum suppression, which uses a KD-tree (O(P log P), never O(P²)).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .io.mrc import check_angpix, open_volume, release_pages
from .runtime.errors import UserError, file_error
from .runtime.log import logger, progress

TRUNCATE = 4.0  # Gaussian kernels are cut at 4 σ (scipy's default)
DEFAULT_MIN_DISTANCE_VOXELS = 15.0  # the paper's default
DEFAULT_CHUNK_VOXELS = 32 * 1024 * 1024  # block budget including halos (128 MB per float32 array)


@dataclass
class PickParams:
    """What to pick, in voxels of the picking volume (the tomogram after ``binning``).

    ``sigma_small``/``sigma_large`` are the two Gaussian widths (σ2 < σ1 in the paper's notation).
    Exactly one threshold rule applies: ``threshold`` (absolute DoG value), else ``threshold_sd``
    (mean + k·sd of the DoG map). ``max_picks`` keeps the strongest picks after suppression.
    Only peaks with a positive score (the chosen polarity) are ever candidates.
    """

    sigma_small: float
    sigma_large: float
    polarity: str = "dark"
    min_distance: float = DEFAULT_MIN_DISTANCE_VOXELS
    threshold: float | None = None
    threshold_sd: float | None = None
    max_picks: int | None = None
    border: float = 0.0
    binning: int = 1
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS

    def __post_init__(self) -> None:
        if self.polarity not in ("dark", "bright"):
            raise UserError(f"--polarity: expected dark or bright, got {self.polarity!r}")
        if not (0 < self.sigma_small < self.sigma_large):
            raise UserError(
                f"--sigma1/--sigma2: need 0 < small sigma < large sigma, got {self.sigma_small:g} "
                f"and {self.sigma_large:g}"
            )
        if self.min_distance < 0:
            raise UserError(f"--min-distance: must not be negative ({self.min_distance:g})")
        if self.max_picks is not None and self.max_picks < 0:
            raise UserError(f"--max-picks: must not be negative ({self.max_picks})")
        if self.binning < 1:
            raise UserError(f"--bin: must be a positive integer ({self.binning})")

    @property
    def halo(self) -> int:
        """Voxels of context each block needs so that its interior is computed exactly."""
        return gaussian_radius(self.sigma_small) + gaussian_radius(self.cascade_sigma) + 2

    @property
    def cascade_sigma(self) -> float:
        """The σ that turns G(σ2) into G(σ1): √(σ1² − σ2²)."""
        return math.sqrt(self.sigma_large**2 - self.sigma_small**2)


@dataclass
class PickResult:
    """Picks of one volume: positions ``(x, y, z)`` in pixels of the *input* tomogram, best first."""

    coords_xyz: np.ndarray
    scores: np.ndarray
    threshold: float
    n_candidates: int
    dog_mean: float
    dog_std: float
    shape_zyx: tuple[int, int, int]
    binning: int = 1
    n_suppressed: int = 0

    def __len__(self) -> int:
        return len(self.scores)


def gaussian_radius(sigma: float, truncate: float = TRUNCATE) -> int:
    """Half width of scipy's Gaussian kernel for ``sigma``."""
    return int(truncate * float(sigma) + 0.5)


def sigmas_for_diameter(diameter_angst: float, angpix: float) -> tuple[float, float]:
    """Default (σ_small, σ_large) in voxels for particles of ``diameter_angst``.

    A ball of radius r gives the strongest (scale-normalised) Laplacian-of-Gaussian response at
    σ = r/√3; the DoG pair brackets that scale with a ratio of 1.6, the usual LoG approximation.
    """
    if diameter_angst <= 0 or angpix <= 0:
        raise UserError(f"--particle-diameter: must be positive ({diameter_angst:g} Å)")
    r = 0.5 * diameter_angst / angpix
    s = max(r / math.sqrt(3.0), 0.5)
    return s / math.sqrt(1.6), s * math.sqrt(1.6)


# ----------------------------------------------------------------------------- volumes


class BinnedVolume:
    """A lazy, block-averaged float32 view of a (memory-mapped) ``[z, y, x]`` array.

    Slicing with three ``slice`` objects reads only the needed part of the source. A whole-file
    ``np.memmap`` (what :func:`~disca_tools.io.mrc.open_volume` returns) is read with ``os.pread``,
    one z slice of the needed rows at a time, so the file's pages never join this process's
    resident memory (reading through the mapping would keep them there and peak memory would grow
    with the tomogram, not the block).
    """

    def __init__(self, data: np.ndarray, binning: int = 1) -> None:
        self.data = data
        self.b = int(binning)
        self.shape = tuple(int(s) // self.b for s in data.shape)
        if min(self.shape) < 1:
            raise UserError(f"--bin {self.b}: larger than the volume {data.shape[::-1]}")
        self._file = None
        mm = getattr(data, "_mmap", None)
        if (
            isinstance(data, np.memmap)
            and data.filename
            and mm is not None
            and data.base is mm
            and data.ndim == 3
            and data.flags["C_CONTIGUOUS"]
        ):
            self._file = (str(data.filename), int(data.offset))

    def _read(self, src: tuple[slice, slice, slice]) -> np.ndarray:
        if self._file is None:
            out = np.array(self.data[src], dtype=np.float32)  # always a private copy
            release_pages(self.data)
            return out
        path, offset = self._file
        nz, ny, nx = self.data.shape
        dt = self.data.dtype
        z0, z1 = src[0].start, src[0].stop
        y0, y1 = src[1].start, src[1].stop
        x0, x1 = src[2].start, src[2].stop
        out = np.empty((z1 - z0, y1 - y0, x1 - x0), dtype=np.float32)
        row = nx * dt.itemsize
        fd = os.open(path, os.O_RDONLY)
        try:
            for k, z in enumerate(range(z0, z1)):
                start = offset + (z * ny + y0) * row
                buf = os.pread(fd, (y1 - y0) * row, start)
                if len(buf) != (y1 - y0) * row:
                    raise UserError(f"{path}: truncated volume (short read at z={z})")
                out[k] = np.frombuffer(buf, dtype=dt).reshape(y1 - y0, nx)[:, x0:x1]
        finally:
            os.close(fd)
        return out

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        b = self.b
        src = tuple(slice(k.start * b, k.stop * b) for k in key)
        block = self._read(src)
        if b == 1:
            return block
        nz, ny, nx = (s // b for s in block.shape)
        return block.reshape(nz, b, ny, b, nx, b).mean(axis=(1, 3, 5), dtype=np.float32)


def dog_map(volume_zyx: np.ndarray, params: PickParams) -> np.ndarray:
    """The DoG map of an in-memory block, signed so that particles of the polarity are positive."""
    vol = np.asarray(volume_zyx, dtype=np.float32)
    small = ndimage.gaussian_filter(vol, params.sigma_small, mode="reflect", truncate=TRUNCATE)
    del vol
    large = ndimage.gaussian_filter(small, params.cascade_sigma, mode="reflect", truncate=TRUNCATE)
    if params.polarity == "dark":  # paper: I(σ1) − I(σ2), positive on dark blobs
        large -= small
        return large
    small -= large
    return small


def _axis_tiles(n: int, tile: int) -> list[tuple[int, int]]:
    tile = max(1, min(n, tile))
    count = math.ceil(n / tile)
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def plan_blocks(
    shape_zyx: tuple[int, int, int], halo: int, budget_voxels: int
) -> list[tuple[tuple[int, int], ...]]:
    """Split a volume into interior blocks ``((z0, z1), (y0, y1), (x0, x1))``.

    Blocks span the whole z extent when a block of at least 64 voxels in y/x (plus halo) fits in
    ``budget_voxels``; otherwise they are cubes. The halo is added when the block is read.
    """
    nz, ny, nx = shape_zyx
    if nz * (64 + 2 * halo) ** 2 <= budget_voxels:
        side = int(math.sqrt(budget_voxels / nz)) - 2 * halo
        tz = nz
    else:
        side = int(round(budget_voxels ** (1 / 3))) - 2 * halo
        tz = max(16, side)
    side = max(16, side)
    return [
        (z, y, x)
        for z in _axis_tiles(nz, tz)
        for y in _axis_tiles(ny, side)
        for x in _axis_tiles(nx, side)
    ]


def _moments(core: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares in float64, a few slices at a time (no float64 copy of the block)."""
    total = total2 = 0.0
    for z in range(0, core.shape[0], 8):
        part = core[z : z + 8].astype(np.float64)
        total += float(part.sum())
        total2 += float(np.einsum("ijk,ijk->", part, part))
    return total, total2


_NEIGHBOURS = [
    (dz, dy, dx)
    for dz in (-1, 0, 1)
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dz, dy, dx) != (0, 0, 0) and abs(dz) + abs(dy) + abs(dx) > 1
]


def local_maxima(dog: np.ndarray, region: tuple[slice, slice, slice], floor: float) -> np.ndarray:
    """Voxels of ``dog[region]`` above ``floor`` and ≥ all 26 neighbours (neighbours outside the
    array are ignored, as ``maximum_filter(mode="nearest")`` would). Returns ``(k, 3)`` indices into
    ``dog``.

    Cheap first: the floor and the 6 face neighbours with shifted views; the remaining 20 edge and
    corner neighbours only for the few survivors.
    """
    cand = np.zeros(dog.shape, dtype=bool)
    cand[region] = dog[region] > floor
    for ax in range(3):
        n = dog.shape[ax]
        if n < 2:
            continue
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax], b[ax] = slice(1, n), slice(0, n - 1)
        a, b = tuple(a), tuple(b)
        cand[a] &= dog[a] >= dog[b]
        cand[b] &= dog[b] >= dog[a]
    idx = np.stack(np.nonzero(cand), axis=1)
    if not len(idx):
        return idx
    shape = np.asarray(dog.shape)
    ok = np.ones(len(idx), dtype=bool)
    val = dog[idx[:, 0], idx[:, 1], idx[:, 2]]
    for d in _NEIGHBOURS:
        nb = idx + np.asarray(d)
        inside = np.all((nb >= 0) & (nb < shape), axis=1)
        nbc = np.clip(nb, 0, shape - 1)
        ok &= ~inside | (val >= dog[nbc[:, 0], nbc[:, 1], nbc[:, 2]])
    return idx[ok]


def _block_peaks(
    source: BinnedVolume | np.ndarray,
    block: tuple[tuple[int, int], ...],
    params: PickParams,
    floor: float,
) -> tuple[np.ndarray, np.ndarray, float, float, int]:
    """Local maxima (interior of ``block``) above ``floor``: (zyx int, scores, sum, sumsq, count)."""
    h = params.halo
    shape = source.shape
    lo = [max(0, a - h) for a, _ in block]
    hi = [min(n, b + h) for (_, b), n in zip(block, shape, strict=True)]
    data = source[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    dog = dog_map(data, params)
    del data
    inner = tuple(slice(a - l0, b - l0) for (a, b), l0 in zip(block, lo, strict=True))
    total, total2 = _moments(dog[inner])
    idx = local_maxima(dog, inner, floor)
    scores = dog[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float32)
    zyx = (idx + np.asarray(lo)).astype(np.int64)
    count = int(np.prod([b - a for a, b in block]))
    return zyx, scores, total, total2, count


def non_maximum_suppression(
    coords: np.ndarray, scores: np.ndarray, min_distance: float
) -> np.ndarray:
    """Indices of the peaks kept by greedy suppression, strongest first.

    A peak is kept unless a stronger kept peak lies closer than ``min_distance`` (ties broken by
    position order). Uses a KD-tree: each kept peak queries its neighbourhood once, O(P log P).
    """
    n = len(scores)
    order = np.lexsort((np.arange(n), -np.asarray(scores, dtype=np.float64)))
    if n == 0 or min_distance <= 0:
        return order
    pts = np.asarray(coords, dtype=np.float64)[order]
    tree = cKDTree(pts)
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    # strictly closer than min_distance: query a hair inside the radius
    radius = float(min_distance) * (1 - 1e-9)
    for rank in range(n):
        if suppressed[rank]:
            continue
        keep.append(rank)
        suppressed[tree.query_ball_point(pts[rank], radius)] = True
    return order[np.asarray(keep, dtype=np.int64)]


def _scan(
    source: BinnedVolume, blocks: list, params: PickParams, floor: float, desc: str | None
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """All blocks: local maxima above ``floor`` and the DoG mean and standard deviation."""
    all_zyx, all_scores = [], []
    s1 = s2 = 0.0
    count = 0
    for block in progress(blocks, total=len(blocks), desc=desc or "picking", unit="block"):
        zyx, sc, t1, t2, c = _block_peaks(source, block, params, floor)
        all_zyx.append(zyx)
        all_scores.append(sc)
        s1, s2, count = s1 + t1, s2 + t2, count + c
    zyx = np.concatenate(all_zyx) if all_zyx else np.zeros((0, 3), np.int64)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32)
    mean = s1 / max(count, 1)
    std = math.sqrt(max(s2 / max(count, 1) - mean * mean, 0.0))
    return zyx, scores, mean, std


def _estimated_floor(source: BinnedVolume, params: PickParams, side: int = 64) -> float:
    """A safe lower bound for the ``threshold_sd`` threshold, from DoG statistics of a few samples.

    Only for volumes much larger than one block (smaller ones keep every positive maximum): it
    bounds the memory taken by candidates on huge tomograms. Half the estimated threshold is used,
    and :func:`pick_volume` rescans exactly in the rare case the estimate was too high.
    """
    shape = source.shape
    if math.prod(shape) <= 8 * params.chunk_voxels:
        return 0.0
    h = params.halo
    s1 = s2 = 0.0
    n = 0
    for fy in (0.25, 0.5, 0.75):
        for fx in (0.25, 0.5, 0.75):
            centre = (shape[0] // 2, int(fy * shape[1]), int(fx * shape[2]))
            sl, inner = [], []
            for c, size in zip(centre, shape, strict=True):
                a = max(0, min(c - side // 2, size - side))
                b = min(size, a + side)
                lo, hi = max(0, a - h), min(size, b + h)
                sl.append(slice(lo, hi))
                inner.append(slice(a - lo, b - lo))
            dog = dog_map(source[tuple(sl)], params)[tuple(inner)].astype(np.float64)
            s1, s2, n = s1 + float(dog.sum()), s2 + float((dog * dog).sum()), n + dog.size
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean * mean, 0.0))
    return max(0.0, 0.5 * (mean + float(params.threshold_sd) * std))


def pick_volume(
    volume_zyx: np.ndarray,
    params: PickParams,
    mask_zyx: np.ndarray | None = None,
    desc: str | None = None,
) -> PickResult:
    """Pick particles in a (memory-mapped) volume block by block; see the module docstring.

    ``mask_zyx`` (same shape as the volume, any dtype) keeps picks where it is > 0.5.
    Coordinates are returned in pixels of ``volume_zyx`` even when ``params.binning`` > 1.
    """
    if np.asarray(volume_zyx[:1, :1, :1]).ndim != 3:
        raise UserError("volume must be 3D")
    source = BinnedVolume(volume_zyx, params.binning)
    shape = source.shape
    if params.threshold is not None:
        floor = max(0.0, float(params.threshold))
    elif params.threshold_sd is not None and params.threshold_sd > 0:
        floor = _estimated_floor(source, params)
    else:
        floor = 0.0
    blocks = plan_blocks(shape, params.halo, params.chunk_voxels)
    zyx, scores, mean, std = _scan(source, blocks, params, floor, desc)
    if params.threshold is not None:
        threshold = floor
    elif params.threshold_sd is not None:
        threshold = max(0.0, mean + float(params.threshold_sd) * std)
        if threshold < floor:  # the estimate pruned too much: scan again, exactly
            logger.debug(
                "%s: floor estimate %.4g above threshold %.4g; rescanning", desc, floor, threshold
            )
            zyx, scores, mean, std = _scan(source, blocks, params, 0.0, desc)
    else:
        threshold = 0.0
    n_candidates = int((scores > threshold).sum())  # local maxima above the threshold
    sel = scores > threshold
    # border, in voxels of the picking volume
    b = float(params.border) / params.binning
    if b > 0:
        upper = np.asarray(shape) - 1 - b
        sel &= np.all((zyx >= b) & (zyx <= upper), axis=1)
    zyx, scores = zyx[sel], scores[sel]
    xyz_input = zyx[:, ::-1].astype(np.float64) * params.binning + (params.binning - 1) / 2.0
    if mask_zyx is not None and len(scores):
        if tuple(mask_zyx.shape) != tuple(volume_zyx.shape):
            raise UserError(
                f"--mask: shape {mask_zyx.shape[::-1]} differs from the tomogram {volume_zyx.shape[::-1]}"
            )
        iz, iy, ix = (
            np.clip(np.round(xyz_input[:, k]).astype(int), 0, volume_zyx.shape[2 - k] - 1)
            for k in (2, 1, 0)
        )
        inside = np.asarray(mask_zyx[iz, iy, ix], dtype=np.float32) > 0.5
        zyx, scores, xyz_input = zyx[inside], scores[inside], xyz_input[inside]
    keep = non_maximum_suppression(zyx.astype(np.float64), scores, params.min_distance)
    n_before = len(scores)
    if params.max_picks is not None:
        keep = keep[: params.max_picks]
    result = PickResult(
        coords_xyz=xyz_input[keep],
        scores=scores[keep],
        threshold=float(threshold),
        n_candidates=int(n_candidates),
        dog_mean=float(mean),
        dog_std=float(std),
        shape_zyx=tuple(int(s) for s in volume_zyx.shape),
        binning=params.binning,
        n_suppressed=int(n_before - len(keep)),
    )
    logger.debug(
        "%s: %d local maxima, threshold %.4g (DoG mean %.3g sd %.3g), %d picks",
        desc or "volume",
        n_candidates,
        threshold,
        mean,
        std,
        len(result),
    )
    return result


# ----------------------------------------------------------------------------- files


@dataclass
class TomogramPickJob:
    """Everything needed to pick one tomogram file (picklable, for worker processes)."""

    name: str
    path: str
    angpix: float | None
    params: PickParams | None
    diameter_angst: float | None = None
    sigma1_angst: float | None = None
    sigma2_angst: float | None = None
    min_distance_angst: float | None = None
    border_angst: float | None = None
    mask: str | None = None


def resolve_params(job: TomogramPickJob, angpix: float, base: PickParams) -> PickParams:
    """Turn Å options into voxels of the (binned) picking volume."""
    b = base.binning
    vox = angpix * b
    if job.sigma1_angst and job.sigma2_angst:
        lo, hi = sorted((job.sigma1_angst / vox, job.sigma2_angst / vox))
    elif job.diameter_angst:
        lo, hi = sigmas_for_diameter(job.diameter_angst, vox)
    else:
        lo, hi = base.sigma_small, base.sigma_large
    md = job.min_distance_angst / vox if job.min_distance_angst is not None else base.min_distance
    border = job.border_angst / angpix if job.border_angst is not None else base.border
    return PickParams(
        sigma_small=lo,
        sigma_large=hi,
        polarity=base.polarity,
        min_distance=md,
        threshold=base.threshold,
        threshold_sd=base.threshold_sd,
        max_picks=base.max_picks,
        border=border,
        binning=b,
        chunk_voxels=base.chunk_voxels,
    )


def pick_file(job: TomogramPickJob) -> tuple[PickResult, PickParams, float]:
    """Pick one tomogram file (memory-mapped); returns (result, params in voxels, angpix)."""
    data, header_angpix = open_volume(job.path)
    angpix = check_angpix(job.path, header_angpix, job.angpix)
    assert job.params is not None
    params = resolve_params(job, angpix, job.params)
    mask = None
    if job.mask:
        mask, _ = open_volume(job.mask)
        if tuple(mask.shape) != tuple(data.shape):
            raise file_error(
                job.mask,
                f"mask shape {mask.shape[::-1]} differs from {job.path} {data.shape[::-1]}",
            )
    if min(data.shape) < 2 * params.binning:
        raise file_error(
            job.path, f"volume {data.shape[::-1]} too small to pick at binning {params.binning}"
        )
    result = pick_volume(data, params, mask, desc=job.name)
    return result, params, angpix


def results_table(name: str, path: str, result: PickResult) -> dict[str, np.ndarray | list]:
    """Columns of a RELION 3.1-style coordinates table for one tomogram."""
    n = len(result)
    return {
        "rlnMicrographName": [str(path)] * n,
        "rlnTomoName": [name] * n,
        "rlnCoordinateX": result.coords_xyz[:, 0],
        "rlnCoordinateY": result.coords_xyz[:, 1],
        "rlnCoordinateZ": result.coords_xyz[:, 2],
        "rlnAutopickFigureOfMerit": result.scores.astype(np.float64),
    }


def tomo_name(path: str | Path) -> str:
    """Tomogram name from a file path (file name without .mrc/.rec/.map)."""
    name = Path(path).name
    for suffix in (".mrc", ".rec", ".map", ".st"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
