"""disca_classify3d: refine DISCA's classes by 3D classification with the pose marginalised.

  disca_classify3d --i Cluster/job010/clusters.star --o Class3D/job012/
  disca_classify3d --i clusters.star --o class3d --rotations 3000 --iter 15 --max-tilt-deg 40

Starts from the classes of --i (rlnClassNumber, e.g. disca_cluster's clusters.star) and runs a
multi-reference expectation-maximisation over uniform random rotations (RELION Class3D's model,
with the missing wedge; disca_tools.cluster.classify3d): the first --hold-iter iterations align
each class's members to their class's reference without moving them, then particles may change
class. The number of classes stays that of the input (classes that empty are dropped). Each
particle is centred on the input's rlnOriginX/Y/ZAngst where given; with --max-shift-px its
centre is also searched within that many voxels (off by default: on simulated data it lowered
the accuracy reached from DISCA's classes, benchmarks/ACCURACY.md). With
--split-merge-rounds N it then tries, up to N times, merging the two classes whose maps are most
alike after alignment while splitting another, and keeps a trial when its held-out
log-likelihood (each half of the particles scored against maps made from the other half) beats
the classification continued as long by more than two standard errors (--split-merge-judge
likelihood: when the classification's own log-likelihood rises, which with few particles per
class can favour a wrong trial; benchmarks/ACCURACY.md, sessions 34–35: at ±60°/SNR 0.01 it
undid DISCA's merge of two structures; each round runs 1 + pairs × (classes − 2) trials of 15
iterations). One missing wedge for all particles and no CTF: a starting point for RELION, not a
refinement.

Any iteration of disca_cluster can be the start: Cluster/jobNNN/iterations/run_itNNN_clusters.star.
Iteration 0 (with --init invariants, the rotation-invariant descriptors' clusters before any
training) does not depend on how the network trains. On simulated data at SNR 0.03 and above,
started from it the classification came within 0.2 points of the start from the reported
iteration, and beat it by 14 points where that iteration had merged two structures; at SNR 0.01
iteration 0 held too few classes (benchmarks/ACCURACY.md, sessions 38–39).

Writes, in --o:
  clusters.star     the input table with rlnClassNumber (1-based) and rlnMaxValueProbDistribution
                    replaced; rlnAngleRot/Tilt/Psi of the most probable pose and
                    rlnOriginX/Y/ZAngst of the centre found when the input has no angles (a
                    starting pose for RELION, relative to the class's map)
  class_NNN.mrc     each class's map, aligned and wedge-corrected (the input's pixel size)
  split_merge.tsv   with --split-merge-rounds: one row per trial (round, the merged pair and the
                    split class as slots 1..K of that round's classification, their maps'
                    aligned similarity, the trial's and the baseline's log-likelihood and
                    score (the judge's: held-out log-likelihood or log-likelihood), the
                    standard error of the held-out gain, the classes kept, accepted 1 or 0)
  history.tsv       per iteration: held, fraction of labels changed, mean posterior, the mean
                    log-likelihood per particle (up to a constant set by the data: compare runs
                    on the same particles and settings; higher is better), the mean change of
                    the particles' centres (voxels), sizes, seconds
  note.txt, run.json  the command, options, version and seed

Memory: fixed arrays of classes × rotations × (box³ + the voxels in the sphere) × 4 bytes (0.36 GiB at
5 classes, 1,000 rotations, 24³) plus one batch; measured peak resident memory 1.9–2.1 GB from 500 to
4,000 particles (TensorFlow included), time per iteration 3.8 s + 1.9 s per 1,000 particles on a
2-core CPU (benchmarks/bench_classify3d.py). The time grows linearly with particles, classes and
rotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.mrc import write_volume
from ..io.particles import ANGLES, CLASS, ORIGINS_ANGST, POSTERIOR, origins_px
from ..io.star import read_particles, write_particles
from ..runtime.cli import CommonOptions, ToolSpec, opt, run_tool
from ..runtime.errors import file_error
from ..runtime.log import logger
from ..runtime.outputs import check_not_input, prepare_output_dir, write_text_atomic

SUBTOMOGRAM_ANGLES = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")


@dataclass(kw_only=True)
class Options(CommonOptions):
    i: str = opt("--i", "--input", help="clustered particle STAR file (rlnClassNumber)")
    o: str = opt("--o", "--output-dir", help="output folder")
    rotations: int = opt("--rotations", default=1000, help="uniform random rotations searched")
    iterations: int = opt("--iter", "--iterations", default=40, help="EM iterations at most")
    hold_iterations: int = opt(
        "--hold-iter",
        "--hold-iterations",
        default=None,
        help="first iterations that align without changing any particle's class (default: 8, "
        "or --iter − 1 when that is fewer)",
    )
    temperature: float = opt(
        "--temperature", default=5.0, help="divides the log-likelihoods (1: the plain likelihood)"
    )
    lowpass_angstrom: float = opt(
        "--lowpass-angstrom",
        default=None,
        help="low-pass cut-off in Å (default: 3 × the pixel size)",
    )
    max_tilt_deg: float = opt(
        "--max-tilt-deg",
        default=60.0,
        help="the tilt series' largest tilt (a symmetric ± range); 90 or more: no missing wedge",
    )
    max_shift_px: float = opt(
        "--max-shift-px",
        default=0.0,
        help="search each particle's centre within this many voxels of its box centre (or of "
        "the input's origins) along each axis; 0: no translation search",
    )
    split_merge_rounds: int = opt(
        "--split-merge-rounds",
        default=0,
        help="after the classification, up to this many rounds of split-and-merge trials (merge "
        "the two most alike maps, split another class; kept when --split-merge-judge says it "
        "beats the classification); 0: none",
    )
    split_merge_judge: str = opt(
        "--split-merge-judge",
        default="held-out",
        choices=["held-out", "likelihood"],
        help="what ranks split-and-merge trials: held-out (half the particles scored against "
        "maps of the other half; a trial must gain more than 2 standard errors) or likelihood "
        "(the classification's own log-likelihood)",
    )
    split_merge_pairs: int = opt(
        "--split-merge-pairs", default=2, help="most alike pairs of maps tried as merges per round"
    )
    tilt_axis: str = opt("--tilt-axis", default="y", choices=["x", "y"], help="tilt axis")
    batch_size: int = opt("--batch-size", default=256, help="subtomograms per batch")
    seed: int = opt("--seed", default=0, help="random seed (the rotations)")
    angpix: float = opt(
        "--angpix", default=None, help="pixel size in Å where the STAR file does not state it"
    )


def _class_labels(table, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The input's class numbers (sorted, unique) and each particle's index into them."""
    if CLASS not in table.particles.columns:
        raise file_error(path, f"no {CLASS} column: the starting classes (run disca_cluster first)")
    raw = table.particles[CLASS].to_numpy()
    try:
        classes = raw.astype(np.int64)
    except (TypeError, ValueError):
        raise file_error(path, f"{CLASS} is not an integer column") from None
    if (classes != raw.astype(np.float64)).any() or classes.min() < 1:
        raise file_error(path, f"{CLASS} must hold class numbers ≥ 1")
    originals, labels = np.unique(classes, return_inverse=True)
    return originals, labels


def _tsv(records: list[dict]) -> str:
    """Rows of dicts with the same keys as a tab-separated table: booleans as 0/1, lists
    comma-separated, None empty."""
    lines = ["\t".join(records[0])]
    for record in records:
        values = [
            int(v) if isinstance(v, bool) else "" if v is None else v for v in record.values()
        ]
        lines.append(
            "\t".join(",".join(map(str, v)) if isinstance(v, list) else str(v) for v in values)
        )
    return "\n".join(lines) + "\n"


def run(o: Options) -> dict:
    from ..cluster.classify3d import ClassifyConfig, classify_with_poses, split_and_merge
    from ..model.backend import import_tensorflow
    from ..model.data import gather, load_particle_volumes

    table = read_particles(o.i, angpix=o.angpix)
    if len(table) == 0:
        raise file_error(o.i, "no particles")
    originals, labels = _class_labels(table, o.i)
    angpix = table.image_angpix() or o.angpix
    if o.lowpass_angstrom is not None and not angpix:
        raise file_error(o.i, "no pixel size for --lowpass-angstrom: pass --angpix")
    lowpass_px = (
        ClassifyConfig.lowpass_px if o.lowpass_angstrom is None else o.lowpass_angstrom / angpix
    )
    config = ClassifyConfig(
        rotations=o.rotations,
        iterations=o.iterations,
        hold_iterations=(
            min(ClassifyConfig.hold_iterations, max(o.iterations - 1, 0))
            if o.hold_iterations is None
            else o.hold_iterations
        ),
        temperature=o.temperature,
        max_shift_px=o.max_shift_px,
        lowpass_px=lowpass_px,
        max_tilt_deg=o.max_tilt_deg,
        tilt_axis=o.tilt_axis,
        batch_size=o.batch_size,
        seed=o.seed,
        split_merge_rounds=o.split_merge_rounds,
        split_merge_pairs=o.split_merge_pairs,
        split_merge_judge=o.split_merge_judge,
    )
    config.check()
    if all(c in table.particles.columns for c in ORIGINS_ANGST) and not angpix:
        raise file_error(o.i, "rlnOriginX/Y/ZAngst need a pixel size: pass --angpix")
    # RELION's origin is minus the particle centre's offset from the box centre
    origins = origins_px(table.particles, angpix) if angpix else None
    offsets = None if origins is None else -origins
    out = Path(o.o)
    products = ["clusters.star", "history.tsv", "split_merge.tsv"] + [
        f"class_{c:03d}.mrc" for c in originals
    ]
    check_not_input([out / p for p in products], [o.i])
    prepare_output_dir(out, o.overwrite, products)
    store, rows = load_particle_volumes(table, o.i, out)
    import_tensorflow()  # the rotations run in TensorFlow; its start-up lines kept off the terminal

    def read(start: int, stop: int) -> np.ndarray:
        return gather(store, rows[start:stop])

    result = classify_with_poses(read, len(table), labels, config, offsets=offsets)
    result = split_and_merge(read, len(table), result, config, offsets=offsets)

    df = table.particles.copy()
    used = originals[result.classes]  # the input's class numbers of the classes kept
    df[CLASS] = used[result.labels]
    df[POSTERIOR] = result.posterior.astype(np.float64)
    has_angles = any(c in df.columns for c in (*ANGLES, *SUBTOMOGRAM_ANGLES))
    if has_angles:
        logger.warning(
            "%s already has particle angles: kept; the poses found here are not written", o.i
        )
    else:
        from ..geometry import matrix_to_euler

        euler = matrix_to_euler(result.poses.astype(np.float64))
        for j, name in enumerate(ANGLES):
            df[name] = euler[:, j]
        if angpix and (config.max_shift_px > 0 or offsets is not None):
            for j, name in enumerate(ORIGINS_ANGST):
                df[name] = -result.offsets[:, j] * angpix
    write_particles(out / "clusters.star", table.with_particles(df), overwrite=True)
    for c, ref in zip(used, result.references, strict=True):
        write_volume(out / f"class_{int(c):03d}.mrc", ref, angpix or 1.0, overwrite=True)
    for c in set(originals.tolist()) - set(used.tolist()):  # an emptied class: no stale map
        (out / f"class_{int(c):03d}.mrc").unlink(missing_ok=True)
    write_text_atomic(out / "history.tsv", _tsv(result.history))
    if result.moves:  # one row per trial; classes as slots 1..K of that round's classification
        write_text_atomic(out / "split_merge.tsv", _tsv(result.moves))
    else:
        (out / "split_merge.tsv").unlink(missing_ok=True)
    sizes = {int(c): int((df[CLASS] == c).sum()) for c in used}
    moved = float(np.mean(df[CLASS].to_numpy() != table.particles[CLASS].to_numpy()))
    logger.info(
        "%d classes (%s); %.1f %% of particles changed class; %s", len(used),
        ", ".join(f"{c}: {n}" for c, n in sizes.items()), 100 * moved, out / "clusters.star",
    )  # fmt: skip
    o._relion_nodes = [(str(out / "clusters.star"), "particles")] + [
        (str(out / f"class_{int(c):03d}.mrc"), "map") for c in used
    ]
    return {
        "n_particles": len(df),
        "classes_in": [int(c) for c in originals],
        "classes_out": sizes,
        "changed_class_fraction": round(moved, 5),
        "iterations_run": len(result.history),
        "converged": result.converged,
        "lowpass_px": lowpass_px,
        "history": result.history,
        "split_merge": result.moves,
    }


SPEC = ToolSpec(
    name="disca_classify3d",
    doc=__doc__,
    options=Options,
    run=run,
    output_dir=lambda o: o.o,
    relion_inputs={"in_parts": "i"},
)


def main(argv: list[str] | None = None) -> int:
    return run_tool(SPEC, argv)
