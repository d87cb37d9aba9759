"""Put class maps back into tomogram space (``disca_reembed``): density and label volumes.

Each particle's class map is placed at its (refined) position and orientation with RELION's
convention, through :func:`disca_tools.geometry.rotate_volume`: the particle centre is at
``coordinate − origin / angpix`` (tomogram pixels) and the placed box satisfies
``box(x) = map(M · (x − c − d) + c)``, M from (rot, tilt, psi). Overlapping particles add up in the
density; the label volume holds, per voxel, the class of the placed map that is strongest there
among those above their contour (0 = background).

Maps are matched to classes by number: a map whose file name contains ``classNNN`` / ``class_NNN``
(RELION's ``run_class001.mrc``, ``run_it025_class002.mrc``, our ``class_003_average.mrc``) serves
class NNN; maps without a number in their names serve the classes present in the STAR in increasing
order (first map → smallest class number). Maps are resampled to the tomogram's voxel size
(:func:`disca_tools.geometry.resample_volume`) and softly masked by the sphere inscribed in their box.

Without angles every particle becomes a sphere of its class's size (the radius of the sphere with the
volume of the map above its contour) filled with 1.

Memory: :func:`reembed_slabs` yields the volume a z slab at a time; particles are rotated once and
kept only while they overlap the current slab, so memory stays at a few slabs whatever the tomogram.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .geometry import euler_to_matrix, resample_volume, rotate_volume
from .io.mrc import create_volume_memmap, mrc_header, read_volume
from .io.particles import ANGLES, CLASS, origins_px
from .runtime.errors import UserError, file_error
from .runtime.log import check_abort, logger, progress
from .runtime.outputs import atomic_path

SUBTOMO_ANGLES = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
ORIGINS_PX = ("rlnOriginX", "rlnOriginY", "rlnOriginZ")
_CLASS_IN_NAME = re.compile(r"class_?(\d+)", re.IGNORECASE)


# ----------------------------------------------------------------------------- class maps


@dataclass
class ClassMap:
    """A class's map ready for placing: at the tomogram voxel size, cubic, protein positive."""

    class_number: int
    volume_zyx: np.ndarray
    threshold: float
    radius_px: float
    source: str


def class_number_from_name(path: str | Path) -> int | None:
    """The class number in a map's file name (``run_class002.mrc`` → 2), or None."""
    found = _CLASS_IN_NAME.findall(Path(path).name)
    return int(found[-1]) if found else None


def match_maps(
    paths: Sequence[str | Path], star_classes: Sequence[int], source: str = "--maps"
) -> dict[int, Path]:
    """Class number → map path (see the module docstring for the rule)."""
    paths = [Path(p) for p in paths]
    numbers = [class_number_from_name(p) for p in paths]
    if all(n is not None for n in numbers):
        out: dict[int, Path] = {}
        for n, p in zip(numbers, paths, strict=True):
            if n in out:
                raise file_error(p, f"second map for class {n} (first: {out[n]})")
            out[n] = p
    elif all(n is None for n in numbers):
        classes = sorted(set(int(c) for c in star_classes))
        if len(paths) < len(classes):
            raise UserError(
                f"{source}: {len(paths)} map(s) for {len(classes)} classes ({', '.join(map(str, classes))}); "
                "give one map per class, in class order, or name them classNNN"
            )
        out = dict(zip(classes, paths, strict=False))
    else:
        raise UserError(
            f"{source}: some map names carry a class number (classNNN) and some do not; name all or none"
        )
    missing = sorted(set(int(c) for c in star_classes) - set(out))
    if missing:
        raise UserError(
            f"{source}: class {missing[0]} has no map (maps given for classes {', '.join(map(str, sorted(out)))})"
        )
    return out


def soft_sphere_mask(box: int, radius: float | None = None, edge: float = 2.0) -> np.ndarray:
    """A sphere about the ``N // 2`` centre with a raised-cosine edge of ``edge`` voxels."""
    r0 = (box / 2.0 - edge) if radius is None else radius
    g = np.arange(box) - box // 2
    d = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    m = np.clip((r0 + edge - d) / edge, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * m)).astype(np.float32)


def prepare_class_map(
    volume_zyx: np.ndarray,
    map_angpix: float,
    tomo_angpix: float,
    class_number: int,
    contour: float | None = None,
    contour_fraction: float = 0.25,
    invert: bool = False,
    mask: bool = True,
    source: str = "map",
) -> ClassMap:
    """Resample, (invert), mask and threshold one class map."""
    vol = np.asarray(volume_zyx, dtype=np.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise file_error(source, f"expected a cubic 3D map, got shape {vol.shape[::-1]} (x, y, z)")
    if map_angpix <= 0:
        raise file_error(source, "header has no voxel size; pass --map-angpix")
    if invert:
        vol = -vol
    if abs(map_angpix - tomo_angpix) > 1e-3 * tomo_angpix:
        logger.info("%s: resampling from %.4g to %.4g Å/voxel", source, map_angpix, tomo_angpix)
        vol = resample_volume(vol, map_angpix, tomo_angpix)
        if len(set(vol.shape)) != 1 or vol.shape[0] < 2:
            raise file_error(source, f"resampled map has shape {vol.shape}; check the voxel sizes")
    if mask:
        vol = vol * soft_sphere_mask(vol.shape[0])
    vmax = float(vol.max())
    threshold = float(contour) if contour is not None else contour_fraction * vmax
    if vmax <= 0 or threshold >= vmax:
        hint = " (protein dark? try --invert)" if vmax <= 0 or float(vol.min()) < -vmax else ""
        raise file_error(
            source, f"no density above the contour {threshold:.4g} (map max {vmax:.4g}){hint}"
        )
    n_in = int((vol > threshold).sum())
    radius = (3.0 * n_in / (4.0 * math.pi)) ** (1.0 / 3.0)
    return ClassMap(
        int(class_number), vol.astype(np.float32), threshold, float(radius), str(source)
    )


def load_class_maps(
    maps: dict[int, Path],
    tomo_angpix: float,
    map_angpix: float | None = None,
    contour: float | None = None,
    contour_fraction: float = 0.25,
    invert: bool = False,
    mask: bool = True,
) -> dict[int, ClassMap]:
    """Read and prepare every class's map (``map_angpix`` overrides the headers)."""
    out = {}
    for c, path in maps.items():
        vol, angpix = read_volume(path, angpix=map_angpix)
        out[c] = prepare_class_map(
            vol, angpix, tomo_angpix, c, contour, contour_fraction, invert, mask, str(path)
        )
    return out


# ----------------------------------------------------------------------------- particles


@dataclass
class Placements:
    """Particles of one tomogram ready to place: centres (tomogram px, x y z), classes, matrices."""

    centres_xyz: np.ndarray
    classes: np.ndarray
    matrices: np.ndarray | None

    def __len__(self) -> int:
        return len(self.classes)


def particle_placements(
    particles: pd.DataFrame,
    coords_px: np.ndarray,
    tomo_angpix: float,
    image_angpix: float | None = None,
    source: str = "particles",
) -> Placements:
    """Centres and orientations from a particle table whose ``coords_px`` are in tomogram pixels.

    The centre is ``coordinate − origin`` (``rlnOriginX/Y/ZAngst`` in Å, or RELION 3.0's
    ``rlnOriginX/Y/Z`` in pixels of ``image_angpix``). RELION 4/5 ``rlnTomoSubtomogram*`` angles,
    when present, are composed before the particle's own (``M = M_subtomo · M_particle``).
    """
    if CLASS not in particles.columns:
        raise file_error(
            source,
            f"no {CLASS} column: which map goes where is unknown (cluster or classify first)",
        )
    centres = np.asarray(coords_px, dtype=np.float64).copy()
    origins = origins_px(particles, tomo_angpix)
    if origins is not None:
        centres -= origins
    elif all(c in particles.columns for c in ORIGINS_PX):
        if not image_angpix:
            raise file_error(
                source, "origins in pixels (rlnOriginX) but no image pixel size to convert them"
            )
        centres -= (
            particles[list(ORIGINS_PX)].to_numpy(np.float64)
            * float(image_angpix)
            / float(tomo_angpix)
        )
    try:
        classes = particles[CLASS].astype(np.int64).to_numpy()
    except (TypeError, ValueError):
        raise file_error(source, f"{CLASS} has values that are not integers") from None
    matrices = None
    if all(c in particles.columns for c in ANGLES):
        matrices = euler_to_matrix(particles[list(ANGLES)].to_numpy(np.float64)).reshape(-1, 3, 3)
        if all(c in particles.columns for c in SUBTOMO_ANGLES):
            sub = euler_to_matrix(particles[list(SUBTOMO_ANGLES)].to_numpy(np.float64)).reshape(
                -1, 3, 3
            )
            matrices = sub @ matrices
    return Placements(centres, classes, matrices)


# ----------------------------------------------------------------------------- placing


def _sphere_box(radius: float, frac_xyz: np.ndarray) -> np.ndarray:
    box = int(2 * math.ceil(radius) + 3)
    g = np.arange(box) - box // 2
    dz, dy, dx = (
        (g - frac_xyz[2])[:, None, None],
        (g - frac_xyz[1])[None, :, None],
        (g - frac_xyz[0])[None, None, :],
    )
    return ((dx**2 + dy**2 + dz**2) <= radius * radius).astype(np.float32)


def _particle_box(
    i: int, pl: Placements, maps: dict[int, ClassMap], spheres: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The placed box of particle ``i`` and the tomogram index ``(x, y, z)`` of its voxel [0, 0, 0]."""
    cm = maps[int(pl.classes[i])]
    centre = pl.centres_xyz[i]
    ic = np.round(centre)
    frac = centre - ic
    if spheres or pl.matrices is None:
        box = _sphere_box(cm.radius_px, frac)
    else:
        box = rotate_volume(
            cm.volume_zyx, matrix_xyz=pl.matrices[i], center_offset_xyz=frac, order=1
        )
    n = box.shape[0]
    return box, ic.astype(np.int64) - n // 2


def reembed_slabs(
    placements: Placements,
    maps: dict[int, ClassMap],
    shape_zyx: tuple[int, int, int],
    slab: int = 32,
    spheres: bool = False,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(z0, density_slab, label_slab)`` covering the tomogram from z = 0 upwards.

    ``density_slab`` is float32 ``[z, y, x]``, ``label_slab`` int16 class numbers (0 background).
    """
    nz, ny, nx = (int(s) for s in shape_zyx)
    sizes = np.array(
        [
            (
                int(2 * math.ceil(maps[int(c)].radius_px) + 3)
                if spheres or placements.matrices is None
                else maps[int(c)].volume_zyx.shape[0]
            )
            for c in placements.classes
        ],
        dtype=np.int64,
    )
    z_start = (
        np.round(placements.centres_xyz[:, 2]).astype(np.int64) - sizes // 2
        if len(placements)
        else np.zeros(0, np.int64)
    )
    order = np.argsort(z_start, kind="stable")
    nxt = 0
    active: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    slab = max(1, int(slab))
    for z0 in progress(
        range(0, nz, slab), total=(nz + slab - 1) // slab, desc="re-embed slabs", unit="slab"
    ):
        z1 = min(nz, z0 + slab)
        while nxt < len(order) and z_start[order[nxt]] < z1:
            i = int(order[nxt])
            nxt += 1
            if z_start[i] + sizes[i] <= z0:
                continue  # entirely below the volume (z < 0)
            active[i] = _particle_box(i, placements, maps, spheres)
            check_abort()
        dens = np.zeros((z1 - z0, ny, nx), np.float32)
        labels = np.zeros((z1 - z0, ny, nx), np.int16)
        best = np.full((z1 - z0, ny, nx), -np.inf, np.float32)
        for i, (box, origin) in list(active.items()):
            n = box.shape[0]
            ox, oy, oz = (int(v) for v in origin)
            if oz + n <= z0:
                del active[i]
                continue
            a0, a1 = max(oz, z0), min(oz + n, z1)
            b0, b1 = max(oy, 0), min(oy + n, ny)
            c0, c1 = max(ox, 0), min(ox + n, nx)
            if a1 <= a0 or b1 <= b0 or c1 <= c0:
                if oz + n <= z1:
                    del active[i]
                continue
            sub = box[a0 - oz : a1 - oz, b0 - oy : b1 - oy, c0 - ox : c1 - ox]
            dst = (slice(a0 - z0, a1 - z0), slice(b0, b1), slice(c0, c1))
            dens[dst] += sub
            cls = int(placements.classes[i])
            thr = 0.5 if spheres or placements.matrices is None else maps[cls].threshold
            win = (sub > thr) & (sub > best[dst])
            labels[dst][win] = cls
            best[dst] = np.where(win, sub, best[dst])
            if oz + n <= z1:
                del active[i]
        yield z0, dens, labels


def reembed_arrays(
    placements: Placements,
    maps: dict[int, ClassMap],
    shape_zyx: tuple[int, int, int],
    slab: int = 32,
    spheres: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole density and label volumes in memory (small tomograms and tests)."""
    dens = np.zeros(shape_zyx, np.float32)
    labels = np.zeros(shape_zyx, np.int16)
    for z0, d, lab in reembed_slabs(placements, maps, shape_zyx, slab, spheres):
        dens[z0 : z0 + len(d)] = d
        labels[z0 : z0 + len(d)] = lab
    return dens, labels


def auto_slab(shape_zyx: tuple[int, int, int], max_bytes: int = 128 * 2**20) -> int:
    """Slab thickness keeping the three slab buffers (10 bytes/voxel) under ``max_bytes``."""
    per_z = int(shape_zyx[1]) * int(shape_zyx[2]) * 10
    return int(max(1, min(int(shape_zyx[0]), max_bytes // max(per_z, 1))))


def _write_header_stats(
    path: Path,
    shape_zyx: tuple[int, int, int],
    angpix: float,
    dtype: np.dtype,
    stats: tuple[float, float, float, float],
) -> None:
    header = mrc_header(shape_zyx, angpix, dtype, stats)
    with open(path, "r+b") as fh:
        fh.write(header.tobytes())


def write_reembedded(
    density_path: str | Path,
    labels_path: str | Path,
    placements: Placements,
    maps: dict[int, ClassMap],
    shape_zyx: tuple[int, int, int],
    angpix: float,
    slab: int | None = None,
    spheres: bool = False,
) -> dict[str, float]:
    """Write ``<tomo>_reembedded.mrc`` (float32) and ``<tomo>_labels.mrc`` (int16) slab by slab.

    Each file is created as an on-disk memmap under a temporary name and renamed when complete, so
    memory stays bounded and an interrupted run leaves nothing half-written. Returns statistics.
    """
    shape_zyx = tuple(int(s) for s in shape_zyx)
    slab = slab or auto_slab(shape_zyx)
    ny, nx = shape_zyx[1], shape_zyx[2]
    counts: dict[int, int] = {}
    dmin, dmax, dsum, dsq = math.inf, -math.inf, 0.0, 0.0
    with atomic_path(density_path) as dtmp, atomic_path(labels_path) as ltmp:
        mm = create_volume_memmap(dtmp, shape_zyx, angpix)
        del mm  # re-mapped one slab at a time below, so mapped pages never exceed a slab
        _create_int16(ltmp, shape_zyx, angpix)
        for z0, d, lab in reembed_slabs(placements, maps, shape_zyx, slab, spheres):
            dm = np.memmap(dtmp, np.float32, "r+", offset=1024 + z0 * ny * nx * 4, shape=d.shape)
            dm[:] = d
            dm.flush()
            del dm
            lm = np.memmap(ltmp, np.int16, "r+", offset=1024 + z0 * ny * nx * 2, shape=lab.shape)
            lm[:] = lab
            lm.flush()
            del lm
            dmin, dmax = min(dmin, float(d.min())), max(dmax, float(d.max()))
            dsum += float(d.sum(dtype=np.float64))
            dsq += sum(float(np.dot(dz.ravel(), dz.ravel())) for dz in d)  # no float64 slab copy
            for v, k in enumerate(np.bincount(lab.ravel()).tolist()):  # labels are ≥ 0
                if k:
                    counts[v] = counts.get(v, 0) + k
        total = float(np.prod(shape_zyx))
        mean = dsum / total
        rms = math.sqrt(max(dsq / total - mean * mean, 0.0))
        _write_header_stats(dtmp, shape_zyx, angpix, np.dtype(np.float32), (dmin, dmax, mean, rms))
        lmax = max(counts) if counts else 0
        _write_header_stats(
            ltmp, shape_zyx, angpix, np.dtype(np.int16), (0.0, float(lmax), 0.0, 0.0)
        )
    return {
        "density_min": dmin,
        "density_max": dmax,
        "density_mean": mean,
        **{f"voxels_class_{k}": v for k, v in sorted(counts.items()) if k},
    }


def _create_int16(path: Path, shape_zyx: tuple[int, int, int], angpix: float) -> None:
    header = mrc_header(shape_zyx, angpix, np.dtype(np.int16))
    with open(path, "wb") as fh:
        fh.write(header.tobytes())
        fh.truncate(1024 + int(np.prod(shape_zyx)) * 2)
