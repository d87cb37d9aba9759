"""How well do the five true structures classify a Table S1 cell when each particle's pose is known?

For each simulated particle the probe is given the five structures imaged exactly as that particle
was (same rotation, shift, CTF, wedge and low-pass; noise-free) and picks the class whose template
is nearest (Euclidean: the matched filter) to the noisy volume. This is template matching with the
pose given away, which no clustering method has; it is a reference for how much class information
the volumes hold at each SNR, to set beside the paper's DISCA figure. It is not a strict ceiling:
the simulator makes signal and noise in a larger box and crops them, as a subtomogram is cut from a
tomogram, so the noise in the box is neither white nor diagonal in its Fourier basis, and a rule
that modelled its covariance exactly could do somewhat better. (Whitening by the measured power
spectrum, tried, did worse: the crop spreads a little noise into every frequency, and dividing by
that little power amplifies the templates' own crop leakage.)

    python benchmarks/probe_pose_oracle.py --snr-convention aitom [--cells all] [--n-per-class 200]

Prints a table and saves benchmarks/results/probe_pose_oracle[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from table_s1_cell import (  # noqa: E402
    STRUCTURES,
    add_cell_arguments,
    cell_imaging,
    cell_protocol,
    classification_scores,
    run_probe,
    simulate_cell,
)

from disca_tools.model.backend import import_tensorflow  # noqa: E402
from disca_tools.simulate.structures import load_structure  # noqa: E402
from disca_tools.simulate.subtomograms import image_particles  # noqa: E402


def template_distances(noisy: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """``(n, K)`` squared Euclidean distances between each noisy volume and its K templates."""
    diff = templates - noisy[:, None]
    return np.einsum(
        "nkv,nkv->nk", diff.reshape(*diff.shape[:2], -1), diff.reshape(*diff.shape[:2], -1)
    )


def run_cell(args: argparse.Namespace, tilt: float, snr: float) -> dict:
    """Simulate the cell, image every structure at every particle's pose without noise, and score
    nearest-template classification."""
    noisy_set, clean = simulate_cell(args, tilt=tilt, snr=snr, return_clean=True)
    labels, n, k = noisy_set.labels, len(noisy_set.labels), len(STRUCTURES)
    box, imaging = noisy_set.box, cell_imaging(args, tilt)
    aitom = args.snr_convention.startswith("aitom")
    maps = [load_structure(s, args.angpix) for s in STRUCTURES]
    # templates[i, c]: structure c imaged at particle i's pose
    templates = np.empty((n, k) + clean.shape[1:], dtype=np.float32)
    for c in range(k):
        templates[:, c], _ = image_particles(
            [maps[c]], np.zeros(n, dtype=int), noisy_set.angles_deg, noisy_set.shifts_xyz,
            box, args.angpix, imaging, aitom, max_shift_px=1.0,
        )  # fmt: skip
    # the simulator's own clean volumes are the true-class templates (a check of the above)
    match = np.abs(templates[np.arange(n), labels] - clean).max() / np.abs(clean).max()
    if match > 1e-4:
        raise RuntimeError(f"pose-matched templates differ from the simulation ({match:.2g})")
    result = {
        "tilt": tilt,
        "snr": snr,
        "effective_snr": round(float(noisy_set.effective_snr), 5),
    }
    pred = np.argmin(template_distances(noisy_set.volumes, templates), axis=1)
    result.update(classification_scores(pred, labels, k, tilt, snr))
    return result


def markdown(rows: list[dict], protocol: dict) -> str:
    lines = [
        "Template matching at the known pose, "
        + ", ".join(f"{k} {v}" for k, v in protocol.items()),
        "",
        f"| tilt | SNR (ratio) | accuracy | per class ({', '.join(STRUCTURES)}) | paper DISCA |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        paper = "–" if r["paper_acc"] is None else f"{r['paper_acc']} %"
        lines.append(
            f"| ±{r['tilt']:g}° | {r['snr']:g} ({r['effective_snr']:.2g}) | {r['accuracy']} % "
            f"| {' / '.join(map(str, r['accuracy_per_class']))} | {paper} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_arguments(ap)
    ap.add_argument("--cells", default="all", help="'all' or tilt:snr pairs, e.g. 60:0.1,40:0.01")
    args = ap.parse_args(argv)
    import_tensorflow()  # TensorFlow's start-up lines kept out of the log
    return run_probe("probe_pose_oracle", args, run_cell, markdown, cell_protocol(args))


if __name__ == "__main__":
    raise SystemExit(main())
