"""STAR files: every flavour the ecosystem writes ⇄ one :class:`ParticleTable`.

Low level: :func:`read_star_blocks` / :func:`write_star_blocks` (starfile, names kept as strings,
never ``<NA>``/NaN, atomic, no silent overwrite). High level: :func:`read_particles` detects the
flavour and returns a ParticleTable whose ``rlnCoordinateX/Y/Z`` are pixels of
``table.coord_angpix``; :func:`write_relion31`, :func:`write_relion5` and :func:`write_particles`
write what RELION reads. :func:`read_tomograms` reads a RELION 5 tomograms.star and
:func:`make_tomograms_table` builds one for tools that start from MRC tomograms.

Flavours and where the coordinate voxel size comes from
    ``relion30``  one ``data_`` block (Warp export). Å/px = 1e4 · rlnDetectorPixelSize /
                  rlnMagnification, per row. Warp writes coordinates in pixels of the exported
                  subtomograms and sets Mag 10000, DPS = that pixel size (WarpTools
                  ``ts_export_particles --3d``: ``X = x_Å / output_angpix``); the ``_10.73Apx`` in
                  the tomogram name is the reconstruction's voxel size, not the coordinates'.
    ``relion31``  ``data_optics`` + ``data_particles``. Coordinates are in pixels of the optics
                  group's ``rlnMicrographPixelSize`` when the group has one (RELION 3.1's meaning,
                  and what :func:`write_relion31` writes); otherwise, as in Warp's RELION 3.1
                  exports, of the group's ``rlnImagePixelSize``. For the fixture (tomogram named
                  ``_12.23Apx``, 2.446 Å subtomograms) X reaches 1999 px: 0.49 µm at 2.446 Å, about
                  one 4k-pixel field of view at the 1.223 Å that 2.446 and 12.23 are bins 2 and 10
                  of, but 2.4 µm (five fields of view) at 12.23 Å. The rule is an inference,
                  so ``angpix`` overrides it (with a warning when they differ); a stated
                  ``rlnMicrographPixelSize`` that disagrees with ``angpix`` is an error.
    ``relion4``   pseudo-subtomograms (``rlnTomoName``, optics with rlnTomoTiltSeriesPixelSize):
                  coordinates in unbinned tilt-series pixels, coord_angpix = that pixel size.
    (any flavour with optics) an optics ``rlnMicrographPixelSize`` states the coordinates' voxel
                  size and takes precedence over the rules above and below.
    ``relion5``   ``rlnCenteredCoordinateX/Y/ZAngst`` + a tomograms.star. Converted to pixels of
                  the reconstructed tomogram: voxel = rlnTomoTiltSeriesPixelSize ·
                  rlnTomoTomogramBinning (bin 1 when the column is absent, or ``angpix`` when given
                  and the file states no binning), via :func:`disca_tools.geometry.centered_angst_to_pixels`.
                  The centred columns are dropped on reading and recomputed on writing.
    ``pytom``     pytom-match-pick: one ``data_`` block with rlnLCCmax and rlnDetectorPixelSize
                  (the tomogram's voxel size, no rlnMagnification) and either rlnCoordinateX/Y/Z
                  in those voxels + rlnMicrographName, or (RELION 5 mode) centred Å +
                  rlnTomoName, read like ``relion5`` with a tomograms.star.
    ``warp``      WarpTools 2 exports (``data_general`` + optics with rlnTomoSubtomogramBinning,
                  ``rlnTomoName`` ending in ``.tomostar``) carry ``rlnCoordinateX/Y/Z`` in pixels of
                  the export pixel size ``rlnImagePixelSize`` (= tilt-series pixel ·
                  rlnTomoSubtomogramBinning): in both fixtures the largest coordinates reach 87-95 %
                  of the tomogram (rlnTomoSize · tilt-series pixel / export pixel) at that size.
                  A tomograms.star found beside them is attached (and written back) when it lists
                  their tomograms.

Writers
    :func:`write_relion31` states the coordinates' voxel size as rlnMicrographPixelSize in
    every optics group (RELION 3.1.3's relion_reconstruct and relion_star_handler accept and keep
    it). :func:`write_relion5` writes ``data_general`` (rlnTomoSubTomosAre2DStacks 0 for our 3D
    subtomograms, as RELION assumes when the block is absent), ``data_optics`` with the
    rlnTomoTiltSeriesPixelSize RELION requires, ``data_particles`` with centred Å and no pixel
    coordinates (RELION 5 drops those itself), and adds rlnTomoTomogramBinning = coord_angpix /
    tilt-series pixel to a tomograms table that lacks it so the pixels read back the same.

When optics groups (or tomograms) have different voxel sizes, every row is rescaled to the first
one's, which becomes ``coord_angpix`` (a warning says so); writers state it back explicitly.

Centred coordinates (RELION 5)
    We write ``centred_Å = (px · voxel/tilt_px − rlnTomoSize/2) · tilt_px``, i.e. the centre is
    ``size/2`` in bin-1 tilt-series pixels, as RELION's C++ does (``particle_set.cpp``, centre from
    ``tomogram_set.cpp``). Other tools use other centres (RELION's Python ``get_particle_poses``:
    ``size/2 − 1``, relion issue #1137; pytom-match-pick versions: ``size/2`` or ``(size − 1)/2`` of
    the binned tomogram they matched): their files may be off by about one pixel. That ambiguity
    cannot be resolved from the file; we read every centred file with RELION's ``size/2``.

Paths inside STAR files
    RELION resolves relative paths (rlnImageName, rlnMicrographName, ...) against the project
    directory (the working directory), never the STAR file's folder; they are passed through
    untouched. For the files an optimisation_set.star names, and the tomograms.star a particles
    file needs, reading is lenient: the working directory first, then relative to the referring
    STAR's folder, then the bare file name in that folder. Without an explicit ``tomograms``,
    ``optimisation_set.star``/``<stem>_optimisation_set.star``, ``tomograms.star`` and
    ``<stem>_tomograms.star`` beside the particles file are tried. Writers put the paths given
    to them in optimisation_set.star unchanged (so pass project-relative paths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..geometry import centered_angst_to_pixels, pixels_to_centered_angst
from ..runtime.errors import UserError, file_error
from ..runtime.log import logger
from ..runtime.outputs import atomic_path, check_not_input
from .particles import (
    CENTERED_ANGST,
    COORDS,
    OPTICS_GROUP,
    STRING_COLUMNS,
    TILT_SERIES_ANGPIX,
    TOMO_BINNING,
    TOMO_FILE,
    TOMO_NAME,
    TOMO_RECONSTRUCTION,
    TOMO_SIZES,
    ParticleTable,
)

IMAGE_ANGPIX = "rlnImagePixelSize"
MICROGRAPH_ANGPIX = "rlnMicrographPixelSize"
SUBTOMO_BINNING = "rlnTomoSubtomogramBinning"
STACKS_2D = "rlnTomoSubTomosAre2DStacks"
PARTICLES_FILE = "rlnTomoParticlesFile"
TOMOGRAMS_FILE = "rlnTomoTomogramsFile"
#: relative tolerance when comparing two pixel sizes that should agree
ANGPIX_RTOL = 5e-3

# ----------------------------------------------------------------------------- low level


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
            raise UserError(
                f"{where}: column {col!r} is not a RELION label (must start with 'rln')"
            )
        s = out[col]
        if s.isna().any():
            raise UserError(f"{where}: column {col} has missing values; RELION cannot read <NA>")
        if s.dtype == object or pd.api.types.is_string_dtype(s):
            s = s.astype(str)
            bad = s[(s == "") | s.str.contains(r"\s", regex=True)]
            if len(bad):
                raise UserError(
                    f"{where}: column {col} has a value that is empty or contains whitespace "
                    f"({bad.iloc[0]!r}); STAR cannot store it"
                )
            out[col] = s
        elif pd.api.types.is_float_dtype(s) and not np.isfinite(s.to_numpy(dtype=np.float64)).all():
            raise UserError(f"{where}: column {col} has infinite values")
    return out


def _clean_pairs(block: dict, where: str) -> dict:
    out = {}
    for key, value in block.items():
        if not str(key).startswith("rln"):
            raise UserError(f"{where}: label {key!r} is not a RELION label (must start with 'rln')")
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            raise UserError(f"{where}: {key} has no value; RELION cannot read <NA>")
        out[key] = value
    return out


def _format_float(value: float) -> str:
    """RELION-like: fixed 6 decimals, but small values in exponent form so they keep 7 digits."""
    if value != 0.0 and abs(value) < 0.01:
        return f"{value:.6e}"
    return f"{value:.6f}"


def _clean_blocks(
    p: Path, blocks: dict[str, pd.DataFrame | dict]
) -> dict[str, pd.DataFrame | dict]:
    if p.is_dir():
        raise file_error(p, "is a directory, expected a STAR file name")
    clean: dict[str, pd.DataFrame | dict] = {}
    for name, block in blocks.items():
        where = f"{p} (data_{name})"
        clean[name] = (
            _clean_for_write(block, where)
            if isinstance(block, pd.DataFrame)
            else _clean_pairs(block, where)
        )
    return clean


def _write_clean(p: Path, clean: dict[str, pd.DataFrame | dict]) -> Path:
    with atomic_path(p) as tmp:
        starfile.write(clean, tmp, overwrite=True, float_format=_format_float)
    return p


def write_star_blocks(
    path: str | Path, blocks: dict[str, pd.DataFrame | dict], overwrite: bool = False
) -> Path:
    """Write STAR data blocks atomically, refusing NaN/<NA> and (unless asked) existing files."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise file_error(p, "output already exists; pass --overwrite to replace it")
    return _write_clean(p, _clean_blocks(p, blocks))


# ----------------------------------------------------------------------------- helpers


def _tomo_name_from_path(path: str) -> str:
    name = Path(str(path)).name
    for suffix in (".mrc", ".rec", ".st", ".map", ".tomostar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def reference_bases(star_path: str | Path) -> tuple[Path, Path]:
    """Where RELION resolves a relative path named in a STAR file (``rlnImageName``,
    ``rlnMicrographName``, …): the working directory (the project), then the STAR's folder."""
    return Path("."), Path(star_path).parent


def _resolve_reference(ref: str | Path, referring: Path) -> Path | None:
    """A file named inside ``referring``: where :func:`reference_bases` say, then the bare name in
    ``referring``'s folder."""
    ref = Path(str(ref))
    candidates = [ref] if ref.is_absolute() else [base / ref for base in reference_bases(referring)]
    candidates.append(referring.parent / ref.name)
    for c in candidates:
        if c.is_file():
            return c
    return None


def _angpix_from_tomogram_headers(df: pd.DataFrame, star: Path) -> float | None:
    """Coordinate voxel size from the MRC headers of the tomograms a coordinate file names.

    A plain RELION 3.1 coordinate file (rlnMicrographName + rlnCoordinateX/Y/Z, no optics) states no
    pixel size: its coordinates are in pixels of the tomogram it names, so that tomogram's header
    tells. Returns None when a tomogram cannot be found or the headers disagree.
    """
    if TOMO_FILE not in df.columns or not len(df):
        return None
    from .mrc import read_info  # local: star.py must not need mrcfile for plain STAR work

    sizes = set()
    for name in pd.unique(df[TOMO_FILE].astype(str)):
        found = _resolve_reference(name, star)
        if found is None:
            return None
        try:
            size = read_info(found).angpix
        except UserError:
            return None
        if size <= 0:
            return None
        sizes.add(round(size, 4))
    if len(sizes) != 1:
        return None
    value = sizes.pop()
    logger.info("%s: coordinates taken to be in pixels of the tomograms (%.4g Å)", star, value)
    return float(value)


def _close(a, b) -> np.ndarray:
    """Element-wise: do pixel sizes ``a`` and ``b`` agree within :data:`ANGPIX_RTOL`?"""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) <= ANGPIX_RTOL * np.maximum(np.abs(a), np.abs(b))


def _loop_blocks(blocks: dict) -> list[pd.DataFrame]:
    return [b for b in blocks.values() if isinstance(b, pd.DataFrame)]


def _as_names(values) -> list[str]:
    return pd.Series(values, dtype=object).astype(str).tolist()


def _per_row(
    df: pd.DataFrame, optics: pd.DataFrame | None, column: str, where: Path
) -> np.ndarray | None:
    """The optics-group value of ``column`` for every particle row (None if not stated)."""
    if optics is None or column not in optics.columns or not len(optics):
        return None
    values = optics[column].to_numpy(dtype=np.float64)
    if OPTICS_GROUP not in df.columns or OPTICS_GROUP not in optics.columns:
        if len(optics) > 1 and not np.allclose(values, values[0]):
            raise file_error(where, f"several optics groups but particles have no {OPTICS_GROUP}")
        return np.full(len(df), values[0])
    lookup = dict(zip(optics[OPTICS_GROUP].astype(int), values, strict=True))
    groups = df[OPTICS_GROUP].astype(int)
    missing = sorted(set(groups) - set(lookup))
    if missing:
        raise file_error(where, f"particles refer to optics group(s) {missing} not in data_optics")
    return groups.map(lookup).to_numpy(dtype=np.float64)


def _common_angpix(
    per_row: np.ndarray | None,
    angpix: float | None,
    stated: bool,
    what: str,
    where: Path,
) -> tuple[float | None, np.ndarray | None]:
    """Choose ``coord_angpix`` and the per-row factor that brings coordinates to it.

    ``stated``: the file says the voxel size (disagreeing ``angpix`` is an error); otherwise the
    per-row values are an inference that ``angpix`` overrides.
    """
    if per_row is None or not len(per_row):
        return (float(angpix) if angpix else None), None
    if not np.all(np.isfinite(per_row)) or np.any(per_row <= 0):
        raise file_error(where, f"{what} is missing, zero or negative for some particles")
    if angpix:
        if stated:
            bad = per_row[~_close(per_row, angpix)]
            if len(bad):
                raise file_error(
                    where,
                    f"--angpix {angpix:g} disagrees with the file's {what} ({bad[0]:g} Å); "
                    "leave --angpix out or fix the file",
                )
            return float(angpix), None
        if not _close(per_row, angpix).all():
            logger.warning(
                "%s: using --angpix %g for the coordinates instead of %s (%g Å)",
                where, angpix, what, per_row[0],
            )  # fmt: skip
        return float(angpix), None
    ref = float(per_row[0])
    if not np.allclose(per_row, ref, rtol=1e-6):
        logger.warning(
            "%s: %s differs between particles (%s Å); coordinates rescaled to %g Å",
            where, what, ", ".join(f"{v:g}" for v in np.unique(per_row)), ref,
        )  # fmt: skip
        return ref, per_row / ref
    return ref, None


def _rescale(df: pd.DataFrame, factor: np.ndarray | None) -> None:
    if factor is not None:
        for c in COORDS:
            df[c] = df[c].to_numpy(dtype=np.float64) * factor


# ----------------------------------------------------------------------------- tomograms


def _tomogram_set(path: Path) -> tuple[pd.DataFrame, dict]:
    blocks = read_star_blocks(path)
    table = blocks.get("global")
    if not isinstance(table, pd.DataFrame):
        loops = [b for b in _loop_blocks(blocks) if TOMO_NAME in b.columns]
        table = loops[0] if len(loops) == 1 else None
    need = (TOMO_NAME, *TOMO_SIZES, TILT_SERIES_ANGPIX)
    if table is None or not all(c in table.columns for c in need):
        missing = [] if table is None else [c for c in need if c not in table.columns]
        detail = f"missing {', '.join(missing)}" if missing else "no data_global table"
        raise file_error(path, f"not a RELION 5 tomograms table ({detail})")
    table = table.reset_index(drop=True).copy()
    table[TOMO_NAME] = _as_names(table[TOMO_NAME])
    dup = table[TOMO_NAME][table[TOMO_NAME].duplicated()]
    if len(dup):
        raise file_error(path, f"tomogram {dup.iloc[0]!r} is listed twice")
    for c in (*TOMO_SIZES, TILT_SERIES_ANGPIX) + ((TOMO_BINNING,) if TOMO_BINNING in table else ()):
        v = pd.to_numeric(table[c], errors="coerce")
        if v.isna().any() or (v <= 0).any():
            raise file_error(path, f"{c} must be a positive number for every tomogram")
    extra = {k: v for k, v in blocks.items() if k != "global"}
    return table, extra


def read_tomograms(path: str | Path) -> pd.DataFrame:
    """Read a RELION 5 tomograms.star (``data_global``) with names kept as strings.

    Requires rlnTomoName, rlnTomoSizeX/Y/Z (bin-1 tilt-series pixels) and
    rlnTomoTiltSeriesPixelSize; everything else passes through.
    """
    return _tomogram_set(Path(path))[0]


def make_tomograms_table(
    names: list[str],
    sizes_xyz_px: list | np.ndarray,
    angpix: float | list[float],
    files: list[str] | None = None,
    binning: float | list[float] = 1.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    hand: float = -1.0,
) -> pd.DataFrame:
    """A RELION 5 tomograms table for tomograms known only as MRC files.

    ``sizes_xyz_px`` are the tomograms' sizes (x, y, z) in their own voxels of ``angpix`` Å, which
    were reconstructed at ``binning``: the tilt-series pixel is ``angpix / binning`` and
    rlnTomoSizeX/Y/Z (bin-1 tilt-series pixels) is ``round(size · binning)``.
    """
    n = len(names)
    sizes = np.asarray(sizes_xyz_px, dtype=np.float64).reshape(n, 3)
    vox = np.broadcast_to(np.asarray(angpix, dtype=np.float64), (n,))
    b = np.broadcast_to(np.asarray(binning, dtype=np.float64), (n,))
    if np.any(vox <= 0) or np.any(b <= 0) or np.any(sizes <= 0):
        raise ValueError("tomogram sizes, voxel sizes and binning must be positive")
    sizes_bin1 = np.rint(sizes * b[:, None]).astype(np.int64)
    table = pd.DataFrame(
        {
            TOMO_NAME: _as_names(names),
            "rlnVoltage": float(voltage_kv),
            "rlnSphericalAberration": float(cs_mm),
            "rlnAmplitudeContrast": float(amplitude_contrast),
            "rlnTomoHand": float(hand),
            TILT_SERIES_ANGPIX: vox / b,
            TOMO_BINNING: b.astype(np.float64),
            TOMO_SIZES[0]: sizes_bin1[:, 0],
            TOMO_SIZES[1]: sizes_bin1[:, 1],
            TOMO_SIZES[2]: sizes_bin1[:, 2],
        }
    )
    if files is not None:
        table[TOMO_RECONSTRUCTION] = _as_names(files)
    return table


def _find_optimisation_set_tomograms(p: Path) -> Path | None:
    for cand in (p.parent / "optimisation_set.star", p.parent / f"{p.stem}_optimisation_set.star"):
        if not cand.is_file():
            continue
        try:
            refs = _optimisation_refs(cand)
        except UserError:
            continue
        part = refs.get(PARTICLES_FILE)
        tomo = refs.get(TOMOGRAMS_FILE)
        if part is not None and tomo is not None and part.resolve() == p.resolve():
            return tomo
    return None


def _find_tomograms(p: Path) -> Path | None:
    """A tomograms.star that belongs with particles file ``p`` (see the module docstring)."""
    found = _find_optimisation_set_tomograms(p)
    if found is not None:
        return found
    for cand in (p.parent / "tomograms.star", p.parent / f"{p.stem}_tomograms.star"):
        if cand.is_file() and cand.resolve() != p.resolve():
            return cand
    return None


def _optimisation_refs(path: Path) -> dict[str, Path | None]:
    blocks = read_star_blocks(path)
    refs: dict[str, Path | None] = {}
    for block in blocks.values():
        if isinstance(block, dict):
            for key in (PARTICLES_FILE, TOMOGRAMS_FILE):
                if key in block:
                    refs[key] = _resolve_reference(block[key], path)
                    if refs[key] is None:
                        logger.debug("%s: %s %s not found", path, key, block[key])
    return refs


# ----------------------------------------------------------------------------- reading


def detect_flavour(blocks: dict[str, pd.DataFrame | dict]) -> str:
    """The flavour of a particle STAR file's blocks (one of :data:`particles.FLAVOURS`)."""
    particles = blocks.get("particles")
    if not isinstance(particles, pd.DataFrame):
        loops = _loop_blocks(blocks)
        particles = loops[0] if len(loops) == 1 else pd.DataFrame()
    optics = blocks.get("optics")
    optics = optics if isinstance(optics, pd.DataFrame) else None
    cols = set(particles.columns)
    pytom = optics is None and (
        "rlnLCCmax" in cols or ("rlnDetectorPixelSize" in cols and "rlnMagnification" not in cols)
    )
    if set(CENTERED_ANGST) <= cols:
        return "pytom" if pytom else "relion5"
    if pytom:
        return "pytom"
    tomo_names = _as_names(particles[TOMO_NAME]) if TOMO_NAME in cols else []
    if TOMO_NAME in cols and (
        isinstance(blocks.get("general"), dict) or any(n.endswith(".tomostar") for n in tomo_names)
    ):
        return "warp"
    if TOMO_NAME in cols and optics is not None and TILT_SERIES_ANGPIX in optics.columns:
        return "relion4"
    return "relion31" if optics is not None else "relion30"


def read_particles(
    path: str | Path, angpix: float | None = None, tomograms: str | Path | None = None
) -> ParticleTable:
    """Read any supported particle/coordinate STAR file into a :class:`ParticleTable`.

    ``path`` may be a particles file or an optimisation_set.star. ``angpix`` states the voxel size
    of the coordinates where the file does not (an error where the file states another);
    ``tomograms`` names a RELION 5 tomograms.star (needed for centred coordinates, found beside
    the particles or through an optimisation set otherwise). See the module docstring.
    """
    p = Path(path)
    if angpix is not None and not angpix > 0:
        raise UserError(f"{p}: --angpix must be positive (got {angpix})")
    blocks = read_star_blocks(p)

    # an optimisation set: follow it
    pairs = [b for b in blocks.values() if isinstance(b, dict) and PARTICLES_FILE in b]
    if pairs and not _loop_blocks(blocks):
        refs = _optimisation_refs(p)
        part = refs.get(PARTICLES_FILE)
        if part is None:
            raise file_error(p, f"particles file {pairs[0][PARTICLES_FILE]!r} not found")
        if tomograms is None:
            tomograms = refs.get(TOMOGRAMS_FILE)
            if tomograms is None and TOMOGRAMS_FILE in pairs[0]:
                raise file_error(p, f"tomograms file {pairs[0][TOMOGRAMS_FILE]!r} not found")
        return read_particles(part, angpix=angpix, tomograms=tomograms)

    particles = blocks.get("particles")
    optics = blocks.get("optics")
    optics = optics.reset_index(drop=True).copy() if isinstance(optics, pd.DataFrame) else None
    if not isinstance(particles, pd.DataFrame):
        loops = _loop_blocks(blocks)
        glob = blocks.get("global")
        if isinstance(glob, pd.DataFrame) and set(TOMO_SIZES) <= set(glob.columns):
            raise file_error(
                p, "is a tomograms table, not particles (pass it as the tomograms file)"
            )
        if len(loops) != 1:
            raise file_error(p, "no data_particles block and not a single-table STAR file")
        particles = loops[0]
    cols = set(particles.columns)
    has_px = set(COORDS) <= cols
    if not has_px and not set(CENTERED_ANGST) <= cols:
        raise file_error(
            p, "no particle coordinates (rlnCoordinateX/Y/Z or rlnCenteredCoordinateX/Y/ZAngst)"
        )
    if not len(particles):
        raise file_error(p, "the particle table is empty")
    flavour = detect_flavour(blocks)
    general = dict(blocks["general"]) if isinstance(blocks.get("general"), dict) else {}
    df = particles.reset_index(drop=True).copy()
    if TOMO_NAME in df.columns:
        df[TOMO_NAME] = _as_names(df[TOMO_NAME])
    if TOMO_NAME not in df.columns:
        if TOMO_FILE not in df.columns:
            raise file_error(p, "no tomogram name column (rlnTomoName or rlnMicrographName)")
        df[TOMO_NAME] = [_tomo_name_from_path(v) for v in df[TOMO_FILE]]

    # the tomograms table: required for relion5, optional otherwise
    tomos, tomo_blocks, tomo_src = None, {}, None
    explicit = tomograms is not None
    centred = set(CENTERED_ANGST) <= set(df.columns)
    if explicit:
        tomo_src = Path(tomograms)
    elif centred or flavour == "warp":
        tomo_src = _find_tomograms(p)
        if tomo_src is not None:
            logger.info("%s: using tomograms table %s", p, tomo_src)
    if tomo_src is not None:
        tomos, tomo_blocks = _tomogram_set(tomo_src)
        unknown = sorted(set(df[TOMO_NAME]) - set(tomos[TOMO_NAME]))
        if unknown and (explicit or centred):
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise file_error(
                p, f"tomogram {unknown[0]!r}{more} is not in the tomograms table {tomo_src}"
            )
        if unknown:
            logger.warning("%s: %s does not list its tomograms; ignored", p, tomo_src)
            tomos, tomo_blocks, tomo_src = None, {}, None

    if centred:
        df, coord_angpix = _read_centered(df, optics, tomos, tomo_src, angpix, p)
    else:
        for c in COORDS:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
            if df[c].isna().any():
                raise file_error(p, f"{c} has values that are not numbers")
        if flavour == "relion30":
            per_row = _legacy_row_angpix(df)
            what, stated = "Mag/DetectorPixelSize pixel size", False
        elif flavour == "pytom":
            per_row = _legacy_row_angpix(df)
            what, stated = "rlnDetectorPixelSize (pytom: the tomogram voxel size)", True
        elif _per_row(df, optics, MICROGRAPH_ANGPIX, p) is not None:
            # stated explicitly (RELION 3.1 meaning; what write_relion31 writes): wins everywhere
            per_row = _per_row(df, optics, MICROGRAPH_ANGPIX, p)
            what, stated = MICROGRAPH_ANGPIX, True
        elif flavour == "relion4":
            per_row = _per_row(df, optics, TILT_SERIES_ANGPIX, p)
            what, stated = TILT_SERIES_ANGPIX, True
        elif flavour == "warp":
            per_row = _per_row(df, optics, IMAGE_ANGPIX, p)
            if per_row is None:
                ts = _per_row(df, optics, TILT_SERIES_ANGPIX, p)
                b = _per_row(df, optics, SUBTOMO_BINNING, p)
                per_row = None if ts is None or b is None else ts * b
            what, stated = f"export pixel size ({IMAGE_ANGPIX})", True
        else:  # relion31 without rlnMicrographPixelSize: Warp 1's convention
            per_row = _per_row(df, optics, IMAGE_ANGPIX, p)
            what, stated = IMAGE_ANGPIX, False
        coord_angpix, factor = _common_angpix(per_row, angpix, stated, what, p)
        _rescale(df, factor)
        if coord_angpix is None:
            coord_angpix = _angpix_from_tomogram_headers(df, p)

    if tomos is not None and TOMO_FILE not in df.columns and TOMO_RECONSTRUCTION in tomos.columns:
        files = dict(zip(tomos[TOMO_NAME], _as_names(tomos[TOMO_RECONSTRUCTION]), strict=True))
        df[TOMO_FILE] = df[TOMO_NAME].map(files)
    return ParticleTable(
        particles=df,
        coord_angpix=coord_angpix,
        optics=optics,
        tomograms=tomos,
        flavour=flavour,
        source=p,
        general=general,
        tomogram_blocks=tomo_blocks,
        tomograms_source=tomo_src,
    )


def _read_centered(
    df: pd.DataFrame,
    optics: pd.DataFrame | None,
    tomos: pd.DataFrame | None,
    tomo_src: Path | None,
    angpix: float | None,
    p: Path,
) -> tuple[pd.DataFrame, float]:
    """Centred Å → pixels of the reconstructed tomograms: (new particle frame, coord_angpix)."""
    if tomos is None:
        raise file_error(
            p,
            "RELION 5 particles (centred Å coordinates) need a tomograms table: pass --tomograms "
            "tomograms.star or read the optimisation_set.star",
        )
    if TOMO_NAME not in df.columns:
        raise file_error(p, "RELION 5 particles without rlnTomoName")
    rows = tomos.set_index(TOMO_NAME).loc[df[TOMO_NAME]]
    ts = rows[TILT_SERIES_ANGPIX].to_numpy(dtype=np.float64)
    sizes = rows[list(TOMO_SIZES)].to_numpy(dtype=np.float64)
    opt_ts = _per_row(df, optics, TILT_SERIES_ANGPIX, p)
    if opt_ts is not None:
        bad = np.flatnonzero(~_close(ts, opt_ts))
        if len(bad):
            i = bad[0]
            raise file_error(
                p,
                f"{TILT_SERIES_ANGPIX} {opt_ts[i]:g} in data_optics disagrees with {ts[i]:g} for "
                f"tomogram {df[TOMO_NAME].iloc[i]!r} in {tomo_src}",
            )
    if TOMO_BINNING in tomos.columns:
        voxel = ts * rows[TOMO_BINNING].to_numpy(dtype=np.float64)
        coord_angpix, _ = _common_angpix(voxel, angpix, True, "tomogram voxel size", tomo_src or p)
    else:
        coord_angpix = float(angpix) if angpix else float(ts[0])
        if not angpix and not np.allclose(ts, ts[0], rtol=1e-6):
            logger.warning(
                "%s: tomograms have different tilt-series pixel sizes; coordinates given in "
                "pixels of %g Å",
                p, coord_angpix,
            )  # fmt: skip
    centered = df[list(CENTERED_ANGST)].apply(pd.to_numeric, errors="coerce")
    if centered.isna().any().any():
        raise file_error(p, "rlnCenteredCoordinate*Angst has values that are not numbers")
    px = (
        centered_angst_to_pixels(
            centered.to_numpy(dtype=np.float64), sizes, ts[:, None], binning=1.0
        )
        * (ts / coord_angpix)[:, None]
    )
    at = list(df.columns).index(CENTERED_ANGST[0])
    df = df.drop(columns=[c for c in (*CENTERED_ANGST, *COORDS) if c in df.columns])
    at = min(at, len(df.columns))
    for k, c in enumerate(COORDS):
        df.insert(at + k, c, px[:, k])
    return df, coord_angpix


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


def _refuse_existing(paths: list[Path], overwrite: bool, table: ParticleTable) -> None:
    inputs = [s for s in (table.source, table.tomograms_source) if s is not None]
    check_not_input(paths, inputs)
    if not overwrite:
        for q in paths:
            if q.exists():
                raise file_error(q, "output already exists; pass --overwrite to replace it")


def _rln_only(df: pd.DataFrame) -> pd.DataFrame:
    dropped = [c for c in df.columns if not str(c).startswith("rln")]
    if dropped:
        logger.debug("not written (not RELION labels): %s", ", ".join(map(str, dropped)))
    return df.drop(columns=dropped)


def _derived_tomo_name(df: pd.DataFrame) -> bool:
    """True when rlnTomoName is just the file name stem of rlnMicrographName (reader-derived)."""
    if TOMO_NAME not in df.columns or TOMO_FILE not in df.columns:
        return False
    derived = [_tomo_name_from_path(v) for v in df[TOMO_FILE]]
    return list(df[TOMO_NAME].astype(str)) == derived


def _check_coords(df: pd.DataFrame, where: Path) -> None:
    missing = [c for c in COORDS if c not in df.columns]
    if missing:
        raise UserError(f"{where}: the particle table has no {', '.join(missing)}")


def write_relion31(path: str | Path, table: ParticleTable, overwrite: bool = False) -> Path:
    """Write RELION 3.1 legacy subtomogram STAR: ``data_optics`` + ``data_particles``.

    Coordinates are written in pixels of ``table.coord_angpix``, which is stated as
    rlnMicrographPixelSize in every optics group (so reading back needs no guess); optics gets
    rlnImageDimensionality 3 where missing. Columns that are not RELION labels are dropped, and a
    rlnTomoName that is only the stem of rlnMicrographName is left for the reader to derive.
    A missing optics table is an error (subtomogram averaging needs it).
    """
    p = Path(path)
    if table.optics is None or not len(table.optics):
        raise UserError(
            f"{p}: cannot write RELION 3.1 STAR without optics (pixel size, box); "
            "give the table an optics table (see default_optics)"
        )
    _refuse_existing([p], overwrite, table)
    df = _rln_only(table.particles.copy())
    _check_coords(df, p)
    optics = table.optics.copy()
    if OPTICS_GROUP not in optics.columns:
        if len(optics) != 1:
            raise UserError(f"{p}: optics table with several rows but no {OPTICS_GROUP}")
        optics[OPTICS_GROUP] = 1
    if OPTICS_GROUP not in df.columns:
        if len(optics) != 1:
            raise UserError(f"{p}: several optics groups but particles have no {OPTICS_GROUP}")
        df[OPTICS_GROUP] = int(optics[OPTICS_GROUP].iloc[0])
    missing = sorted(set(df[OPTICS_GROUP].astype(int)) - set(optics[OPTICS_GROUP].astype(int)))
    if missing:
        raise UserError(
            f"{p}: particles refer to optics group(s) {missing} not in the optics table"
        )
    if "rlnImageDimensionality" not in optics.columns:
        optics["rlnImageDimensionality"] = 3
    if table.coord_angpix:
        optics[MICROGRAPH_ANGPIX] = float(table.coord_angpix)
    df = df.drop(columns=[c for c in df.columns if c.startswith("rlnCenteredCoordinate")])
    if _derived_tomo_name(df):
        df = df.drop(columns=[TOMO_NAME])
    return write_star_blocks(p, {"optics": optics, "particles": df}, overwrite=True)


def _legacy_row_angpix(df: pd.DataFrame) -> np.ndarray | None:
    """Per-row Å/px of a single-block file: 1e4·DPS/Mag (RELION 3.0), DPS alone (pytom)."""
    if "rlnDetectorPixelSize" not in df.columns:
        return None
    dps = pd.to_numeric(df["rlnDetectorPixelSize"], errors="coerce").to_numpy(dtype=np.float64)
    if "rlnMagnification" in df.columns:
        mag = pd.to_numeric(df["rlnMagnification"], errors="coerce").to_numpy(dtype=np.float64)
        return 1e4 * dps / mag
    return dps


def _write_single_block(path: Path, table: ParticleTable, overwrite: bool) -> Path:
    """Single ``data_`` block (RELION 3.0, pytom), coordinates back in each row's stated pixels."""
    _refuse_existing([path], overwrite, table)
    df = _rln_only(table.particles.copy())
    _check_coords(df, path)
    row_angpix = _legacy_row_angpix(df)
    if table.coord_angpix and row_angpix is not None:
        _rescale(df, table.coord_angpix / row_angpix)
    if _derived_tomo_name(df):
        df = df.drop(columns=[TOMO_NAME])
    return write_star_blocks(path, {"": df}, overwrite=True)


def relion5_paths(particles_path: str | Path) -> dict[str, Path]:
    """The three files :func:`write_relion5` writes for ``particles_path``.

    ``particles.star`` gets ``tomograms.star`` and ``optimisation_set.star`` beside it; any other
    ``X.star`` gets ``X_tomograms.star`` and ``X_optimisation_set.star`` (as WarpTools names them).
    """
    p = Path(particles_path)
    if p.name == "particles.star":
        return {
            "particles": p,
            "tomograms": p.with_name("tomograms.star"),
            "optimisation_set": p.with_name("optimisation_set.star"),
        }
    return {
        "particles": p,
        "tomograms": p.with_name(f"{p.stem}_tomograms.star"),
        "optimisation_set": p.with_name(f"{p.stem}_optimisation_set.star"),
    }


def write_relion5(
    particles_path: str | Path, table: ParticleTable, overwrite: bool = False
) -> dict[str, Path]:
    """Write RELION 5 particles.star + tomograms.star + optimisation_set.star.

    particles.star has ``data_general`` (rlnTomoSubTomosAre2DStacks, 0 unless the table says
    otherwise: our subtomograms are 3D volumes), ``data_optics`` (with rlnTomoTiltSeriesPixelSize,
    which RELION requires; one group per tomogram, named after it, when the table has no optics)
    and ``data_particles`` with rlnTomoName and rlnCenteredCoordinateX/Y/ZAngst computed from the
    pixel coordinates with the ``size/2`` centre (module docstring); pixel coordinates are not
    written (RELION 5 drops them too). Returns the written paths (see :func:`relion5_paths`).
    """
    out = relion5_paths(particles_path)
    p = out["particles"]
    if table.tomograms is None:
        raise UserError(
            f"{p}: cannot write RELION 5 STAR without a tomograms table (sizes, pixel size); "
            "build one with make_tomograms_table"
        )
    if not table.coord_angpix:
        raise UserError(f"{p}: cannot write RELION 5 STAR: the coordinates' voxel size is unknown")
    _refuse_existing(list(out.values()), overwrite, table)
    df = _rln_only(table.particles.copy())
    _check_coords(df, p)
    if TOMO_NAME not in df.columns:
        raise UserError(f"{p}: the particle table has no {TOMO_NAME}")
    tomos = table.tomograms.reset_index(drop=True).copy()
    tomos[TOMO_NAME] = _as_names(tomos[TOMO_NAME])
    for c in (*TOMO_SIZES, TILT_SERIES_ANGPIX):
        if c not in tomos.columns:
            raise UserError(f"{out['tomograms']}: the tomograms table has no {c}")
    if TOMO_BINNING not in tomos.columns:
        # state the voxel size our pixel coordinates are in, so reading back gives them again
        tomos[TOMO_BINNING] = float(table.coord_angpix) / tomos[TILT_SERIES_ANGPIX].astype(float)
    names = _as_names(df[TOMO_NAME])
    unknown = sorted(set(names) - set(tomos[TOMO_NAME]))
    if unknown:
        raise UserError(f"{p}: tomogram {unknown[0]!r} is not in the tomograms table")
    rows = tomos.set_index(TOMO_NAME).loc[names]
    ts = rows[TILT_SERIES_ANGPIX].to_numpy(dtype=np.float64)
    sizes = rows[list(TOMO_SIZES)].to_numpy(dtype=np.float64)
    coords = df[list(COORDS)].to_numpy(dtype=np.float64)
    centered = pixels_to_centered_angst(
        coords * (table.coord_angpix / ts)[:, None], sizes, ts[:, None], binning=1.0
    )
    if TOMO_FILE in df.columns and TOMO_RECONSTRUCTION in rows.columns:
        if list(df[TOMO_FILE].astype(str)) == _as_names(rows[TOMO_RECONSTRUCTION]):
            df = df.drop(columns=[TOMO_FILE])  # derived from tomograms.star by the reader
    df = df.drop(columns=list(COORDS) + [c for c in CENTERED_ANGST if c in df.columns])
    at = list(df.columns).index(TOMO_NAME) + 1
    for k, c in enumerate(CENTERED_ANGST):
        df.insert(at + k, c, centered[:, k])

    optics = table.optics.copy() if table.optics is not None else None
    if optics is None or not len(optics):
        order = list(dict.fromkeys(names))
        groups = {n: i + 1 for i, n in enumerate(order)}
        first = tomos.set_index(TOMO_NAME).loc[order]
        optics = pd.DataFrame({OPTICS_GROUP: list(groups.values()), "rlnOpticsGroupName": order})
        for label, default in (
            ("rlnVoltage", 300.0),
            ("rlnSphericalAberration", 2.7),
            ("rlnAmplitudeContrast", 0.07),
        ):
            optics[label] = (
                first[label].to_numpy(dtype=np.float64) if label in first.columns else default
            )
        optics[TILT_SERIES_ANGPIX] = first[TILT_SERIES_ANGPIX].to_numpy(dtype=np.float64)
        df[OPTICS_GROUP] = [groups[n] for n in names]
    else:
        if OPTICS_GROUP not in optics.columns:
            optics[OPTICS_GROUP] = np.arange(1, len(optics) + 1)
        if OPTICS_GROUP not in df.columns:
            if len(optics) != 1:
                raise UserError(f"{p}: several optics groups but particles have no {OPTICS_GROUP}")
            df[OPTICS_GROUP] = int(optics[OPTICS_GROUP].iloc[0])
        groups_of_rows = df[OPTICS_GROUP].astype(int).to_numpy()
        missing = sorted(set(groups_of_rows) - set(optics[OPTICS_GROUP].astype(int)))
        if missing:
            raise UserError(f"{p}: particles refer to optics group(s) {missing} not in optics")
        if TILT_SERIES_ANGPIX not in optics.columns:
            values = []
            for g in optics[OPTICS_GROUP].astype(int):
                ts_g = ts[groups_of_rows == g]
                if len(ts_g) and not np.allclose(ts_g, ts_g[0], rtol=1e-6):
                    raise UserError(
                        f"{p}: optics group {g} holds tomograms with different tilt-series "
                        "pixel sizes; give each its own optics group"
                    )
                values.append(float(ts_g[0]) if len(ts_g) else float(ts[0]))
            optics[TILT_SERIES_ANGPIX] = values
    general = {STACKS_2D: 0, **table.general}

    opt_set = {
        "": {
            PARTICLES_FILE: str(out["particles"]),
            TOMOGRAMS_FILE: str(out["tomograms"]),
        }
    }
    # validate all three before writing any, so bad input leaves nothing behind
    files = {
        "tomograms": _clean_blocks(out["tomograms"], {"global": tomos, **table.tomogram_blocks}),
        "particles": _clean_blocks(p, {"general": general, "optics": optics, "particles": df}),
        "optimisation_set": _clean_blocks(out["optimisation_set"], opt_set),
    }
    for role, clean in files.items():
        _write_clean(out[role], clean)
    return out


def write_particles(
    path: str | Path, table: ParticleTable, overwrite: bool = False
) -> dict[str, Path]:
    """Write ``table`` in its own flavour: legacy in → legacy out, RELION 5 in → RELION 5 out.

    relion30 and pytom without a tomograms table → one ``data_`` block (coordinates in each row's
    Mag/DPS or DPS pixels; RELION 3.1 when the table has optics); relion31/relion4 →
    :func:`write_relion31`; relion5, and WarpTools/pytom tables with a tomograms table →
    :func:`write_relion5` (centred Å, what RELION 5 reads); WarpTools without one → RELION 3.1.
    Returns the written paths by role (``particles``, and for RELION 5 ``tomograms`` and
    ``optimisation_set``).
    """
    p = Path(path)
    flavour = table.flavour
    if flavour == "relion5" or (flavour in ("warp", "pytom") and table.tomograms is not None):
        return write_relion5(p, table, overwrite)
    if flavour in ("relion30", "pytom") and table.optics is None:
        return {"particles": _write_single_block(p, table, overwrite)}
    return {"particles": write_relion31(p, table, overwrite)}
