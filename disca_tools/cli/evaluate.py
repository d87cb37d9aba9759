"""disca_evaluate: score clusters (or picks) against ground truth.

Clusters:  disca_evaluate --i clusters.star --truth truth.star [--match image|coords] [--o DIR]
  Particles of the two files are paired by rlnImageName (--match image) or by position within
  --max-distance-angst in the same tomogram (--match coords; one-to-one, closest first). Reports
  homogeneity, completeness, V-measure, accuracy after Hungarian matching of clusters to classes
  (the paper's accuracy only when K found equals the true K: see accuracy_defined) and K found
  against true K, from rlnClassNumber of both files (--pred-column / --truth-column to change).

Picks:     disca_evaluate --i coordinates.star --truth truth.star --picks [--o DIR]
  Precision, recall and the false-positive / false-negative rates of Supplementary Note 2 (FP/picks,
  FN/truth), a pick being right when it lies within --max-distance-angst (default 80 Å, the paper's
  8 nm) of a true particle of the same tomogram (one-to-one).

Prints a table and writes DIR/evaluation.json (or --json PATH). Coordinates are converted with each
file's voxel size; where a file does not state it, pass --angpix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..evaluate import PAPER_OVERLAP_ANGST, evaluate_clusters, evaluate_picks, match_particles
from ..io.particles import CLASS, IMAGE
from ..io.star import read_particles
from ..runtime.cli import CommonOptions, ToolSpec, opt, run_tool
from ..runtime.errors import UserError, require_file
from ..runtime.outputs import check_not_input, prepare_output_dir, write_text_atomic

JSON_NAME = "evaluation.json"


@dataclass(kw_only=True)
class Options(CommonOptions):
    i: str = opt("--i", "--input", help="clusters.star (or coordinates.star with --picks)")
    truth: str = opt("--truth", help="ground-truth STAR file (e.g. from disca_simulate)")
    o: str | None = opt(
        "--o", "--output-dir", default=None, help="output folder for evaluation.json"
    )
    json_path: str | None = opt("--json", default=None, help="write the JSON here instead")
    match: str = opt(
        "--match",
        default="auto",
        choices=["auto", "image", "coords"],
        help="pair particles by image name or by coordinates; auto: image names where they pair up",
    )
    max_distance_angst: float = opt(
        "--max-distance-angst",
        default=PAPER_OVERLAP_ANGST,
        help="largest distance (Å) between matched positions",
    )
    angpix: float | None = opt(
        "--angpix", default=None, help="voxel size (Å) of coordinates in files that do not state it"
    )
    picks: bool = opt(
        "--picks", default=False, help="evaluate picks (positions) instead of classes"
    )
    pred_column: str = opt("--pred-column", default=CLASS, help="class column of --i")
    truth_column: str = opt("--truth-column", default=CLASS, help="class column of --truth")


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_table(results: dict, keys: list[str]) -> str:
    """A two-column text table of ``results[keys]``."""
    width = max(len(k) for k in keys)
    return "\n".join(f"{k:<{width}}  {_fmt(results[k])}" for k in keys if k in results)


def _json_target(o: Options) -> Path | None:
    if o.json_path:
        return Path(o.json_path)
    if o.o:
        return Path(o.o) / JSON_NAME
    return None


def run(o: Options) -> dict:
    pred_path = require_file(o.i, "input STAR file")
    truth_path = require_file(o.truth, "truth STAR file")
    if o.max_distance_angst <= 0:
        raise UserError(f"--max-distance-angst: must be positive, got {o.max_distance_angst}")
    if o.angpix is not None and o.angpix <= 0:
        raise UserError(f"--angpix: must be positive, got {o.angpix}")
    target = _json_target(o)
    if target is not None:
        check_not_input([target], [pred_path, truth_path])
        if o.o and not o.json_path:
            prepare_output_dir(o.o, o.overwrite, [JSON_NAME])
        elif target.exists() and not o.overwrite:
            raise UserError(f"{target}: output already exists; pass --overwrite to replace it")
    pred = read_particles(pred_path)
    truth = read_particles(truth_path)
    if o.picks:
        results = evaluate_picks(pred, truth, o.max_distance_angst, o.angpix)
        keys = [
            "n_picks",
            "n_truth",
            "true_positives",
            "false_positives",
            "false_negatives",
            "precision",
            "recall",
            "f1",
            "false_positive_rate",
            "false_negative_rate",
            "max_distance_angst",
        ]
    else:
        by = o.match
        if by == "auto":  # image names when both files have them and they pair up, else positions
            both = IMAGE in pred.particles.columns and IMAGE in truth.particles.columns
            by = "image" if both and len(match_particles(pred, truth, "image")[0]) else "coords"
        results = evaluate_clusters(
            pred, truth, by, o.max_distance_angst, o.angpix, o.pred_column, o.truth_column
        )
        keys = [
            "n_pred",
            "n_truth",
            "n_matched",
            "match",
            "k_true",
            "k_found",
            "k_found_matched",
            "homogeneity",
            "completeness",
            "v_measure",
            "accuracy",
            "accuracy_defined",
        ]
    results = {"input": str(pred_path), "truth": str(truth_path), **results}
    print(format_table(results, keys))
    if target is not None:
        text = json.dumps(_clean(results), indent=2, allow_nan=False)
        write_text_atomic(target, text + "\n")
    return {k: results[k] for k in keys if k in results}


def _clean(v):
    """JSON-safe copy: numpy scalars to Python, NaN to null."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    return str(v)


SPEC = ToolSpec(
    name="disca_evaluate",
    doc=__doc__,
    options=Options,
    run=run,
    output_dir=lambda o: o.o,
    relion_inputs={"in_parts": "i", "in_coords": "i"},
    relion_nodes=lambda o: [],
)


def main(argv=None) -> int:
    return run_tool(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
