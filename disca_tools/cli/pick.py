"""disca_pick: template-free DoG particle picking in tomograms (the DISCA paper's picker).

Computes a Difference-of-Gaussians map of each tomogram, keeps local maxima above a threshold and
enforces a minimum distance between picks (keeping the stronger one). Tomograms are read through a
memory map and processed in blocks with halos: results equal whole-volume processing exactly while
memory stays bounded (--chunk-mb), so a 100 GB unbinned tomogram can be picked on a laptop.

Inputs: one or more tomogram MRC files, or a RELION 5 tomograms.star (its rlnTomoReconstructedTomogram
files are picked). Outputs in --o:
  coordinates.star   RELION 3.1 style: rlnMicrographName (tomogram file), rlnTomoName,
                     rlnCoordinateX/Y/Z (0-based pixels of the input tomogram), rlnAutopickFigureOfMerit
                     (the DoG value, larger is stronger)
  particles.star, tomograms.star, optimisation_set.star
                     RELION 5 flavour (rlnCenteredCoordinate*Angst), for a tomograms.star input or --relion5
  <tomo>_picks.png   a few slices with the picks circled

Sizes: --particle-diameter (Å) sets the two Gaussians (σ = r/√3 bracketed by a factor 1.6) unless
--sigma1/--sigma2 (Å) are given; --min-distance (Å, default 15 voxels of the picking volume);
--border (Å from the tomogram faces; default: the particle radius). The threshold is one of
--threshold (absolute DoG value), --threshold-sd (mean + k·sd of the DoG map; default 2.5 when no
rule is given) and/or --max-picks (strongest N after suppression).

Polarity: cryo-ET protein is dark (default); use --polarity bright for maps with protein white.

Example:
  disca_pick --i tomo1.mrc tomo2.mrc --o Picks/job010 --particle-diameter 250 --bin 2 --j 2
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from disca_tools.io.mrc import check_angpix, open_volume, read_info
from disca_tools.io.particles import ParticleTable
from disca_tools.io.star import (
    make_tomograms_table,
    read_tomograms,
    write_relion5,
    write_star_blocks,
)
from disca_tools.pick import (
    DEFAULT_MIN_DISTANCE_VOXELS,
    PickParams,
    PickResult,
    TomogramPickJob,
    pick_file,
    results_table,
    tomo_name,
)
from disca_tools.plots.picking import plot_picks
from disca_tools.runtime.cli import CommonOptions, ToolSpec, opt, run_tool
from disca_tools.runtime.errors import UserError, file_error
from disca_tools.runtime.log import logger, progress
from disca_tools.runtime.outputs import check_not_input, prepare_output_dir


@dataclass(kw_only=True)
class Options(CommonOptions):
    i: list[str] = opt(
        "--i", "--input", nargs="+", help="tomogram MRC file(s) or a RELION 5 tomograms.star"
    )
    o: str = opt("--o", "--output-dir", help="output folder")
    particle_diameter: float = opt(
        "--particle-diameter", "--diameter", default=None, type=float, help="particle diameter in Å"
    )
    angpix: float = opt(
        "--angpix", default=None, type=float, help="voxel size in Å (default: MRC header)"
    )
    sigma1: float = opt(
        "--sigma1", default=None, type=float, help="larger Gaussian σ in Å (overrides the diameter)"
    )
    sigma2: float = opt(
        "--sigma2",
        default=None,
        type=float,
        help="smaller Gaussian σ in Å (overrides the diameter)",
    )
    min_distance: float = opt(
        "--min-distance",
        default=None,
        type=float,
        help="minimum distance between picks in Å (default 15 voxels)",
    )
    threshold: float = opt("--threshold", default=None, type=float, help="absolute DoG threshold")
    threshold_sd: float = opt(
        "--threshold-sd",
        default=None,
        type=float,
        help="threshold = DoG mean + this many DoG sd (default 2.5)",
    )
    max_picks: int = opt(
        "--max-picks", default=None, type=int, help="keep at most this many picks per tomogram"
    )
    polarity: str = opt(
        "--polarity", default="dark", choices=["dark", "bright"], help="protein contrast"
    )
    border: float = opt(
        "--border",
        default=None,
        type=float,
        help="exclude picks this close to a face, Å (default: radius)",
    )
    mask: str = opt(
        "--mask", default=None, help="MRC mask (same shape as the tomogram); picks where mask > 0.5"
    )
    bin: int = opt(
        "--bin", default=1, type=int, help="bin the tomogram by this factor before picking"
    )
    relion5: bool = opt(
        "--relion5", default=False, help="also write RELION 5 particles/tomograms/optimisation_set"
    )
    chunk_mb: float = opt(
        "--chunk-mb", default=128.0, type=float, help="memory per block array (MB)"
    )
    plot: bool = opt("--plot", default=True, negatable=True, help="write <tomo>_picks.png")


@dataclass
class _Tomo:
    name: str
    path: str
    angpix: float
    shape_xyz: tuple[int, int, int]
    ts_angpix: float
    binning: float
    size_bin1_xyz: tuple[float, float, float]


def _read_tomograms_star(path: Path, angpix: float | None) -> tuple[list[_Tomo], pd.DataFrame]:
    table = read_tomograms(path)
    if "rlnTomoReconstructedTomogram" not in table.columns:
        raise file_error(path, "no rlnTomoReconstructedTomogram column: no tomogram files to pick")
    tomos = []
    for _, row in table.iterrows():
        f = str(row["rlnTomoReconstructedTomogram"])
        if not Path(f).is_file():
            raise file_error(
                path,
                f"tomogram {f} of {row['rlnTomoName']} not found (paths are relative to the "
                "project directory)",
            )
        info = read_info(f)
        ts = float(row["rlnTomoTiltSeriesPixelSize"])
        b = float(row.get("rlnTomoTomogramBinning", 1) or 1)
        ap = check_angpix(f, info.angpix, angpix if angpix else ts * b)
        sizes = tuple(float(row[c]) for c in ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"))
        tomos.append(_Tomo(str(row["rlnTomoName"]), f, ap, info.shape_xyz, ts, b, sizes))
    return tomos, table


def _collect_inputs(o: Options) -> tuple[list[_Tomo], bool, pd.DataFrame | None]:
    if len(o.i) == 1 and o.i[0].endswith(".star"):
        tomos, table = _read_tomograms_star(Path(o.i[0]), o.angpix)
        return tomos, True, table
    tomos = []
    for f in o.i:
        if f.endswith(".star"):
            raise UserError(f"{f}: give either one tomograms.star or MRC files, not both")
        info = read_info(f)
        ap = check_angpix(f, info.angpix, o.angpix)
        sizes = tuple(float(s) for s in info.shape_xyz)
        tomos.append(_Tomo(tomo_name(f), f, ap, info.shape_xyz, ap, 1.0, sizes))
    names = [t.name for t in tomos]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"{sorted(dup)[0]}: two input tomograms share this name; rename one")
    return tomos, False, None


def _validate(o: Options) -> None:
    if o.particle_diameter is None and (o.sigma1 is None or o.sigma2 is None):
        raise UserError("--particle-diameter: required (or give both --sigma1 and --sigma2)")
    if o.particle_diameter is not None and o.particle_diameter <= 0:
        raise UserError(f"--particle-diameter: must be positive ({o.particle_diameter:g})")
    for name in ("sigma1", "sigma2", "min_distance", "border"):
        v = getattr(o, name)
        if v is not None and v < 0:
            raise UserError(f"--{name.replace('_', '-')}: must not be negative ({v:g})")
    if o.sigma1 is not None and o.sigma2 is not None and o.sigma1 == o.sigma2:
        raise UserError("--sigma1/--sigma2: must differ")
    if o.bin < 1:
        raise UserError(f"--bin: must be a positive integer ({o.bin})")
    if o.chunk_mb <= 1:
        raise UserError(f"--chunk-mb: too small ({o.chunk_mb:g})")
    if o.j < 1:
        raise UserError(f"--j: must be at least 1 ({o.j})")
    if o.mask:
        read_info(o.mask)


def _job(o: Options, t: _Tomo) -> TomogramPickJob:
    # placeholder sigmas; resolve_params turns the Å options into voxels of the picking volume
    base = PickParams(
        sigma_small=1.0,
        sigma_large=1.6,
        polarity=o.polarity,
        min_distance=DEFAULT_MIN_DISTANCE_VOXELS,
        threshold=o.threshold,
        threshold_sd=o.threshold_sd
        if (o.threshold_sd is not None or o.threshold is not None or o.max_picks)
        else 2.5,
        max_picks=o.max_picks,
        border=0.0,
        binning=o.bin,
        chunk_voxels=int(o.chunk_mb * 1024 * 1024 / 4),
    )
    border = (
        o.border
        if o.border is not None
        else (o.particle_diameter / 2 if o.particle_diameter else 0.0)
    )
    return TomogramPickJob(
        name=t.name,
        path=t.path,
        angpix=t.angpix,
        params=base,
        diameter_angst=o.particle_diameter,
        sigma1_angst=o.sigma1,
        sigma2_angst=o.sigma2,
        min_distance_angst=o.min_distance,
        border_angst=border,
        mask=o.mask,
    )


def _pick_all(
    o: Options, jobs: list[TomogramPickJob]
) -> list[tuple[PickResult, PickParams, float]]:
    if o.j > 1 and len(jobs) > 1:
        # spawn: never fork a process that may hold TensorFlow/BLAS threads
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(o.j, len(jobs)), mp_context=ctx) as pool:
            futures = [pool.submit(pick_file, j) for j in jobs]
            return [
                f.result()
                for f in progress(futures, total=len(futures), desc="tomograms", unit="tomo")
            ]
    return [pick_file(j) for j in jobs]


def run(o: Options) -> dict:
    _validate(o)
    tomos, from_star, global_table = _collect_inputs(o)
    relion5 = o.relion5 or from_star
    products = ["coordinates.star"]
    if relion5:
        products += ["particles.star", "tomograms.star", "optimisation_set.star"]
    if o.plot:
        products += [f"{t.name}_picks.png" for t in tomos]
    out = Path(o.o)
    check_not_input([out / p for p in products], [t.path for t in tomos] + list(o.i))
    prepare_output_dir(out, o.overwrite, products)

    jobs = [_job(o, t) for t in tomos]
    results = _pick_all(o, jobs)

    frames = []
    summary = {}
    for t, (res, params, angpix) in zip(tomos, results, strict=True):
        if len(res) == 0:
            logger.warning(
                "%s: no picks above threshold %.4g (DoG sd %.4g)",
                t.path,
                res.threshold,
                res.dog_std,
            )
        else:
            logger.info(
                "%s: %d picks (threshold %.4g, %d local maxima)",
                t.name,
                len(res),
                res.threshold,
                res.n_candidates,
            )
        frames.append(pd.DataFrame(results_table(t.name, t.path, res)))
        summary[t.name] = {
            "picks": len(res),
            "threshold": res.threshold,
            "local_maxima": res.n_candidates,
            "dog_mean": res.dog_mean,
            "dog_sd": res.dog_std,
            "sigma_small_vox": params.sigma_small,
            "sigma_large_vox": params.sigma_large,
            "min_distance_vox": params.min_distance,
            "binning": params.binning,
            "angpix": angpix,
        }
        if o.plot:
            data, _ = open_volume(t.path)
            radius = (
                (o.particle_diameter / 2 / angpix)
                if o.particle_diameter
                else 3 * params.sigma_large * o.bin
            )
            plot_picks(
                out / f"{t.name}_picks.png",
                data,
                res.coords_xyz,
                radius,
                title=f"{t.name}: {len(res)} picks",
                polarity=o.polarity,
            )
    coords = pd.concat(frames, ignore_index=True)
    total = len(coords)
    if total == 0:
        logger.warning("no picks in any tomogram: writing an empty coordinates.star")
    write_star_blocks(out / "coordinates.star", {"particles": coords}, overwrite=True)
    if relion5:
        _write_relion5(out, tomos, coords, global_table)
    return {"n_picks": total, "tomograms": summary}


def _write_relion5(
    out: Path, tomos: list[_Tomo], coords: pd.DataFrame, global_table: pd.DataFrame | None
) -> None:
    """particles.star (centred Å), tomograms.star and optimisation_set.star for RELION 5."""
    common = tomos[0].angpix
    df = coords.copy()
    scale = df["rlnTomoName"].map({t.name: t.angpix / common for t in tomos}).to_numpy(float)
    for c in ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"):
        df[c] = df[c].to_numpy(float) * scale
    if global_table is not None:
        tomo_table = global_table
    else:
        tomo_table = make_tomograms_table(
            [t.name for t in tomos],
            [t.shape_xyz for t in tomos],
            [t.angpix for t in tomos],
            files=[t.path for t in tomos],
            binning=1.0,
        )
    table = ParticleTable(df, coord_angpix=common, tomograms=tomo_table, flavour="relion5")
    write_relion5(out / "particles.star", table, overwrite=True)


def _nodes(o: Options) -> list[tuple[str, str]]:
    nodes = [(f"{o.o}/coordinates.star", "coordinates")]
    if o.relion5 or (len(o.i) == 1 and o.i[0].endswith(".star")):
        nodes += [
            (f"{o.o}/particles.star", "particles"),
            (f"{o.o}/optimisation_set.star", "optimisation_set"),
        ]
    return nodes


SPEC = ToolSpec(
    name="disca_pick",
    doc=__doc__,
    options=Options,
    run=run,
    output_dir=lambda o: o.o,
    relion_inputs={"in_mics": "i", "in_parts": "i", "in_mask": "mask"},
    relion_nodes=_nodes,
)


def main(argv: list[str] | None = None) -> int:
    return run_tool(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
