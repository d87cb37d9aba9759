"""STAR files: every flavour the ecosystem writes ⇄ one :class:`ParticleTable`.

Low level: :func:`read_star_blocks` / :func:`write_star_blocks` (starfile, names kept as strings,
never ``<NA>``, atomic). High level: :func:`read_particles` detects the flavour and returns a
ParticleTable; :func:`write_relion31` and :func:`write_relion5` write what RELION reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..runtime.errors import UserError, file_error
from ..runtime.outputs import atomic_path
from .particles import COORDS, OPTICS_GROUP, STRING_COLUMNS, TOMO_FILE, TOMO_NAME, ParticleTable


def read_star_blocks(path: str | Path) -> dict[str, pd.DataFrame | dict]:
    """Read every data block of a STAR file (names such as ``01`` kept as strings)."""
    p = Path(path)
    if not p.exists():
        raise file_error(p, "file not found")
    if p.is_dir():
        raise file_error(p, "is a directory, expected a STAR file")
    try:
        blocks = starfile.read(p, always_dict=True, parse_as_string=list(STRING_COLUMNS))
    except Exception as exc:  # starfile raises many types on malformed input
        raise file_error(p, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    if not blocks:
        raise file_error(p, "no data blocks found (not a STAR file?)")
    return blocks


def _clean_for_write(df: pd.DataFrame, where: str) -> pd.DataFrame:
    out = df.copy()
    for col in out.columns:
        if not str(col).startswith("rln"):
            raise UserError(f"{where}: column {col!r} is not a RELION label (must start with 'rln')")
        s = out[col]
        if s.dtype == object or pd.api.types.is_string_dtype(s):
            if s.isna().any():
                raise UserError(f"{where}: column {col} has missing values; RELION cannot read <NA>")
            out[col] = s.astype(str)
        elif s.isna().any():
            raise UserError(f"{where}: column {col} has missing values; RELION cannot read <NA>")
    return out


def write_star_blocks(path: str | Path, blocks: dict[str, pd.DataFrame | dict], overwrite: bool = False) -> Path:
    """Write STAR data blocks atomically, refusing NaN/<NA> and (unless asked) existing files."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise file_error(p, "output already exists; pass --overwrite to replace it")
    clean: dict[str, pd.DataFrame | dict] = {}
    for name, block in blocks.items():
        clean[name] = _clean_for_write(block, f"{p} (data_{name})") if isinstance(block, pd.DataFrame) else block
    with atomic_path(p) as tmp:
        starfile.write(clean, tmp, overwrite=True, float_format="%.6f")
    return p


# ----------------------------------------------------------------------------- reading


def _tomo_name_from_path(path: str) -> str:
    name = Path(str(path)).name
    for suffix in (".mrc", ".rec", ".st", ".map", ".tomostar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_particles(path: str | Path, angpix: float | None = None, tomograms: str | Path | None = None) -> ParticleTable:
    """Read any supported particle/coordinate STAR file into a :class:`ParticleTable`.

    ``angpix`` states the voxel size of the coordinates where the file does not; ``tomograms`` names a
    RELION 5 tomograms.star for particle files that need one.
    """
    p = Path(path)
    blocks = read_star_blocks(p)
    particles = blocks.get("particles")
    optics = blocks.get("optics")
    if particles is None:
        loops = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
        if len(loops) != 1:
            raise file_error(p, "no data_particles block and not a single-table STAR file")
        particles = loops[0]
    if not isinstance(particles, pd.DataFrame) or not all(c in particles.columns for c in COORDS):
        raise file_error(p, "no particle coordinates (rlnCoordinateX/Y/Z) in the particle table")
    df = particles.copy()
    flavour = "relion31" if optics is not None else "relion30"
    coord_angpix = angpix
    if flavour == "relion30" and {"rlnMagnification", "rlnDetectorPixelSize"} <= set(df.columns) and coord_angpix is None:
        coord_angpix = float(1e4 * df["rlnDetectorPixelSize"].iloc[0] / df["rlnMagnification"].iloc[0])
    if TOMO_NAME not in df.columns:
        if TOMO_FILE not in df.columns:
            raise file_error(p, "no tomogram name column (rlnTomoName or rlnMicrographName)")
        df[TOMO_NAME] = [_tomo_name_from_path(v) for v in df[TOMO_FILE]]
    for c in COORDS:
        df[c] = df[c].astype(np.float64)
    return ParticleTable(df.reset_index(drop=True), coord_angpix, optics, None, flavour, p, {})


# ----------------------------------------------------------------------------- writing


def default_optics(
    image_angpix: float,
    box: int,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    name: str = "opticsGroup1",
) -> pd.DataFrame:
    """A one-group RELION 3.1 optics table for 3D subtomograms."""
    return pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": [name],
            "rlnVoltage": [float(voltage_kv)],
            "rlnSphericalAberration": [float(cs_mm)],
            "rlnAmplitudeContrast": [float(amplitude_contrast)],
            "rlnImagePixelSize": [float(image_angpix)],
            "rlnImageSize": [int(box)],
            "rlnImageDimensionality": [3],
        }
    )


def write_relion31(path: str | Path, table: ParticleTable, overwrite: bool = False) -> Path:
    """Write RELION 3.1 legacy subtomogram STAR: ``data_optics`` + ``data_particles``.

    Coordinates are written in pixels of ``table.coord_angpix``. Columns other than RELION labels
    are dropped; a missing optics table is an error (subtomogram averaging needs it).
    """
    if table.optics is None:
        raise UserError(f"{path}: cannot write RELION 3.1 STAR without optics (pixel size, box)")
    df = table.particles.copy()
    if OPTICS_GROUP not in df.columns:
        df[OPTICS_GROUP] = 1
    drop = [c for c in df.columns if c.startswith("rlnCenteredCoordinate")]
    df = df.drop(columns=drop)
    return write_star_blocks(path, {"optics": table.optics, "particles": df}, overwrite=overwrite)
