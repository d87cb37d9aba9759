"""How well do the five true structures classify a Table S1 cell when each particle's pose must be found?

``probe_pose_oracle.py`` gives each particle's true pose away and reaches 100 % down to SNR 0.01. No
clustering method knows the poses. This probe keeps the true structures as templates but searches
the pose, as template matching or a reference-based 3D classification must: for every particle and
every class, the rotation (and a shift of up to ``--max-shift-px`` voxels, through an FFT
cross-correlation) that brings the template, imaged with the cell's CTF, low-pass and missing wedge,
nearest to the noisy volume; the particle goes to the class whose best pose is nearest (the matched
filter, Euclidean). The search starts from ``--rotations`` uniform random rotations and refines
each particle's ``--starts`` best rotations per class locally (``--local-deg`` perturbation radii,
``--local`` perturbations each, the best kept). The templates are rotated in the subtomogram box (trilinear),
not in the simulator's larger imaging box; the same path at the *true* poses is reported as well,
so the cost of that difference is measured, not assumed.

With the true structures as the references, this is an upper reference for any method that must
find the poses from these volumes (DISCA, which has neither the structures nor the poses, included),
and the gap to the pose oracle is what the unknown pose costs.

    python benchmarks/probe_pose_search.py --snr-convention aitom --cells 60:0.01 --n-per-class 400

Prints a table and saves benchmarks/results/probe_pose_search[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from table_s1_cell import (  # noqa: E402
    STRUCTURES,
    accuracy_percent,
    add_cell_arguments,
    cell_imaging,
    cell_protocol,
    classification_scores,
    run_probe,
    simulate_cell,
)

from disca_tools.geometry import euler_to_matrix, random_rotations  # noqa: E402
from disca_tools.model.backend import import_tensorflow  # noqa: E402
from disca_tools.simulate.imaging import Imaging, ctf_wedge_weight  # noqa: E402
from disca_tools.simulate.structures import load_structure  # noqa: E402
from disca_tools.simulate.subtomograms import image_particles  # noqa: E402


def unrotated_templates(args: argparse.Namespace, box: int) -> np.ndarray:
    """``(K, S, S, S)``: each structure imaged at the identity pose with the cell's CTF and low-pass
    but no wedge (both are isotropic, so they commute with the rotation; the wedge does not)."""
    aitom = args.snr_convention.startswith("aitom")
    contrast = 0.0 if aitom else Imaging.amplitude_contrast
    isotropic = Imaging(tilt_range_deg=90.0, amplitude_contrast=contrast)
    one = np.zeros(1, dtype=int)
    return np.concatenate(
        [
            image_particles(
                [load_structure(s, args.angpix)], one, np.zeros((1, 3)), np.zeros((1, 3)),
                box, args.angpix, isotropic, aitom, max_shift_px=args.max_shift_px,
            )[0]
            for s in STRUCTURES
        ]
    )  # fmt: skip


class Scorer:
    """Scores of noisy volumes against rotated, wedge-filtered templates (TensorFlow, XLA rotation).

    ``score = 2·max_t ⟨x, P(· − t)⟩ − ‖P‖²`` over shifts ``|t|∞ ≤ max_shift``: the larger, the nearer
    ``x`` is to the template ``P`` (``‖x − P‖² = ‖x‖² − score``)."""

    def __init__(self, templates: np.ndarray, wedge_rfft: np.ndarray, max_shift: int):
        import tensorflow as tf

        from disca_tools.model.data import compiled_rotation

        self.tf = tf
        self.templates = tf.constant(templates, tf.float32)
        self.wedge = tf.constant(wedge_rfft, tf.complex64)
        self.box = int(templates.shape[-1])
        self.rotate = compiled_rotation()
        s, m = self.box, max_shift
        shifts = [(z % s, y % s, x % s) for z in range(-m, m + 1) for y in range(-m, m + 1)
                  for x in range(-m, m + 1)]  # fmt: skip
        self.shift_index = tf.constant([(z * s + y) * s + x for z, y, x in shifts], tf.int32)

    def projections(self, classes: np.ndarray, mats: np.ndarray):
        """Rotated, wedge-filtered templates ``(B, S, S, S)`` and their spectra."""
        tf = self.tf
        vols = tf.gather(self.templates, classes)
        rotated = self.rotate(vols, mats.astype(np.float32), tf.zeros_like(vols))
        spectra = tf.signal.rfft3d(rotated) * self.wedge
        return tf.signal.irfft3d(spectra, fft_length=[self.box] * 3), spectra

    def pair_scores(self, spectra_x, classes: np.ndarray, mats: np.ndarray) -> np.ndarray:
        """Scores of particle ``b`` (``spectra_x[b]``) against template ``classes[b]`` at ``mats[b]``."""
        tf = self.tf
        proj, spectra = self.projections(classes, mats)
        corr = tf.signal.irfft3d(spectra_x * tf.math.conj(spectra), fft_length=[self.box] * 3)
        best = tf.reduce_max(
            tf.gather(tf.reshape(corr, [len(classes), -1]), self.shift_index, axis=1), axis=1
        )
        energy = tf.reduce_sum(tf.reshape(proj * proj, [len(classes), -1]), axis=1)
        return (2.0 * best - energy).numpy()


def coarse_search(
    scorer: Scorer, volumes: np.ndarray, rotations: np.ndarray, starts: int = 1, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The ``starts`` best of ``rotations`` per particle and class, shift 0: ``(N, K, starts)``
    scores and rotation indices."""
    n, k = len(volumes), int(scorer.templates.shape[0])
    flat = volumes.reshape(n, -1)
    best = np.full((n, k, starts), -np.inf)
    arg = np.zeros((n, k, starts), dtype=np.int64)
    for c in range(k):
        for r0 in range(0, len(rotations), chunk):
            mats = rotations[r0 : r0 + chunk]
            proj, _ = scorer.projections(np.full(len(mats), c), mats)
            p = proj.numpy().reshape(len(mats), -1)
            s = np.concatenate([best[:, c], 2.0 * flat @ p.T - (p * p).sum(1)[None]], axis=1)
            i = np.concatenate(
                [arg[:, c], np.broadcast_to(r0 + np.arange(len(mats)), (n, len(mats)))], axis=1
            )
            top = np.argpartition(-s, starts - 1, axis=1)[:, :starts]
            best[:, c] = np.take_along_axis(s, top, axis=1)
            arg[:, c] = np.take_along_axis(i, top, axis=1)
    return best, arg


def small_rotations(count: int, max_deg: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` rotations about uniform random axes by angles uniform in ``[0, max_deg]``."""
    axes = rng.standard_normal((count, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.radians(rng.uniform(0.0, max_deg, count))
    return Rotation.from_rotvec(axes * angles[:, None]).as_matrix()


def local_refine(
    scorer: Scorer,
    spectra: np.ndarray,
    best_mats: np.ndarray,
    best: np.ndarray,
    slot_class: np.ndarray,
    radius_deg: float,
    count: int,
    rng: np.random.Generator,
    chunk: int = 4096,
) -> None:
    """One local round: for every particle and search slot (a start of class ``slot_class[slot]``),
    ``count`` perturbations of the slot's best rotation within ``radius_deg``; ``best_mats``
    ``(N, slots, 3, 3)`` and ``best`` ``(N, slots)`` updated in place."""
    n, slots = best.shape
    pairs = np.array([(i, j) for i in range(n) for j in range(slots)])
    per = max(1, chunk // count)
    for p0 in range(0, len(pairs), per):
        pp = pairs[p0 : p0 + per]
        deltas = small_rotations(len(pp) * count, radius_deg, rng).reshape(len(pp), count, 3, 3)
        mats = np.einsum("pij,pljk->plik", best_mats[pp[:, 0], pp[:, 1]], deltas)
        idx = np.repeat(pp, count, axis=0)
        s = scorer.pair_scores(
            np.take(spectra, idx[:, 0], axis=0), slot_class[idx[:, 1]], mats.reshape(-1, 3, 3)
        ).reshape(len(pp), count)
        j = s.argmax(1)
        top = s[np.arange(len(pp)), j]
        better = top > best[pp[:, 0], pp[:, 1]]
        sel = pp[better]
        best[sel[:, 0], sel[:, 1]] = top[better]
        best_mats[sel[:, 0], sel[:, 1]] = mats[np.arange(len(pp))[better], j[better]]


def run_cell(args: argparse.Namespace, tilt: float, snr: float) -> dict:
    """Simulate the cell, search each particle's pose against each true structure, score."""
    import tensorflow as tf

    t0 = time.time()
    cell = simulate_cell(args, tilt=tilt, snr=snr)
    labels, n, box = cell.labels, len(cell.labels), cell.box
    wedge = ctf_wedge_weight(
        (box,) * 3, args.angpix, replace(cell_imaging(args, tilt), apply_ctf=False), "rfft"
    )
    scorer = Scorer(unrotated_templates(args, box), wedge, int(np.ceil(args.max_shift_px)))
    volumes = cell.volumes.astype(np.float32)
    spectra = np.concatenate(
        [tf.signal.rfft3d(volumes[i : i + 512]).numpy() for i in range(0, n, 512)]
    )
    k = len(STRUCTURES)
    result = {"tilt": tilt, "snr": snr, "effective_snr": round(float(cell.effective_snr), 5)}
    # the same scoring path at the true poses: what rotating in the small box costs
    true_mats = euler_to_matrix(cell.angles_deg).astype(np.float32)
    at_truth = np.stack(
        [
            np.concatenate(
                [
                    scorer.pair_scores(spectra[i : i + 1024], np.full(len(spectra[i : i + 1024]), c),
                                       true_mats[i : i + 1024])
                    for i in range(0, n, 1024)
                ]
            )
            for c in range(k)
        ],
        axis=1,
    )  # fmt: skip
    result["accuracy_true_pose"] = accuracy_percent(at_truth.argmax(1), labels)
    rng = np.random.default_rng(args.seed + 1)
    rotations = random_rotations(args.rotations, rng).astype(np.float32)
    t1 = time.time()
    starts = args.starts
    best, arg = coarse_search(scorer, volumes, rotations, starts)
    result["accuracy_coarse"] = accuracy_percent(best.max(2).argmax(1), labels)
    result["seconds_coarse"] = round(time.time() - t1, 1)
    slot_class = np.repeat(np.arange(k), starts)
    best_mats = rotations[arg].reshape(n, k * starts, 3, 3)
    best = best.reshape(n, k * starts)
    # the coarse search was at shift 0: rescore its best poses with the shift search
    for j in range(k * starts):
        best[:, j] = np.concatenate(
            [scorer.pair_scores(spectra[i : i + 1024], np.full(len(spectra[i : i + 1024]), slot_class[j]),
                                best_mats[i : i + 1024, j]) for i in range(0, n, 1024)]
        )  # fmt: skip
    result["rounds"] = []
    for radius in args.local_deg:
        t1 = time.time()
        local_refine(scorer, spectra, best_mats, best, slot_class, radius, args.local, rng)
        result["rounds"].append(
            {"radius_deg": radius, "accuracy": accuracy_percent(best.reshape(n, k, starts).max(2).argmax(1), labels),
             "seconds": round(time.time() - t1, 1)}
        )  # fmt: skip
    best = best.reshape(n, k, starts).max(2)
    pred = best.argmax(1)
    result.update(classification_scores(pred, labels, k, tilt, snr))
    # a wrong class wins when its best pose beats the true class's; fraction where the true class's
    # found pose scores below the true pose (the search, not the data, lost those)
    result["search_short_of_true_pose"] = round(
        float(np.mean(best[np.arange(n), labels] < at_truth[np.arange(n), labels])), 3
    )
    # the true class at its true pose against the other classes at their searched poses: what the
    # accuracy would be if the search found the true pose of the true class and nothing better
    others = best.copy()
    others[np.arange(n), labels] = -np.inf
    result["accuracy_true_class_at_true_pose"] = round(
        100.0 * float(np.mean(at_truth[np.arange(n), labels] > others.max(1))), 2
    )
    result["seconds"] = round(time.time() - t0, 1)
    return result


def markdown(rows: list[dict], protocol: dict) -> str:
    lines = [
        "Template matching with the true structures, pose searched, "
        + ", ".join(f"{k} {v}" for k, v in protocol.items()),
        "",
        "| tilt | SNR (ratio) | true pose (this path) | coarse | after local rounds | per class "
        f"({', '.join(STRUCTURES)}) | true class at true pose vs others searched "
        "| search short of the true pose | paper DISCA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        paper = "–" if r["paper_acc"] is None else f"{r['paper_acc']} %"
        rounds = " → ".join(f"{x['accuracy']}" for x in r["rounds"])
        lines.append(
            f"| ±{r['tilt']:g}° | {r['snr']:g} ({r['effective_snr']:.2g}) | "
            f"{r['accuracy_true_pose']} % | {r['accuracy_coarse']} % | {rounds} % | "
            f"{' / '.join(map(str, r['accuracy_per_class']))} | "
            f"{r['accuracy_true_class_at_true_pose']} % | "
            f"{100 * r['search_short_of_true_pose']:.1f} % | {paper} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_arguments(ap, n_per_class=400)
    ap.add_argument(
        "--cells", default="60:0.01", help="'all' or tilt:snr pairs, e.g. 60:0.1,40:0.01"
    )
    ap.add_argument(
        "--rotations", type=int, default=3000, help="coarse search: uniform random rotations"
    )
    ap.add_argument("--local-deg", type=float, nargs="*", default=[20.0, 10.0, 5.0, 2.5],
                    help="radii of the local rounds, degrees")  # fmt: skip
    ap.add_argument("--starts", type=int, default=1,
                    help="local searches per particle and class, from the best coarse rotations")  # fmt: skip
    ap.add_argument("--local", type=int, default=24, help="perturbations per start and round")
    ap.add_argument("--max-shift-px", type=float, default=1.0, help="shift search, voxels")
    args = ap.parse_args(argv)
    import_tensorflow()  # TensorFlow's start-up lines kept out of the log
    protocol = cell_protocol(
        args,
        rotations=args.rotations,
        local_deg=args.local_deg,
        starts=args.starts,
        local=args.local,
        max_shift_px=args.max_shift_px,
    )
    return run_probe("probe_pose_search", args, run_cell, markdown, protocol)


if __name__ == "__main__":
    raise SystemExit(main())
