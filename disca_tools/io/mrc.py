"""MRC volumes: permissive reading, memory mapping, fast atomic writing.

Arrays are indexed ``[z, y, x]`` as mrcfile does. The voxel size comes from the header
(``cella / mx``) unless the caller overrides it. Maps written by RELION fail ``mrcfile.validate``;
we never refuse a file for that, only for problems that make the data unusable (not MRC, truncated).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from ..runtime.errors import UserError, file_error
from ..runtime.outputs import atomic_path

_MODE_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}


@dataclass(frozen=True)
class VolumeInfo:
    """Header facts of a volume: shape ``(nx, ny, nz)`` and voxel size in Å."""

    path: Path
    shape_xyz: tuple[int, int, int]
    angpix: float
    dtype: np.dtype

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (self.shape_xyz[2], self.shape_xyz[1], self.shape_xyz[0])


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise file_error(path, "file not found")
    if path.is_dir():
        raise file_error(path, "is a directory, expected an MRC file")


def _angpix_from(mrc: mrcfile.mrcfile.MrcFile) -> float:
    h = mrc.header
    mx = float(h.mx) if h.mx else float(h.nx)
    return float(h.cella.x) / mx if mx > 0 and float(h.cella.x) > 0 else 0.0


def _precheck(path: Path) -> None:
    """Cheap header sanity check before mrcfile: not MRC at all, or truncated, fails fast here.

    (mrcfile on a text file can try to read gigabytes of 'extended header' and reports it as
    truncation; this names the real problem in milliseconds.)
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(1024)
    if len(raw) < 1024:
        raise file_error(
            path, f"not an MRC file (only {size} bytes, shorter than the 1024-byte header)"
        )
    for dt in (HEADER_DTYPE, HEADER_DTYPE.newbyteorder()):
        h = np.frombuffer(raw, dtype=dt, count=1)[0]
        mode, dims, ext = (
            int(h["mode"]),
            (int(h["nx"]), int(h["ny"]), int(h["nz"])),
            int(h["nsymbt"]),
        )
        if mode in _MODE_DTYPES and min(dims) > 0 and max(dims) < 2**24 and 0 <= ext < 2**31:
            break
    else:
        raise file_error(path, "not an MRC file (no valid mode and dimensions in the header)")
    expected = 1024 + ext + dims[0] * dims[1] * dims[2] * np.dtype(_MODE_DTYPES[mode]).itemsize
    if size < expected:
        raise file_error(
            path, f"truncated MRC file (header promises {expected} bytes, file has {size})"
        )


def _open(path: Path, mmap: bool) -> mrcfile.mrcfile.MrcFile:
    _check_exists(path)
    _precheck(path)
    opener = mrcfile.mmap if mmap else mrcfile.open
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = opener(str(path), mode="r", permissive=True)
        except (ValueError, OSError, EOFError) as exc:
            raise file_error(path, f"not a readable MRC file ({exc})") from None
    if mrc.data is None:
        reason = "; ".join(str(w.message) for w in caught) or "no data block"
        mrc.close()
        if "byte" in reason.lower() or "data" in reason.lower():
            raise file_error(path, f"truncated MRC file ({reason})")
        raise file_error(path, f"not a readable MRC file ({reason})")
    if mrc.header.map != mrcfile.constants.MAP_ID and int(mrc.header.mode) not in _MODE_DTYPES:
        mrc.close()
        raise file_error(path, "not an MRC file (no MAP identifier and unknown mode)")
    return mrc


def read_info(path: str | Path) -> VolumeInfo:
    """Read only the header: shape and voxel size."""
    p = Path(path)
    mrc = _open(p, mmap=True)
    try:
        d = mrc.data
        shape = d.shape if d.ndim == 3 else (1, *d.shape)
        return VolumeInfo(
            p, (int(shape[2]), int(shape[1]), int(shape[0])), _angpix_from(mrc), d.dtype
        )
    finally:
        mrc.close()


def open_volume(path: str | Path) -> tuple[np.ndarray, float]:
    """Memory-map a volume without loading it; returns ``(data_zyx, angpix)``.

    The array is a read-only numpy memmap (any dtype); slice it to read only what is needed.
    The file stays open as long as the array is referenced.
    """
    p = Path(path)
    mrc = _open(p, mmap=True)
    data = mrc.data
    if data.ndim == 2:
        data = data[np.newaxis]
    return data, _angpix_from(mrc)


def read_volume(
    path: str | Path, angpix: float | None = None, mmap: bool = False
) -> tuple[np.ndarray, float]:
    """Read a whole volume as float32 ``[z, y, x]``; ``angpix`` overrides the header's voxel size."""
    p = Path(path)
    mrc = _open(p, mmap=mmap)
    try:
        data = np.asarray(mrc.data, dtype=np.float32)
        if data.ndim == 2:
            data = data[np.newaxis]
        size = angpix if angpix else _angpix_from(mrc)
        if not mmap:
            data = data.copy()
        return data, float(size)
    finally:
        if not mmap:
            mrc.close()


def check_angpix(
    path: str | Path, header_angpix: float, expected: float | None, tol: float = 0.01
) -> float:
    """Reconcile a header voxel size with one stated elsewhere; a mismatch over ``tol`` is an error."""
    if expected is None or expected <= 0:
        if header_angpix <= 0:
            raise file_error(path, "header has no voxel size; pass --angpix")
        return header_angpix
    if header_angpix > 0 and abs(header_angpix - expected) > tol * expected:
        raise file_error(
            path,
            f"voxel size {header_angpix:.4g} Å in the header disagrees with {expected:.4g} Å stated elsewhere",
        )
    return float(expected)


def mrc_header(
    shape_zyx: tuple[int, int, int],
    angpix: float,
    dtype: np.dtype,
    stats: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Build an MRC2014 header for a volume (ispg 1, mode from dtype)."""
    nz, ny, nx = shape_zyx
    h = np.zeros((), dtype=HEADER_DTYPE)
    h["nx"], h["ny"], h["nz"] = nx, ny, nz
    h["mode"] = {
        np.dtype(np.float32): 2,
        np.dtype(np.float16): 12,
        np.dtype(np.int8): 0,
        np.dtype(np.int16): 1,
    }[np.dtype(dtype)]
    h["mx"], h["my"], h["mz"] = nx, ny, nz
    h["cella"] = (nx * angpix, ny * angpix, nz * angpix)
    h["cellb"] = (90.0, 90.0, 90.0)
    h["mapc"], h["mapr"], h["maps"] = 1, 2, 3
    h["ispg"] = 1
    h["map"] = mrcfile.constants.MAP_ID
    h["machst"] = (0x44, 0x44, 0x00, 0x00)
    h["nversion"] = 20141
    if stats is not None:
        h["dmin"], h["dmax"], h["dmean"], h["rms"] = stats
    else:
        h["dmin"], h["dmax"], h["dmean"], h["rms"] = 0.0, -1.0, -2.0, -1.0
    return h


def write_volume(
    path: str | Path,
    data_zyx: np.ndarray,
    angpix: float,
    float16: bool = False,
    overwrite: bool = False,
    stats: bool = True,
) -> Path:
    """Write a 3D volume as MRC (float32, or float16 on request) atomically.

    Uses a pre-built header and a single write, fast enough for thousands of subtomograms a second.
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise file_error(p, "output already exists; pass --overwrite to replace it")
    arr = np.asarray(data_zyx)
    if arr.ndim != 3:
        raise UserError(f"{p}: expected a 3D volume, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float16 if float16 else np.float32)
    st = None
    if stats:
        a32 = arr.astype(np.float32, copy=False)
        st = (float(a32.min()), float(a32.max()), float(a32.mean()), float(a32.std()))
    header = mrc_header(arr.shape, float(angpix), arr.dtype, st)
    with atomic_path(p) as tmp, open(tmp, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(arr.tobytes())
    return p


def create_volume_memmap(
    path: str | Path, shape_zyx: tuple[int, int, int], angpix: float, float16: bool = False
) -> np.memmap:
    """Create an MRC file on disk and return a writable memmap of its data (for volumes too big for RAM).

    The caller fills the array, flushes it, and is responsible for renaming if atomicity is needed.
    """
    p = Path(path)
    dtype = np.dtype(np.float16 if float16 else np.float32)
    header = mrc_header(tuple(int(s) for s in shape_zyx), float(angpix), dtype)
    with open(p, "wb") as fh:
        fh.write(header.tobytes())
        fh.truncate(1024 + int(np.prod(shape_zyx)) * dtype.itemsize)
    return np.memmap(p, dtype=dtype, mode="r+", offset=1024, shape=tuple(int(s) for s in shape_zyx))


def release_pages(data: np.ndarray) -> None:
    """Drop a memory-mapped volume's pages from this process's resident memory (Linux).

    Pages read through a file mapping count as resident until unmapped; long passes over a huge
    tomogram call this now and then so memory stays bounded. A no-op for ordinary arrays.
    """
    import mmap

    obj = data
    while obj is not None:
        mm = getattr(obj, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass
            return
        obj = getattr(obj, "base", None)
