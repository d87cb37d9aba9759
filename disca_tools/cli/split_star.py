"""disca_split_star: one RELION particle STAR file per class, class averages and the next RELION steps.

  disca_split_star --i Cluster/job010/clusters.star --o Split/job011/
  disca_split_star --i clusters.star --o split --classes 1,4 --merge 2+5 --min-probability 0.8

Writes, in --o (run from the RELION project directory: paths inside STAR files stay relative to it):
  class_NNN.star            the particles of class NNN, every block, optics group and column kept, in
                            the input's flavour (RELION 3.1 legacy in → legacy out; RELION 5 in → RELION
                            5 particles out, plus class_NNN_optimisation_set.star naming the tomograms)
  class_NNN_average.mrc     unaligned average of the class's subtomograms: a low-resolution starting
                            reference for relion_refine (from the fast store subtomograms.npy beside the
                            STAR, or the stores of the extractions a merged STAR combines, else
                            from the rlnImageName .mrc files)
  classes.tsv               class, merged_from, size, size_before_probability_cut, mean_posterior, status
  next_steps.txt            the RELION commands to run next (also logged)

Selection: --min-probability drops particles whose rlnMaxValueProbDistribution is lower; --merge 2+5
makes classes 2 and 5 one class numbered 2; then --classes keeps, --exclude drops, --min-size drops
small classes. Merged classes have rlnClassNumber rewritten to the group's number.
As a RELION External job: --in_parts is the clustered STAR; class STARs and averages become nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.mrc import write_volume
from ..io.particles import CTF_IMAGE
from ..io.star import read_star_blocks, write_star_blocks
from ..runtime.cli import CommonOptions, ToolSpec, opt, run_tool
from ..runtime.errors import UserError, file_error, require_file
from ..runtime.log import logger
from ..runtime.outputs import atomic_path, check_not_input, prepare_output_dir, write_text_atomic
from ..split import (
    class_averages,
    locate_averages,
    next_steps,
    parse_class_list,
    parse_merges,
    split_blocks,
)


@dataclass(kw_only=True)
class Options(CommonOptions):
    i: str = opt(
        "--i", "--input", help="clustered particle STAR file (rlnClassNumber, e.g. clusters.star)"
    )
    o: str = opt("--o", "--output-dir", help="output folder")
    classes: str = opt("--classes", default=None, help="only these classes, e.g. 1,4 or 2-5")
    exclude: str = opt("--exclude", default=None, help="drop these classes, e.g. 3,7")
    merge: list[str] = opt("--merge", default=None, nargs="*", help="merge groups, e.g. 2+5 3+7")
    min_size: int = opt("--min-size", default=0, help="drop classes with fewer particles")
    min_probability: float = opt(
        "--min-probability",
        default=0.0,
        help="drop particles with rlnMaxValueProbDistribution below this",
    )
    averages: bool = opt(
        "--averages",
        default=None,
        negatable=True,
        help="write class_NNN_average.mrc (default: when the subtomograms can be found)",
    )
    tomograms: str = opt(
        "--tomograms",
        default=None,
        help="RELION 5 tomograms.star for the optimisation sets (default: found beside --i)",
    )
    particle_diameter: float = opt(
        "--particle-diameter",
        default=None,
        help="Å, for the suggested relion_refine (default: 0.8 × box)",
    )


def _relion5_tomograms(o: Options, blocks_dir: Path) -> tuple[dict, str] | None:
    """The optimisation-set entries to copy and the tomograms file for a RELION 5 input."""
    if o.tomograms:
        require_file(o.tomograms, "tomograms STAR file")
        return {}, o.tomograms
    for cand in sorted(blocks_dir.glob("*optimisation_set*.star")):
        try:
            blocks = read_star_blocks(cand)
        except UserError:
            continue
        for block in blocks.values():
            if isinstance(block, dict) and "rlnTomoTomogramsFile" in block:
                # project-relative as RELION reads it; else relative to the optimisation set
                tf = str(block["rlnTomoTomogramsFile"])
                path = (
                    tf
                    if Path(tf).is_file()
                    else str(cand.parent / tf)
                    if (cand.parent / tf).is_file()
                    else None
                )
                if path is None:
                    continue
                entries = {
                    k: v
                    for k, v in block.items()
                    if k not in ("rlnTomoParticlesFile", "rlnTomoTomogramsFile")
                }
                return entries, path
    cand = blocks_dir / "tomograms.star"
    if cand.is_file():
        return {}, str(cand)
    return None


def run(o: Options) -> dict:
    if o.min_size < 0 or not 0.0 <= o.min_probability <= 1.0:
        raise UserError("--min-size must be ≥ 0 and --min-probability between 0 and 1")
    src = require_file(o.i, "particle STAR file")
    blocks = read_star_blocks(src)
    result = split_blocks(
        blocks,
        classes=parse_class_list(o.classes or None, "--classes"),
        exclude=parse_class_list(o.exclude or None, "--exclude"),
        merges=parse_merges(o.merge or []),
        min_size=o.min_size,
        min_probability=o.min_probability,
        source=src,
    )
    particles = blocks[result.particles_block]
    assert isinstance(particles, pd.DataFrame)
    general = blocks.get("general") if isinstance(blocks.get("general"), dict) else None

    opt_sets: dict[int, str] = {}
    opt_entries: dict = {}
    tomo_file = None
    if result.flavour == "relion5":
        found = _relion5_tomograms(o, src.parent)
        if found is None:
            logger.warning(
                "%s: no tomograms.star found beside it (pass --tomograms); no optimisation sets written",
                src,
            )
        else:
            opt_entries, tomo_file = found

    sources = None
    if o.averages is None or o.averages:
        sources = locate_averages(particles, result.members, src, general)
        if isinstance(sources, str):
            if o.averages:
                raise file_error(src, f"cannot compute class averages: {sources}")
            logger.warning("%s: no class averages (%s)", src, sources)
            sources = None
    do_avg = sources is not None

    out_dir = Path(o.o)
    names = {c: f"class_{c:03d}" for c in result.classes}
    products = ["classes.tsv", "next_steps.txt"]
    for stem in names.values():
        products.append(f"{stem}.star")
        if do_avg:
            products.append(f"{stem}_average.mrc")
        if tomo_file:
            products.append(f"{stem}_optimisation_set.star")
    check_not_input([out_dir / p for p in products], [src, *([o.tomograms] if o.tomograms else [])])
    # compute everything that can fail on the inputs before writing anything
    averages = class_averages(sources, result.members) if sources is not None else {}
    prepare_output_dir(out_dir, o.overwrite, products)

    star_paths = {c: str(out_dir / f"{s}.star") for c, s in names.items()}
    avg_paths: dict[int, str] = {}
    angpix = _image_angpix(blocks)
    for c, blk in result.classes.items():
        write_star_blocks(star_paths[c], blk, overwrite=o.overwrite)
        if c in averages:
            avg_paths[c] = str(out_dir / f"{names[c]}_average.mrc")
            write_volume(avg_paths[c], averages[c], angpix or 1.0, overwrite=o.overwrite)
        if tomo_file:
            opt_sets[c] = str(out_dir / f"{names[c]}_optimisation_set.star")
            entry = {
                "rlnTomoParticlesFile": star_paths[c],
                "rlnTomoTomogramsFile": tomo_file,
                **opt_entries,
            }
            write_star_blocks(opt_sets[c], {"optimisation_set": entry}, overwrite=o.overwrite)

    summary = result.summary.copy()
    with atomic_path(out_dir / "classes.tsv") as tmp:
        summary.to_csv(tmp, sep="\t", index=False, float_format="%.4f", na_rep="nan")
    box = _image_size(blocks)
    diameter = o.particle_diameter or (0.8 * box * angpix if box and angpix else 200.0)
    lines = next_steps(
        star_paths,
        avg_paths,
        result.flavour,
        diameter,
        CTF_IMAGE in particles.columns,
        opt_sets or None,
        max(o.j, 1),
    )
    write_text_atomic(out_dir / "next_steps.txt", "\n".join(lines) + "\n")
    for c in result.classes:
        row = summary.loc[summary["class"] == c].iloc[0]
        logger.info("class %d: %d particles -> %s", c, int(row["size"]), star_paths[c])
    logger.info("next steps (also in %s):", out_dir / "next_steps.txt")
    for line in lines:
        logger.info("  %s", line)

    nodes = [(p, "particles") for p in star_paths.values()] + [
        (p, "map") for p in avg_paths.values()
    ]
    nodes += [(p, "optimisation_set") for p in opt_sets.values()]
    o._relion_nodes = nodes  # the RELION External job's output nodes (runtime.cli.run_tool)
    return {
        "flavour": result.flavour,
        "n_particles_in": int(len(particles)),
        "n_particles_written": int(sum(len(m) for m in result.members.values())),
        "classes_written": sorted(result.classes),
        "averages": bool(avg_paths),
    }


def _image_angpix(blocks: dict) -> float | None:
    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame) and "rlnImagePixelSize" in optics.columns and len(optics):
        return float(optics["rlnImagePixelSize"].iloc[0])
    p = next((b for b in blocks.values() if isinstance(b, pd.DataFrame)), None)
    if p is not None and {"rlnDetectorPixelSize", "rlnMagnification"} <= set(p.columns) and len(p):
        return float(1e4 * p["rlnDetectorPixelSize"].iloc[0] / p["rlnMagnification"].iloc[0])
    return None


def _image_size(blocks: dict) -> int | None:
    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame) and "rlnImageSize" in optics.columns and len(optics):
        return int(np.asarray(optics["rlnImageSize"])[0])
    return None


SPEC = ToolSpec(
    name="disca_split_star",
    doc=__doc__,
    options=Options,
    run=run,
    output_dir=lambda o: o.o,
    relion_inputs={"in_parts": "i"},
)


def main(argv: list[str] | None = None) -> int:
    return run_tool(SPEC, argv)
