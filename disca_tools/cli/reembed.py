"""disca_reembed: put each particle's class map back into its tomogram (density + class labels).

  disca_reembed --i Refine3D/job020/run_data.star --maps Refine3D/job020/run_class001.mrc
      --tomograms Tomograms/TS_01.mrc --o Reembed/
  disca_reembed --i split/class_001.star split/... --maps class_001_average.mrc class_002_average.mrc
      --tomo-shape 1000,1000,250 --angpix 10 --o Reembed/

Input: a particle STAR with rlnClassNumber, ideally with refined angles and shifts (RELION 3.1 or 5
Refine3D/Class3D run_data.star, or clusters.star; for RELION 5 give the optimisation_set.star, or
--tomograms-star, so the centred coordinates can be converted); one map per class, matched by class number: a
map named ...classNNN... or ...class_NNN... (RELION's run_class001.mrc, our class_001_average.mrc)
serves class NNN; maps without a number serve the STAR's classes in increasing order.

Per tomogram (rlnTomoName) it writes, at the tomogram's voxel size (maps resampled as needed):
  <tomo>_reembedded.mrc  float32: every particle's class map placed at coordinate − origin with its
                         orientation (RELION's convention: the map rotated by (rot, tilt, psi))
  <tomo>_labels.mrc      int16: the class number of the strongest placed map above its contour per
                         voxel (contour: --contour, or --contour-fraction × the map's maximum), 0 elsewhere
  <tomo>_reembed.png     three z slices with the classes coloured
and reembed_summary.tsv (tomogram, class, particles, map).

The tomogram's shape and voxel size come from --tomograms (MRC files matched to rlnTomoName by file
name), else from --tomo-shape and --angpix, else from rlnMicrographName when that file exists, else
from the RELION 5 tomograms.star (--angpix overrides the voxel size in every case). Coordinates are converted from the STAR's pixel size
(--coord-angpix to state it) to the tomogram's. Without angles (or with --spheres) particles become
spheres of their class's size. Maps are expected protein positive (white); use --invert for
protein-dark maps. Volumes are written slab by slab through on-disk memmaps: memory stays bounded.
As a RELION External job: --in_parts is the STAR, --in_3dref one map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.mrc import check_angpix, read_info
from ..io.particles import CLASS, TILT_SERIES_ANGPIX, TOMO_BINNING, TOMO_FILE, TOMO_NAME, TOMO_SIZES
from ..io.star import read_particles
from ..plots.reembed import choose_slices, plot_reembed
from ..reembed import load_class_maps, match_maps, particle_placements, write_reembedded
from ..runtime.cli import CommonOptions, ToolSpec, opt, run_tool
from ..runtime.errors import UserError, file_error, require_file
from ..runtime.log import logger
from ..runtime.outputs import atomic_path, check_not_input, prepare_output_dir


@dataclass(kw_only=True)
class Options(CommonOptions):
    i: str = opt(
        "--i",
        "--input",
        help="particle STAR file with rlnClassNumber (run_data.star, clusters.star)",
    )
    maps: list[str] = opt(
        "--maps", "--ref", nargs="+", help="one map per class (run_classNNN.mrc or ours)"
    )
    o: str = opt("--o", "--output-dir", help="output folder")
    tomograms: list[str] = opt(
        "--tomograms", default=None, nargs="*", help="tomogram MRC files (shape, voxel size)"
    )
    tomo_shape: str = opt(
        "--tomo-shape", default=None, help="X,Y,Z tomogram size in voxels when no file is given"
    )
    angpix: float = opt(
        "--angpix",
        default=None,
        help="tomogram voxel size in Å (default: from the tomogram header)",
    )
    coord_angpix: float = opt(
        "--coord-angpix",
        default=None,
        help="voxel size of the STAR's coordinates (default: as the STAR states)",
    )
    tomograms_star: str = opt(
        "--tomograms-star", default=None, help="RELION 5 tomograms.star (default: found)"
    )
    map_angpix: float = opt(
        "--map-angpix", default=None, help="voxel size of the maps (default: their headers)"
    )
    contour: float = opt(
        "--contour", default=None, help="absolute contour level for the labels (default: fraction)"
    )
    contour_fraction: float = opt(
        "--contour-fraction", default=0.25, help="contour as a fraction of each map's max"
    )
    invert: bool = opt("--invert", default=False, help="maps are protein dark: negate them")
    no_mask: bool = opt(
        "--no-mask", default=False, help="do not mask maps with their box's inscribed sphere"
    )
    spheres: bool = opt(
        "--spheres", default=False, help="place spheres of each class's size even with angles"
    )
    slab: int = opt(
        "--slab", default=None, help="z slab thickness in voxels (default: ~128 MB of buffers)"
    )
    no_png: bool = opt("--no-png", default=False, help="skip the PNG")


def _safe(name: str) -> str:
    return str(name).replace("/", "_").replace(" ", "_")


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise UserError(f"--tomo-shape: cannot read {text!r}; write X,Y,Z") from None
    if len(vals) != 3 or min(vals) < 1:
        raise UserError(f"--tomo-shape: expected three positive sizes X,Y,Z, got {text!r}")
    return vals[0], vals[1], vals[2]


def _match_tomogram_files(
    files: list[str], names: list[str], micrographs: dict[str, str]
) -> dict[str, Path]:
    by_key: dict[str, Path] = {}
    for f in files:
        p = require_file(f, "tomogram")
        for key in (p.name, p.stem, str(p)):
            by_key.setdefault(key, p)
    out: dict[str, Path] = {}
    for n in names:
        keys = [n, Path(n).stem]
        if n in micrographs:
            keys += [micrographs[n], Path(micrographs[n]).name, Path(micrographs[n]).stem]
        hit = next((by_key[k] for k in keys if k in by_key), None)
        if hit is None:
            raise UserError(
                f"--tomograms: particles of tomogram {n!r} match none of the files given "
                f"({', '.join(Path(f).name for f in files)}); name files after rlnTomoName"
            )
        out[n] = hit
    return out


def _tomogram_geometry(
    o: Options, table, names: list[str]
) -> dict[str, tuple[tuple[int, int, int], float, str]]:
    """tomogram name → (shape_zyx, voxel size, where it came from)."""
    df = table.particles
    micrographs = {}
    if TOMO_FILE in df.columns:
        micrographs = dict(zip(df[TOMO_NAME].astype(str), df[TOMO_FILE].astype(str), strict=False))
    files = _match_tomogram_files(o.tomograms, names, micrographs) if o.tomograms else {}
    tomos = table.tomograms
    out = {}
    for n in names:
        if n in files:
            info = read_info(files[n])
            angpix = check_angpix(files[n], info.angpix, o.angpix or None)
            out[n] = (info.shape_zyx, angpix, str(files[n]))
            continue
        if o.tomo_shape:
            x, y, z = _parse_shape(o.tomo_shape)
            angpix = o.angpix or table.coord_angpix
            if not angpix:
                raise UserError("--tomo-shape needs --angpix (the tomogram voxel size)")
            out[n] = ((z, y, x), float(angpix), "--tomo-shape")
            continue
        mic = micrographs.get(n)
        if mic and Path(mic).is_file():
            info = read_info(mic)
            angpix = check_angpix(mic, info.angpix, o.angpix or None)
            out[n] = (info.shape_zyx, angpix, mic)
            continue
        if (
            tomos is not None
            and set(TOMO_SIZES) <= set(tomos.columns)
            and n in set(tomos[TOMO_NAME].astype(str))
        ):
            row = tomos.loc[tomos[TOMO_NAME].astype(str) == n].iloc[0]
            b = float(row[TOMO_BINNING]) if TOMO_BINNING in tomos.columns else 1.0
            angpix = o.angpix or float(row[TILT_SERIES_ANGPIX]) * b
            x, y, z = (int(round(float(row[c]) / b)) for c in TOMO_SIZES)
            out[n] = ((z, y, x), float(angpix), str(table.tomograms_source or "tomograms.star"))
            continue
        raise UserError(
            f"{o.i}: cannot tell the size of tomogram {n!r}: pass --tomograms TOMO.mrc or --tomo-shape X,Y,Z --angpix A"
        )
    return out


def run(o: Options) -> dict:
    src = require_file(o.i, "particle STAR file")
    for m in o.maps:
        require_file(m, "map")
    contour = o.contour
    for name, value in (
        ("--angpix", o.angpix),
        ("--coord-angpix", o.coord_angpix),
        ("--map-angpix", o.map_angpix),
    ):
        if value is not None and not value > 0:
            raise UserError(f"{name} must be positive (got {value})")
    if o.tomo_shape:
        _parse_shape(o.tomo_shape)
    if not 0 < o.contour_fraction < 1:
        raise UserError("--contour-fraction must be between 0 and 1")
    table = read_particles(src, angpix=o.coord_angpix or None, tomograms=o.tomograms_star or None)
    df = table.particles
    if CLASS not in df.columns:
        raise file_error(
            src, f"no {CLASS} column: which map goes where is unknown (cluster or classify first)"
        )
    classes = pd.to_numeric(df[CLASS], errors="coerce")
    if classes.isna().any():
        raise file_error(src, f"{CLASS} has values that are not numbers")
    maps_by_class = match_maps(o.maps, classes.astype(int).tolist())
    names = sorted(set(df[TOMO_NAME].astype(str)))
    geometry = _tomogram_geometry(o, table, names)
    spheres = o.spheres or not table.has_angles
    if not table.has_angles and not o.spheres:
        logger.warning(
            "%s: no angles (rlnAngleRot/Tilt/Psi): placing spheres of each class's size", src
        )

    # everything that can fail on the inputs is checked before anything is written
    prepared = {}
    for n in names:
        shape_zyx, angpix, _ = geometry[n]
        key = round(angpix, 6)
        if key not in prepared:
            prepared[key] = load_class_maps(
                maps_by_class,
                angpix,
                o.map_angpix or None,
                contour,
                o.contour_fraction,
                o.invert,
                not o.no_mask,
            )
    image_angpix = table.image_angpix()
    plans = []
    for n in names:
        shape_zyx, angpix, where = geometry[n]
        sel = (df[TOMO_NAME].astype(str) == n).to_numpy()
        if table.coord_angpix:
            coords = table.coords_at(angpix)[sel]
        else:
            coords = table.coords_px[sel]
            logger.info("%s: coordinates taken as pixels of the tomogram (%g Å)", src, angpix)
        pl = particle_placements(
            df.loc[sel].reset_index(drop=True), coords, angpix, image_angpix, str(src)
        )
        inside = np.all(
            (pl.centres_xyz >= -0.5) & (pl.centres_xyz < np.array(shape_zyx[::-1]) - 0.5), axis=1
        )
        if not inside.any():
            raise file_error(
                src,
                f"no particle of tomogram {n!r} lies inside it ({where}: {shape_zyx[::-1]} voxels at {angpix:g} Å); "
                "check --coord-angpix/--angpix",
            )
        if not inside.all():
            logger.warning(
                "%s: %d particles of %r lie outside the tomogram", src, int((~inside).sum()), n
            )
        plans.append((n, shape_zyx, angpix, pl))

    out_dir = Path(o.o)
    products = ["reembed_summary.tsv"]
    for n, *_ in plans:
        products += [f"{_safe(n)}_reembedded.mrc", f"{_safe(n)}_labels.mrc"]
        if not o.no_png:
            products.append(f"{_safe(n)}_reembed.png")
    inputs = [src, *o.maps, *(o.tomograms or [])]
    check_not_input([out_dir / p for p in products], inputs)
    prepare_output_dir(out_dir, o.overwrite, products)

    rows, nodes, stats = [], [], {}
    for n, shape_zyx, angpix, pl in plans:
        maps = prepared[round(angpix, 6)]
        dens_path = out_dir / f"{_safe(n)}_reembedded.mrc"
        lab_path = out_dir / f"{_safe(n)}_labels.mrc"
        logger.info(
            "tomogram %s: %d particles into %s voxels at %g Å", n, len(pl), shape_zyx[::-1], angpix
        )
        stats[n] = write_reembedded(
            dens_path, lab_path, pl, maps, shape_zyx, angpix, o.slab or None, spheres
        )
        nodes += [(str(dens_path), "map"), (str(lab_path), "map")]
        if not o.no_png:
            z = choose_slices(pl.centres_xyz[:, 2], shape_zyx[0])
            plot_reembed(
                dens_path, lab_path, out_dir / f"{_safe(n)}_reembed.png", z, sorted(maps), title=n
            )
        for c in sorted(set(pl.classes.tolist())):
            rows.append(
                {
                    "tomogram": n,
                    "class": c,
                    "particles": int((pl.classes == c).sum()),
                    "map": str(maps_by_class[c]),
                }
            )
    with atomic_path(out_dir / "reembed_summary.tsv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    o._relion_nodes = nodes
    return {
        "tomograms": names,
        "n_particles": int(len(df)),
        "spheres": bool(spheres),
        "stats": stats,
    }


SPEC = ToolSpec(
    name="disca_reembed",
    doc=__doc__,
    options=Options,
    run=run,
    output_dir=lambda o: o.o,
    relion_inputs={"in_parts": "i", "in_3dref": "maps"},
)


def main(argv: list[str] | None = None) -> int:
    return run_tool(SPEC, argv)
