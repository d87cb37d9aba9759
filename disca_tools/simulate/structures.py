"""Shipped density maps of real macromolecules (see ``structures/NOTICE.md``) and loading them.

Maps are ``[z, y, x]`` float32, protein positive, background 0, resampled to the requested voxel size
with :func:`disca_tools.geometry.resample_volume` (Fourier crop/pad, box centre kept at ``N // 2``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..geometry import box_center, resample_volume
from ..io.mrc import read_volume
from ..runtime.errors import UserError, file_error
from ..runtime.log import logger

STRUCTURES_DIR = Path(__file__).resolve().parent / "structures"


def list_structures() -> list[str]:
    """Names of the shipped structures (PDB ids such as ``"4v4r"``), sorted."""
    return sorted(p.stem.lower() for p in STRUCTURES_DIR.glob("*.mrc"))


def structure_path(name_or_path: str | Path) -> Path:
    """The MRC file behind a shipped name (case-insensitive) or a path; UserError if neither."""
    text = str(name_or_path)
    shipped = STRUCTURES_DIR / f"{text.lower()}.mrc"
    if shipped.is_file():
        return shipped
    p = Path(text)
    if p.is_file():
        return p
    raise file_error(
        text,
        f"not a shipped structure ({', '.join(list_structures())}) nor an existing MRC file",
    )


def structure_label(name_or_path: str | Path) -> str:
    """A short class name: the shipped name, or the file stem of a user map."""
    text = str(name_or_path)
    if (STRUCTURES_DIR / f"{text.lower()}.mrc").is_file():
        return text.lower()
    return Path(text).stem


@functools.lru_cache(maxsize=64)
def _load_cached(path: str, angpix: float, box: int | None) -> np.ndarray:
    vol, src_angpix = read_volume(path)
    if src_angpix <= 0:
        raise file_error(path, "header has no voxel size; cannot resample the structure")
    if min(vol.shape) < 2:
        raise file_error(path, f"expected a 3D density map, got shape {vol.shape}")
    # Background to 0: subtract the median of the outer shell (a no-op for the shipped maps).
    shell = np.concatenate(
        [vol[0].ravel(), vol[-1].ravel(), vol[:, 0].ravel(), vol[:, -1].ravel()]
        + [vol[:, :, 0].ravel(), vol[:, :, -1].ravel()]
    )
    vol = vol - np.float32(np.median(shell))
    # Protein positive: if the map is mostly negative (protein-dark maps), flip it.
    if abs(float(vol.min())) > abs(float(vol.max())):
        logger.info(
            "%s: density looks protein-dark (|min| > max); inverted to protein positive", path
        )
        vol = -vol
    out = resample_volume(vol, src_angpix, float(angpix), box=box)
    out.setflags(write=False)
    return out


def load_structure(name_or_path: str | Path, angpix: float, box: int | None = None) -> np.ndarray:
    """Load a structure (shipped name or MRC path) at ``angpix`` Å/voxel, optionally boxed to ``box``.

    Returns a new float32 ``[z, y, x]`` array, protein positive, background 0. The map's own box is
    scaled with the voxel size; ``box`` then centre-pads or centre-crops it.
    """
    if not angpix or angpix <= 0:
        raise UserError(f"angpix must be positive, got {angpix}")
    path = structure_path(name_or_path)
    return np.array(_load_cached(str(path), float(angpix), None if box is None else int(box)))


def structure_radius_px(volume_zyx: np.ndarray, threshold: float = 0.1) -> float:
    """Extent radius (voxels) about the box centre: farthest voxel above ``threshold``·max, plus 0.5."""
    vol = np.asarray(volume_zyx)
    mask = vol > threshold * float(vol.max())
    if not mask.any():
        return 0.0
    z, y, x = np.nonzero(mask)
    c = box_center(vol.shape)
    r = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    return float(r.max()) + 0.5
