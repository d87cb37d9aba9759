"""disca_extract: cut subtomograms out of tomograms at STAR coordinates, ready for RELION and DISCA.

Input is any coordinate or particle STAR file the readers accept (disca_pick's coordinates.star,
RELION 3.0/3.1/4/5, Warp, pytom). Tomogram files come from --tomograms (NAME=PATH pairs, or a RELION 5
tomograms.star), else from the STAR itself (rlnMicrographName, or rlnTomoReconstructedTomogram of its
tomograms.star). Paths are relative to the current directory (the RELION project directory).

Outputs in --o:
  Subtomograms/<tomo>/<tomo>_<n>.mrc   one volume per particle (RELION reads one volume per .mrc);
                                       zero mean, unit standard deviation; protein WHITE (tomograms
                                       are inverted unless --no-invert, for protein-dark tomograms)
  Subtomograms/<tomo>/<tomo>_ctf.mrc   3D CTF x missing-wedge weight of the tomogram (cubic box,
                                       origin at N/2: RELION's 3D CTF layout), the particles' rlnCtfImage
  particles.star                       RELION 3.1 subtomogram STAR (data_optics with
                                       rlnImageDimensionality 3) or RELION 5 when the input was RELION 5
  subtomograms.npy                     fast store for disca_cluster: an (N, S, S, S) float32 (float16
                                       with --float16) array, row i = particle i of particles.star
  subtomograms_names.txt               rlnImageName of each row of subtomograms.npy

Particles whose box leaves the tomogram are skipped (--border skip, counted in the log) or padded with
noise matching the box's inside (--border pad). --bin b block-averages the tomogram by b first; the
subtomogram voxel size is b times the tomogram's. Coordinates are written as the box centres in pixels
of the tomogram (rlnMicrographPixelSize), with any sub-voxel remainder in rlnOrigin*Angst.

Example:
  disca_extract --i Picks/job010/coordinates.star --o Extract/job011 --box 24 --bin 2
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from disca_tools.extract import (
    ExtractParams,
    StoreWriter,
    VolumeFileWriter,
    box_centres_px,
    box_starts,
    inside_mask,
    iter_boxes,
    write_store_names,
)
from disca_tools.io.mrc import check_angpix, open_volume, read_info, write_volume
from disca_tools.io.particles import (
    COORDS,
    CTF_IMAGE,
    IMAGE,
    ORIGINS_ANGST,
    TOMO_FILE,
    TOMO_NAME,
    TOMO_RECONSTRUCTION,
    ParticleTable,
    origins_px,
)
from disca_tools.io.star import default_optics, read_particles, read_tomograms, write_particles
from disca_tools.io.store import NAMES_FILE, STORE_FILE
from disca_tools.runtime.cli import CommonOptions, ToolSpec, opt, run_tool
from disca_tools.runtime.errors import UserError, file_error
from disca_tools.runtime.log import logger
from disca_tools.runtime.outputs import check_not_input, prepare_output_dir
from disca_tools.simulate.imaging import Imaging, ctf_wedge_weight


@dataclass(kw_only=True)
class Options(CommonOptions):
    i: str = opt("--i", "--input", help="coordinate or particle STAR file")
    o: str = opt("--o", "--output-dir", help="output folder")
    box: int = opt("--box", "--box-size", default=24, type=int, help="box size in output voxels")
    bin: int = opt(
        "--bin", default=1, type=int, help="bin the tomogram by this factor before boxing"
    )
    tomograms: list[str] = opt(
        "--tomograms", nargs="+", default=None, help="NAME=PATH pairs, or a RELION 5 tomograms.star"
    )
    angpix: float = opt(
        "--angpix", default=None, type=float, help="tomogram voxel size in Å (default: header)"
    )
    coord_angpix: float = opt(
        "--coord-angpix",
        default=None,
        type=float,
        help="voxel size of the STAR coordinates when the file does not say (default: the tomogram's)",
    )
    border: str = opt(
        "--border", default="skip", choices=["skip", "pad"], help="boxes leaving the tomogram"
    )
    invert: bool = opt(
        "--invert",
        default=None,
        negatable=True,
        help="negate values so protein is white (default: yes, tomograms have protein dark)",
    )
    float16: bool = opt(
        "--float16",
        default=False,
        help="half-precision subtomograms and store (MRC mode 12: RELION >= 4 reads it, 3.1 does not)",
    )
    ctf: bool = opt(
        "--ctf", default=True, negatable=True, help="write 3D CTF/wedge weights (rlnCtfImage)"
    )
    tilt_range: float = opt(
        "--tilt-range", default=60.0, type=float, help="tilt range ±degrees (>= 90: no wedge)"
    )
    tilt_axis: str = opt(
        "--tilt-axis", default="y", choices=["x", "y"], help="tilt axis of the tomograms"
    )
    defocus: float = opt(
        "--defocus",
        default=None,
        type=float,
        help="defocus in µm, negative = underfocus (e.g. -5); default: no CTF, wedge only",
    )
    voltage: float = opt("--voltage", default=300.0, type=float, help="acceleration voltage (kV)")
    cs: float = opt("--cs", default=2.7, type=float, help="spherical aberration (mm)")
    amplitude_contrast: float = opt(
        "--amplitude-contrast", default=0.07, type=float, help="amplitude contrast"
    )
    seed: int = opt("--seed", default=0, type=int, help="seed for --border pad noise")


@dataclass
class _Tomogram:
    name: str
    path: Path
    angpix: float
    shape_zyx: tuple[int, int, int]


def _tomogram_files(o: Options, table: ParticleTable) -> dict[str, str]:
    """Tomogram name → file, from --tomograms, the STAR's tomograms table or rlnMicrographName."""
    files: dict[str, str] = {}
    if table.tomograms is not None and TOMO_RECONSTRUCTION in table.tomograms.columns:
        files.update(
            zip(
                table.tomograms[TOMO_NAME].astype(str),
                table.tomograms[TOMO_RECONSTRUCTION].astype(str),
                strict=True,
            )
        )
    if TOMO_FILE in table.particles.columns:
        for name, f in zip(
            table.particles[TOMO_NAME].astype(str),
            table.particles[TOMO_FILE].astype(str),
            strict=True,
        ):
            files.setdefault(name, f)
    if o.tomograms:
        if len(o.tomograms) == 1 and o.tomograms[0].endswith(".star"):
            tomos = read_tomograms(o.tomograms[0])
            if TOMO_RECONSTRUCTION not in tomos.columns:
                raise file_error(
                    o.tomograms[0], f"no {TOMO_RECONSTRUCTION} column: no tomogram files"
                )
            files.update(
                zip(
                    tomos[TOMO_NAME].astype(str),
                    tomos[TOMO_RECONSTRUCTION].astype(str),
                    strict=True,
                )
            )
        else:
            for pair in o.tomograms:
                if "=" not in pair:
                    raise UserError(
                        f"--tomograms: expected NAME=PATH or a tomograms.star, got {pair!r}"
                    )
                name, path = pair.split("=", 1)
                files[name] = path
    return files


def _open_tomograms(o: Options, table: ParticleTable) -> dict[str, _Tomogram]:
    files = _tomogram_files(o, table)
    tomos: dict[str, _Tomogram] = {}
    for name in dict.fromkeys(table.particles[TOMO_NAME].astype(str)):
        f = files.get(name)
        if f is None or not Path(f).is_file():
            where = f"file {f} not found" if f else "no file given"
            raise file_error(
                o.i, f"tomogram {name!r} cannot be found ({where}); pass --tomograms {name}=PATH"
            )
        info = read_info(f)
        tomos[name] = _Tomogram(
            name, Path(f), check_angpix(f, info.angpix, o.angpix), info.shape_zyx
        )
    sizes = {round(t.angpix, 4) for t in tomos.values()}
    if len(sizes) > 1:
        raise file_error(
            o.i,
            f"tomograms have different voxel sizes ({', '.join(f'{s:g}' for s in sorted(sizes))} Å); "
            "extract them separately (one optics group per run)",
        )
    return tomos


def _rel(path: Path) -> str:
    """A path relative to the current (project) directory when below it, else absolute."""
    rel = os.path.relpath(path)
    return str(path.resolve()) if rel.startswith("..") else rel


def run(o: Options) -> dict:
    params = ExtractParams(
        box=o.box,
        binning=o.bin,
        invert=True if o.invert is None else o.invert,
        border=o.border,
        float16=o.float16,
    )
    if params.float16:
        logger.warning(
            "--float16: RELION 3.1 cannot read MRC mode 12 subtomograms (RELION >= 4 can)"
        )
    table = read_particles(o.i, angpix=o.coord_angpix)
    tomos = _open_tomograms(o, table)
    angpix = next(iter(tomos.values())).angpix
    out_angpix = angpix * params.binning
    df = table.particles.copy()
    names = df[TOMO_NAME].astype(str).to_numpy()

    # coordinates → pixels of the tomograms; recentre on existing origins
    coord_angpix = table.coord_angpix or angpix
    coords = df[list(COORDS)].to_numpy(np.float64) * (coord_angpix / angpix)
    origins = origins_px(df, angpix)
    if origins is not None:
        coords -= origins

    # validate everything before writing anything
    keep = np.ones(len(df), dtype=bool)
    starts = np.zeros((len(df), 3), dtype=np.int64)
    resid = np.zeros((len(df), 3))
    for name, t in tomos.items():
        rows = np.flatnonzero(names == name)
        binned = tuple(s // params.binning for s in t.shape_zyx)
        if min(binned) < params.box:
            raise file_error(
                t.path,
                f"box {params.box} (at bin {params.binning}) is larger than the tomogram "
                f"{binned[::-1]} voxels",
            )
        c = coords[rows]
        outside = np.any((c < -0.5) | (c > np.asarray(t.shape_zyx[::-1]) - 0.5), axis=1)
        if outside.any():
            k = rows[np.flatnonzero(outside)[0]]
            x, y, z = coords[k]
            raise file_error(
                o.i,
                f"particle {k + 1} ({name}) at ({x:.1f}, {y:.1f}, {z:.1f}) px lies outside the "
                f"tomogram {t.path} of {t.shape_zyx[::-1]} voxels (voxel sizes wrong? see --coord-angpix)",
            )
        s, d = box_starts(c, params)
        starts[rows], resid[rows] = s, d
        keep[rows] = inside_mask(s, binned, params.box)
    n_border = int((~keep).sum())
    if n_border and params.border == "skip":
        logger.warning(
            "%d of %d particles skipped: their box leaves the tomogram (--border pad keeps them)",
            n_border,
            len(df),
        )
    elif n_border:
        logger.info("%d particles padded with noise at the tomogram border", n_border)
    if params.border == "pad":
        keep[:] = True
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise file_error(
            o.i, "no particle can be extracted (every box leaves the tomogram; try --border pad)"
        )

    out = Path(o.o)
    products = ["particles.star", STORE_FILE, NAMES_FILE, "Subtomograms"]
    if table.flavour in ("relion5", "pytom") or (
        table.flavour == "warp" and table.tomograms is not None
    ):
        products += ["tomograms.star", "optimisation_set.star"]
    check_not_input([out / p for p in products], [o.i] + [str(t.path) for t in tomos.values()])
    prepare_output_dir(out, o.overwrite, products)

    # particle file names (relative to the project directory, as RELION resolves them)
    sub_dir = out / "Subtomograms"
    counters: dict[str, int] = {}
    image_names: list[str] = []
    rel_dir = _rel(sub_dir)
    rels = []
    for k in idx:
        n = counters[names[k]] = counters.get(names[k], 0) + 1
        rel = f"{names[k]}/{names[k]}_{n:06d}.mrc"
        rels.append(rel)
        image_names.append(f"{rel_dir}/{rel}")
    writer = VolumeFileWriter(sub_dir, params.box, out_angpix, params.dtype, threads=max(4, o.j))
    row_of = {int(k): r for r, k in enumerate(idx)}
    rng = np.random.default_rng(o.seed)
    store = StoreWriter(out / STORE_FILE, len(idx), params.box, params.dtype)
    ctf_names = {}
    try:
        if o.ctf:
            imaging = Imaging(
                voltage_kv=o.voltage,
                cs_mm=o.cs,
                amplitude_contrast=o.amplitude_contrast,
                defocus_um=o.defocus if o.defocus is not None else -5.0,
                tilt_range_deg=o.tilt_range,
                tilt_axis=o.tilt_axis,
                apply_ctf=o.defocus is not None,
            )
            weight = ctf_wedge_weight((params.box,) * 3, out_angpix, imaging, layout="centered")
            for name in tomos:
                f = writer.path(Path(name) / f"{name}_ctf.mrc")
                f.parent.mkdir(parents=True, exist_ok=True)
                write_volume(f, weight, out_angpix, overwrite=True)  # float32 always
                ctf_names[name] = _rel(sub_dir / name / f"{name}_ctf.mrc")
        for name, t in tomos.items():
            rows = np.asarray([k for k in idx if names[k] == name], dtype=np.int64)
            if not len(rows):
                continue
            data, _ = open_volume(t.path)
            for j, sub in iter_boxes(data, starts[rows], params, rng, desc=name):
                r = row_of[int(rows[j])]
                writer.write(rels[r], sub, also=partial(store.__setitem__, r))
        writer.flush()  # the workers also fill the store: finish them before closing it
        store.commit()
        writer.commit()
    except BaseException:
        store.abort()
        writer.abort()
        raise
    write_store_names(out / NAMES_FILE, image_names)

    kept = df.iloc[idx].reset_index(drop=True)
    centres = np.zeros((len(idx), 3))
    for name in tomos:
        m = names[idx] == name
        centres[m] = box_centres_px(coords[idx][m], params.binning)
    for k, c in enumerate(COORDS):
        kept[c] = centres[:, k]
    origin = -resid[idx] * out_angpix
    if np.any(np.abs(origin) > 1e-6) or all(c in kept.columns for c in ORIGINS_ANGST):
        for k, c in enumerate(ORIGINS_ANGST):
            kept[c] = origin[:, k]
    kept[TOMO_FILE] = [str(tomos[n].path) for n in names[idx]]
    kept[IMAGE] = image_names
    if o.ctf:
        kept[CTF_IMAGE] = [ctf_names[n] for n in names[idx]]
    elif CTF_IMAGE in kept.columns:  # old weights of another box size must not be kept
        kept = kept.drop(columns=[CTF_IMAGE])
    for c in ("rlnOpticsGroup", "rlnImagePixelSize"):
        if c in kept.columns:
            kept = kept.drop(columns=[c])
    optics = default_optics(out_angpix, params.box, o.voltage, o.cs, o.amplitude_contrast)
    flavour = table.flavour if table.flavour in ("relion5", "pytom", "warp") else "relion31"
    result = ParticleTable(
        kept,
        coord_angpix=angpix,
        optics=optics,
        tomograms=table.tomograms,
        flavour=flavour,
        source=table.source,
        general=table.general,
        tomogram_blocks=table.tomogram_blocks,
        tomograms_source=table.tomograms_source,
    )
    if flavour in ("relion5", "pytom", "warp") and result.tomograms is not None:
        optics["rlnTomoTiltSeriesPixelSize"] = float(
            pd.to_numeric(result.tomograms["rlnTomoTiltSeriesPixelSize"]).iloc[0]
        )
    write_particles(out / "particles.star", result, overwrite=True)
    return {
        "n_particles": int(len(idx)),
        "n_input": int(len(df)),
        "n_border_skipped": n_border if params.border == "skip" else 0,
        "n_border_padded": n_border if params.border == "pad" else 0,
        "box": params.box,
        "angpix": out_angpix,
        "inverted": params.invert,
    }


SPEC = ToolSpec(
    name="disca_extract",
    doc=__doc__,
    options=Options,
    run=run,
    output_dir=lambda o: o.o,
    relion_inputs={"in_parts": "i", "in_coords": "i"},
    relion_nodes=lambda o: [(f"{o.o}/particles.star", "particles")],
)


def main(argv: list[str] | None = None) -> int:
    return run_tool(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
