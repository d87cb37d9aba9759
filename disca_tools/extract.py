"""Subtomogram extraction: boxes from memory-mapped tomograms, normalisation, wedge/CTF weights, fast store.

Geometry (RELION): a particle at 0-based pixel ``c`` is extracted so that its rounded position sits
at box index ``N // 2``; with ``binning`` b the tomogram is block-averaged by b first (pixel ``c`` of
the tomogram is at ``(c − (b−1)/2) / b`` in the binned grid). The sub-voxel remainder ``d`` (particle
centre minus box centre, binned pixels) is returned so the caller can record it as RELION's origin
(``rlnOrigin*Angst = −d · angpix``; the particle centre is ``coordinate − origin``).

Values: each subtomogram is normalised to zero mean and unit standard deviation, as the paper does,
after optional inversion (protein white for RELION). Boxes leaving the tomogram are skipped or padded
with Gaussian noise matching the mean and standard deviation of the part inside.

Fast store (read by disca_cluster): ``subtomograms.npy``, a plain ``np.save`` array of shape
``(N, S, S, S)`` (float32, or float16), row ``i`` being the ``i``-th particle of ``particles.star``,
and ``subtomograms_names.txt`` with each row's rlnImageName, one per line. It is written through
``np.lib.format.open_memmap`` under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io.mrc import release_pages
from .io.store import STORE_FILE, open_store
from .runtime.errors import UserError
from .runtime.log import progress

BORDER_MODES = ("skip", "pad")


@dataclass(frozen=True)
class ExtractParams:
    """Box size in output voxels, binning, inversion, border handling, output precision."""

    box: int = 24
    binning: int = 1
    invert: bool = True
    border: str = "skip"
    float16: bool = False

    def __post_init__(self) -> None:
        if self.box < 2:
            raise UserError(f"--box: must be at least 2 ({self.box})")
        if self.binning < 1:
            raise UserError(f"--bin: must be a positive integer ({self.binning})")
        if self.border not in BORDER_MODES:
            raise UserError(f"--border: expected skip or pad, got {self.border!r}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.float16 else np.float32)


def binned_positions(coords_px_xyz: np.ndarray, binning: int) -> np.ndarray:
    """Tomogram pixel positions ``(x, y, z)`` → positions on the grid binned by ``binning``."""
    c = np.asarray(coords_px_xyz, dtype=np.float64).reshape(-1, 3)
    return (c - (binning - 1) / 2.0) / binning


def box_starts(coords_px_xyz: np.ndarray, params: ExtractParams) -> tuple[np.ndarray, np.ndarray]:
    """Integer box starts ``(z, y, x)`` on the binned grid and sub-voxel residuals ``d`` ``(x, y, z)``."""
    pos = binned_positions(coords_px_xyz, params.binning)
    centre = np.floor(pos + 0.5).astype(np.int64)  # round half up, stable for .5
    starts_xyz = centre - params.box // 2
    return starts_xyz[:, ::-1].copy(), pos - centre


def inside_mask(
    starts_zyx: np.ndarray, binned_shape_zyx: tuple[int, int, int], box: int
) -> np.ndarray:
    """True for boxes lying entirely inside the (binned) tomogram."""
    s = np.asarray(starts_zyx).reshape(-1, 3)
    hi = np.asarray(binned_shape_zyx) - box
    return np.all((s >= 0) & (s <= hi), axis=1)


def box_centres_px(coords_px_xyz: np.ndarray, binning: int) -> np.ndarray:
    """The tomogram pixel position of each box centre (where RELION's coordinate should point)."""
    pos = binned_positions(coords_px_xyz, binning)
    centre = np.floor(pos + 0.5)
    return centre * binning + (binning - 1) / 2.0


def normalise(sub: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation (a constant box becomes zeros), in place on float32."""
    sub -= np.float32(sub.mean(dtype=np.float64))
    flat = sub.reshape(-1)
    sd = float(np.sqrt(np.dot(flat, flat) / flat.size))  # BLAS dot: fast, float32 is plenty here
    if sd > 0:
        sub *= np.float32(1.0 / sd)
    return sub


def read_box(
    volume_zyx: np.ndarray,
    start_zyx: np.ndarray,
    params: ExtractParams,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One box (float32, binned, inverted if asked, normalised) starting at ``start_zyx`` (binned grid).

    Parts outside the tomogram are filled with noise N(mean, sd) of the part inside (``border="pad"``).
    """
    b, n = params.binning, params.box
    full = np.asarray(volume_zyx.shape)
    lo = np.asarray(start_zyx, dtype=np.int64) * b
    hi = lo + n * b
    clo, chi = np.maximum(lo, 0), np.minimum(hi, full)
    if np.all(clo == lo) and np.all(chi == hi):
        raw = np.asarray(volume_zyx[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
        sub = (
            raw if b == 1 else raw.reshape(n, b, n, b, n, b).mean(axis=(1, 3, 5), dtype=np.float32)
        )
        sub = (
            np.array(sub, dtype=np.float32, copy=True)
            if sub is raw and raw.base is not None
            else sub
        )
    else:
        # pad: read the inside part on the binned grid, fill the rest with matching noise
        blo = -(-clo // b)  # first binned voxel fully inside
        bhi = chi // b
        sub = np.full((n, n, n), np.nan, dtype=np.float32)
        if np.all(bhi > blo):
            raw = np.asarray(
                volume_zyx[
                    blo[0] * b : bhi[0] * b, blo[1] * b : bhi[1] * b, blo[2] * b : bhi[2] * b
                ],
                dtype=np.float32,
            )
            m = bhi - blo
            part = raw if b == 1 else raw.reshape(m[0], b, m[1], b, m[2], b).mean(axis=(1, 3, 5))
            o = blo - np.asarray(start_zyx)
            sub[o[0] : o[0] + m[0], o[1] : o[1] + m[1], o[2] : o[2] + m[2]] = part
        holes = np.isnan(sub)
        inside = sub[~holes]
        mean, sd = (float(inside.mean()), float(inside.std())) if inside.size else (0.0, 1.0)
        rng = rng if rng is not None else np.random.default_rng(0)
        sub[holes] = rng.normal(mean, sd, int(holes.sum())).astype(np.float32)
    if params.invert:
        np.negative(sub, out=sub)
    return normalise(sub)


def iter_boxes(
    volume_zyx: np.ndarray,
    starts_zyx: np.ndarray,
    params: ExtractParams,
    rng: np.random.Generator,
    desc: str = "extract",
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, box)`` for every start, visiting them in z/y order for memory-map locality."""
    s = np.asarray(starts_zyx).reshape(-1, 3)
    order = np.lexsort((s[:, 2], s[:, 1], s[:, 0]))
    plain = np.asarray(volume_zyx)  # an ndarray view: slicing a np.memmap subclass is slower
    for n, i in enumerate(progress(order, total=len(order), desc=desc, unit="particle")):
        yield int(i), read_box(plain, s[i], params, rng)
        if n % 4096 == 4095:  # keep the memory map's resident pages bounded on huge tomograms
            release_pages(volume_zyx)
    release_pages(volume_zyx)


def write_store_names(path: str | Path, names: list[str]) -> Path:
    """Write ``subtomograms_names.txt`` (one rlnImageName per line) atomically."""
    from .runtime.outputs import write_text_atomic

    return write_text_atomic(path, "".join(f"{n}\n" for n in names))


class StoreWriter:
    """Stream subtomograms into ``subtomograms.npy`` and rename it into place when complete.

    The file (``.npy`` header and size) is created by ``np.lib.format.open_memmap`` under a temporary
    name; rows are then written with ``os.pwrite`` at their offsets (twice as fast as page-faulting
    through the memory map, and never more than one row in memory).
    """

    def __init__(self, path: str | Path, n: int, box: int, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npy")
        self.dtype = np.dtype(dtype)
        arr = np.lib.format.open_memmap(
            self.tmp, mode="w+", dtype=self.dtype, shape=(n, box, box, box)
        )
        self.offset = int(arr.offset)
        del arr
        self.row_bytes = box**3 * self.dtype.itemsize
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY)

    def __setitem__(self, i: int, sub: np.ndarray) -> None:
        data = np.ascontiguousarray(sub, dtype=self.dtype).tobytes()
        os.pwrite(self.fd, data, self.offset + int(i) * self.row_bytes)

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def commit(self) -> Path:
        # no fsync: the pages are in the page cache, visible to every reader once renamed
        self._close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)


class VolumeFileWriter:
    """Write many small MRC volumes fast: one prebuilt header, one ``write`` per file.

    Files go into a staging folder that :meth:`commit` renames onto the final folder in one step,
    so the per-particle files appear together or not at all (the atomic unit is the folder).
    """

    def __init__(
        self, final_dir: str | Path, box: int, angpix: float, dtype: np.dtype, threads: int = 4
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from .io.mrc import mrc_header

        self.pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        self.pending: list = []

        self.final = Path(final_dir)
        self.staging = self.final.with_name(f".{self.final.name}.{os.getpid()}.tmp")
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        self.dtype = np.dtype(dtype)
        self.header = mrc_header((box, box, box), float(angpix), self.dtype, (0.0, 0.0, 0.0, 1.0))
        self._made: set[Path] = set()

    def path(self, relative: str | Path) -> Path:
        """Where ``relative`` (a path below the final folder) is being written now."""
        return self.staging / relative

    def write(self, relative: str | Path, sub: np.ndarray, also=None) -> None:
        """Queue one volume for writing (its header carries its min, max, mean and rms).

        ``sub`` must not be modified afterwards (it is written later, by a worker thread).
        ``also(array)``, if given, runs in the same worker after the file is written (used to put
        the same volume into the fast store with ``os.pwrite``).
        """
        target = self.staging / relative
        if target.parent not in self._made:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(target.parent)
        arr = np.asarray(sub, dtype=self.dtype)
        if self.pool is None:
            self._write(target, arr, also)
            return
        self.pending.append(self.pool.submit(self._write, target, arr, also))
        if len(self.pending) > 512:  # bound the memory held by queued volumes
            for f in self.pending[:256]:
                f.result()
            del self.pending[:256]

    def flush(self) -> None:
        """Wait for every queued write (errors in workers are raised here)."""
        for f in self.pending:
            f.result()
        self.pending.clear()

    def _write(self, target: Path, arr: np.ndarray, also=None) -> None:
        h = self.header.copy()
        flat = arr.reshape(-1).astype(np.float32, copy=False)
        mean = float(flat.mean(dtype=np.float64))
        h["dmin"], h["dmax"] = float(flat.min()), float(flat.max())
        h["dmean"], h["rms"] = (
            mean,
            float(np.sqrt(max(np.dot(flat, flat) / flat.size - mean**2, 0))),
        )
        with open(target, "wb") as fh:
            fh.write(h.tobytes() + arr.tobytes())
        if also is not None:
            also(arr)

    def commit(self) -> Path:
        self.flush()
        if self.pool is not None:
            self.pool.shutdown()
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.{os.getpid()}.old")
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.staging, ignore_errors=True)


def read_store(directory: str | Path) -> tuple[np.ndarray, list[str]]:
    """Open an extraction folder's fast store (memory-mapped) and its row names."""
    found = open_store(directory)
    if found is None:
        raise UserError(f"{Path(directory) / STORE_FILE}: no fast store (or its names file) here")
    return found.volumes, found.names
