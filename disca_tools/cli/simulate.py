"""disca_simulate: simulated subtomograms or tomograms of real structures, with ground truth.

  disca_simulate subtomograms --o DIR --structures 4v4r 1bxn 3j9i --n-per-class 100 --box 24
      --angpix 12 --snr 0.1 --tilt-range 60 --seed 0
  disca_simulate tomogram --o DIR --structures 4v4r 1bxn --shape 512,512,128 --n-particles 200
      --angpix 10 --snr 0.1 --tilt-range 60 --seed 0

The mode may also be given as --mode subtomograms|tomogram (as a RELION External job passes it).
Structures are shipped names (1bxn 1qvr 1s3x 1u6g 2cg9 3cf3 3d2f 3gl1 3h84 3j9i 3qm1 4cr2 4v4r 4v94,
see disca_tools/simulate/structures/NOTICE.md) or MRC paths, separated by spaces or commas.
Image formation (the DISCA paper's protocol): uniform random orientation, small random shift
(subtomograms), CTF (--voltage, --cs, --amplitude-contrast, --defocus; −5 µm = 5 µm underfocus),
missing wedge from --tilt-range about the y axis, Gaussian noise at SNR = signal variance / noise
variance (--snr inf: no noise), limited to the sampled Fourier region as back-projected noise is
(--white-noise: white 3D noise). That SNR is the variance ratio of the volumes written. For
subtomograms, --snr-convention aitom follows instead the simulator behind the DISCA paper's Table S1
(AITom's do_reconstruction): each particle's noise level is set from its own filtered density and
the nominal SNR before signal and noise are low-passed, so the written volumes have a higher
variance ratio (logged and saved as effective_snr in run.json); aitom-set uses one noise level for
the whole set, as a real tomogram has. AITom's CTF has no amplitude contrast (--amplitude-contrast 0).

subtomograms writes, with paths relative to the current directory (run it from the RELION project):
  DIR/Subtomograms/sub_NNNNNN.mrc   one float32 volume per particle, protein positive, not normalised
  DIR/particles.star                RELION 3.1 (optics + particles): rlnImageName, rlnCtfImage,
                                    ground-truth rlnClassNumber (1-based), rlnAngleRot/Tilt/Psi and
                                    rlnOriginX/Y/ZAngst (= −shift · angpix; particle centre =
                                    coordinate − origin)
  DIR/ctf.mrc                       the 3D CTF × wedge weight, cubic with the origin at N/2
  DIR/subtomograms.npy + DIR/subtomograms_names.txt
                                    the same volumes as one (N,S,S,S) array (float16 with --float16)
                                    and their rlnImageName, one per line, in array order
  DIR/classes.tsv, DIR/references/<name>.mrc (noise-free, un-rotated, at the output sampling)

tomogram writes DIR/tomogram.mrc (protein DARK, as real tomograms are), DIR/tomogram_noisefree.mrc,
DIR/particles.star (RELION 3.1 ground truth: rlnMicrographName, rlnCoordinateX/Y/Z in pixels, class,
angles), DIR/relion5/{particles,tomograms,optimisation_set}.star and DIR/classes.tsv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.mrc import read_info, write_volume
from ..io.particles import ParticleTable
from ..io.star import default_optics, make_tomograms_table, write_relion5, write_relion31
from ..io.store import NAMES_FILE, STORE_FILE
from ..runtime.cli import CommonOptions, ToolSpec, opt, run_tool
from ..runtime.errors import UserError
from ..runtime.log import logger, progress
from ..runtime.outputs import (
    atomic_path,
    check_not_input,
    prepare_output_dir,
    write_text_atomic,
)
from ..simulate.imaging import SNR_CONVENTIONS, Imaging, ctf_wedge_weight
from ..simulate.structures import structure_label, structure_path
from ..simulate.subtomograms import SubtomogramSet, simulate_subtomogram_set
from ..simulate.tomogram import TomogramSimulation, simulate_tomogram

MODES = ("subtomograms", "tomogram")


@dataclass(kw_only=True)
class Options(CommonOptions):
    mode: str | None = opt(
        "mode",
        nargs="?",
        default=None,
        choices=list(MODES),
        help="what to simulate: subtomograms or tomogram",
    )
    mode_option: str | None = opt(
        "--mode",
        default=None,
        choices=list(MODES),
        help="the same as the positional mode (for RELION External jobs, which pass --label value)",
    )
    o: str = opt("--o", "--output-dir", help="output folder")
    structures: list[str] = opt(
        "--structures", nargs="+", help="shipped structure names or MRC paths (spaces or commas)"
    )
    angpix: float = opt("--angpix", default=10.0, help="voxel size of the output in Å")
    snr: float = opt("--snr", default=0.1, help="signal variance / noise variance; inf = no noise")
    tilt_range: float = opt(
        "--tilt-range", default=60.0, help="tilt range ± degrees (>= 90: no wedge)"
    )
    seed: int = opt("--seed", default=0, help="random seed")
    voltage: float = opt("--voltage", default=300.0, help="acceleration voltage in kV")
    cs: float = opt("--cs", default=2.7, help="spherical aberration in mm")
    amplitude_contrast: float = opt("--amplitude-contrast", default=0.07, help="amplitude contrast")
    defocus: float = opt("--defocus", default=-5.0, help="defocus in µm; negative = underfocus")
    no_ctf: bool = opt(
        "--no-ctf", default=False, help="leave out the CTF (the wedge still applies)"
    )
    white_noise: bool = opt(
        "--white-noise",
        default=False,
        help="white 3D noise (default: noise limited to the sampled region, as back-projected noise is)",
    )
    snr_convention: str = opt(
        "--snr-convention",
        default="volume",
        choices=list(SNR_CONVENTIONS),
        help="subtomograms: what --snr means: 'volume' (variance ratio of the output), 'aitom' "
        "(the DISCA paper's simulator: nominal SNR per particle, then a low-pass; see the module "
        "help) or 'aitom-set' (the same with one noise level for the set)",
    )
    box: int = opt(
        "--box",
        "--box-size",
        default=24,
        help="subtomogram box in voxels (tomogram: optics box size)",
    )
    n_per_class: int = opt(
        "--n-per-class", default=100, help="subtomograms: particles per structure"
    )
    max_shift: float = opt(
        "--max-shift", default=1.0, help="subtomograms: max random shift per axis (voxels)"
    )
    float16: bool = opt(
        "--float16",
        default=False,
        help="subtomograms: store subtomograms.npy as float16 (.mrc stay float32)",
    )
    shape: str = opt("--shape", default="512,512,128", help="tomogram: size X,Y,Z in voxels")
    n_particles: int = opt("--n-particles", default=100, help="tomogram: number of particles")
    min_separation: float = opt(
        "--min-separation",
        default=1.0,
        help="tomogram: min centre distance as a factor of r_i + r_j",
    )


SUB_PRODUCTS = [
    "particles.star",
    "ctf.mrc",
    "classes.tsv",
    STORE_FILE,
    NAMES_FILE,
    "Subtomograms",
    "references",
]
TOMO_PRODUCTS = [
    "tomogram.mrc",
    "tomogram_noisefree.mrc",
    "particles.star",
    "classes.tsv",
    "relion5",
]


def _structures(o: Options) -> list[str]:
    names = [s for item in o.structures for s in item.split(",") if s.strip()]
    if not names:
        raise UserError("--structures: give at least one structure name or MRC path")
    for s in names:
        path = structure_path(s)  # UserError naming it if unknown
        if read_info(path).angpix <= 0:  # UserError if not a readable MRC
            raise UserError(f"{path}: header has no voxel size; cannot resample the structure")
    return names


def _imaging(o: Options) -> Imaging:
    try:
        return Imaging(
            voltage_kv=o.voltage,
            cs_mm=o.cs,
            amplitude_contrast=o.amplitude_contrast,
            defocus_um=o.defocus,
            tilt_range_deg=o.tilt_range,
            apply_ctf=not o.no_ctf,
            noise_in_wedge=not o.white_noise,
        )
    except ValueError as exc:
        raise UserError(f"imaging options: {exc}") from None


def _validate_common(o: Options) -> None:
    if not o.angpix > 0:
        raise UserError(f"--angpix: must be positive, got {o.angpix}")
    if not (o.snr > 0 or math.isinf(o.snr)) or math.isnan(o.snr):
        raise UserError(f"--snr: must be positive or inf, got {o.snr}")


def _classes_tsv(path: Path, structures: list[str], names: list[str]) -> None:
    lines = ["class_number\tclass_name\tsource"]
    lines += [f"{i + 1}\t{n}\t{s}" for i, (n, s) in enumerate(zip(names, structures, strict=True))]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _virtual_coords(n: int, box: int) -> np.ndarray:
    """Distinct dummy positions (a grid of boxes) for particles that come from no tomogram."""
    i = np.arange(n)
    return np.stack(
        [(i % 32) * box + box // 2, (i // 32 % 32) * box + box // 2, (i // 1024) * box + box // 2],
        1,
    )


def subtomogram_star_table(
    sim: SubtomogramSet, out_dir: str, image_names: list[str], imaging: Imaging
) -> ParticleTable:
    """The RELION 3.1 particle table of a simulated subtomogram set (ground truth)."""
    n, box = len(sim), sim.box
    coords = _virtual_coords(n, box)
    origins = -sim.shifts_xyz * sim.angpix
    df = pd.DataFrame(
        {
            "rlnMicrographName": [f"{out_dir}/simulated.mrc"] * n,
            "rlnCoordinateX": coords[:, 0].astype(float),
            "rlnCoordinateY": coords[:, 1].astype(float),
            "rlnCoordinateZ": coords[:, 2].astype(float),
            "rlnImageName": image_names,
            "rlnCtfImage": [f"{out_dir}/ctf.mrc"] * n,
            "rlnAngleRot": sim.angles_deg[:, 0],
            "rlnAngleTilt": sim.angles_deg[:, 1],
            "rlnAnglePsi": sim.angles_deg[:, 2],
            "rlnOriginXAngst": origins[:, 0],
            "rlnOriginYAngst": origins[:, 1],
            "rlnOriginZAngst": origins[:, 2],
            "rlnClassNumber": sim.labels.astype(np.int64) + 1,
            "rlnRandomSubset": (np.arange(n) % 2 + 1).astype(np.int64),
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        }
    )
    optics = default_optics(
        sim.angpix, box, imaging.voltage_kv, imaging.cs_mm, imaging.amplitude_contrast
    )
    return ParticleTable(df, coord_angpix=sim.angpix, optics=optics, flavour="relion31")


def run_subtomograms(o: Options) -> dict:
    structures = _structures(o)
    if o.box < 8:
        raise UserError(f"--box: must be at least 8, got {o.box}")
    if o.n_per_class < 1:
        raise UserError(f"--n-per-class: must be at least 1, got {o.n_per_class}")
    if o.snr_convention != "volume" and o.white_noise:
        raise UserError(
            f"--white-noise: not available with --snr-convention {o.snr_convention} "
            "(its noise is filtered)"
        )
    imaging = _imaging(o)
    base = Path(o.o).as_posix()  # as written in STAR files: relative to the project dir (cwd)
    out = prepare_output_dir(o.o, o.overwrite, SUB_PRODUCTS)
    check_not_input(
        [out / "references" / f"{structure_label(s)}.mrc" for s in structures],
        [structure_path(s) for s in structures],
    )
    sim = simulate_subtomogram_set(
        structures,
        o.n_per_class,
        o.box,
        o.angpix,
        o.snr,
        imaging,
        o.seed,
        max_shift_px=o.max_shift,
        snr_convention=o.snr_convention,
    )
    if o.snr_convention != "volume":
        logger.info(
            "SNR %g (%s convention) = variance ratio %.4g in the written volumes",
            o.snr, o.snr_convention, sim.effective_snr,
        )  # fmt: skip
    n = len(sim)
    names = [f"{base}/Subtomograms/sub_{i + 1:06d}.mrc" for i in range(n)]
    sub_dir = out / "Subtomograms"
    sub_dir.mkdir(exist_ok=True)
    for i in progress(range(n), total=n, desc="write subtomograms", unit="file"):
        write_volume(sub_dir / f"sub_{i + 1:06d}.mrc", sim.volumes[i], o.angpix, overwrite=True)
    for stale in sub_dir.glob("sub_*.mrc"):  # left by an earlier, larger run (--overwrite)
        if stale.name[4:10].isdigit() and int(stale.name[4:10]) > n:
            stale.unlink()
    store = out / STORE_FILE
    with atomic_path(store) as tmp, open(tmp, "wb") as fh:
        np.save(fh, sim.volumes.astype(np.float16 if o.float16 else np.float32, copy=False))
    write_text_atomic(out / NAMES_FILE, "\n".join(names) + "\n")
    write_volume(
        out / "ctf.mrc", ctf_wedge_weight((o.box,) * 3, o.angpix, imaging), o.angpix, overwrite=True
    )
    for name, ref in sim.references.items():
        write_volume(out / "references" / f"{name}.mrc", ref, o.angpix, overwrite=True)
    _classes_tsv(out / "classes.tsv", structures, sim.class_names)
    write_relion31(
        out / "particles.star", subtomogram_star_table(sim, base, names, imaging), overwrite=True
    )
    logger.info("wrote %d subtomograms of %d classes to %s", n, len(structures), out)
    return {
        "n_particles": n,
        "classes": sim.class_names,
        "noise_sigma": sim.noise_sigma,
        "signal_variance": sim.signal_variance,
        "snr_convention": sim.snr_convention,
        "effective_snr": sim.effective_snr,
    }


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 8:
        raise UserError(f"--shape: expected X,Y,Z (each >= 8), got {text!r}")
    return parts  # type: ignore[return-value]


def tomogram_star_table(
    sim: TomogramSimulation, tomogram_path: str, box: int, imaging: Imaging
) -> ParticleTable:
    """The RELION 3.1 ground-truth particle table of a simulated tomogram."""
    p = sim.particles
    df = pd.DataFrame(
        {
            "rlnMicrographName": [tomogram_path] * len(p),
            "rlnCoordinateX": p["x_px"].to_numpy(float),
            "rlnCoordinateY": p["y_px"].to_numpy(float),
            "rlnCoordinateZ": p["z_px"].to_numpy(float),
            "rlnAngleRot": p["rot"].to_numpy(float),
            "rlnAngleTilt": p["tilt"].to_numpy(float),
            "rlnAnglePsi": p["psi"].to_numpy(float),
            "rlnClassNumber": p["class_number"].to_numpy(np.int64),
            "rlnOpticsGroup": np.ones(len(p), dtype=np.int64),
        }
    )
    optics = default_optics(
        sim.angpix, box, imaging.voltage_kv, imaging.cs_mm, imaging.amplitude_contrast
    )
    return ParticleTable(df, coord_angpix=sim.angpix, optics=optics, flavour="relion31")


def _write_relion5(
    out: Path,
    table: ParticleTable,
    shape_xyz: tuple[int, int, int],
    angpix: float,
    imaging: Imaging,
) -> None:
    """RELION 5 ground truth: relion5/particles.star + tomograms.star + optimisation_set.star.

    The tomogram is its own bin-1 "tilt series" (tilt-series pixel = ``angpix``, binning 1).
    """
    tomo_file = str(table.particles["rlnMicrographName"].iloc[0])
    name = Path(tomo_file).stem
    tomograms = make_tomograms_table(
        [name],
        [list(shape_xyz)],
        angpix,
        files=[tomo_file],
        binning=1.0,
        voltage_kv=imaging.voltage_kv,
        cs_mm=imaging.cs_mm,
        amplitude_contrast=imaging.amplitude_contrast,
    )
    df = table.particles.drop(columns=["rlnOpticsGroup"]).copy()
    df["rlnTomoName"] = name
    t5 = ParticleTable(df, coord_angpix=angpix, optics=None, tomograms=tomograms, flavour="relion5")
    write_relion5(out / "relion5" / "particles.star", t5, overwrite=True)


def run_tomogram(o: Options) -> dict:
    structures = _structures(o)
    shape = _parse_shape(o.shape)
    if o.n_particles < 0:
        raise UserError(f"--n-particles: must be >= 0, got {o.n_particles}")
    if o.snr_convention != "volume":
        raise UserError("--snr-convention: only 'volume' is available for tomograms")
    imaging = _imaging(o)
    out = prepare_output_dir(o.o, o.overwrite, TOMO_PRODUCTS)
    sim = simulate_tomogram(
        structures, shape, o.n_particles, o.angpix, o.snr, imaging, o.seed, o.min_separation
    )
    tomo_path = f"{Path(o.o).as_posix()}/tomogram.mrc"
    write_volume(out / "tomogram.mrc", sim.volume_zyx, o.angpix, overwrite=True)
    write_volume(out / "tomogram_noisefree.mrc", sim.clean_zyx, o.angpix, overwrite=True)
    table = tomogram_star_table(sim, tomo_path, o.box, imaging)
    write_relion31(out / "particles.star", table, overwrite=True)
    _write_relion5(out, table, shape, o.angpix, imaging)
    _classes_tsv(out / "classes.tsv", structures, sim.class_names)
    logger.info("wrote a %dx%dx%d tomogram with %d particles to %s", *shape, o.n_particles, out)
    return {
        "n_particles": int(o.n_particles),
        "classes": sim.class_names,
        "radii_px": sim.radii_px,
        "noise_sigma": sim.noise_sigma,
        "signal_variance": sim.signal_variance,
    }


def run(o: Options) -> dict:
    if o.mode and o.mode_option and o.mode != o.mode_option:
        raise UserError(f"mode: {o.mode} and --mode {o.mode_option} disagree")
    mode = o.mode or o.mode_option
    if mode is None:
        raise UserError("mode: say what to simulate: subtomograms or tomogram")
    _validate_common(o)
    return run_subtomograms(o) if mode == "subtomograms" else run_tomogram(o)


SPEC = ToolSpec(
    name="disca_simulate",
    doc=__doc__,
    options=Options,
    run=run,
    output_dir=lambda o: o.o,
    relion_nodes=lambda o: [(f"{o.o}/particles.star", "particles")],
)


def main(argv: list[str] | None = None) -> int:
    return run_tool(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
