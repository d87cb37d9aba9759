"""The paper's Table S1 protocol: K, homogeneity and accuracy of DISCA against two baselines.

For every cell (tilt range × SNR) a set of subtomograms of 5 shipped real structures is simulated
(``disca_tools.simulate.subtomograms.simulate_subtomogram_set``, 24³ at 10 Å by default, CTF +
missing wedge, noise in the sampled region) and clustered three ways in the same run:

* DISCA — the generalized EM loop of ``disca_tools.cluster.em.run_em`` (candidate K 2–20, PCA 16,
  BIC, Hungarian matching, best-DDBI iteration);
* GMM+BIC — the same mixture selection (``select_mixture``) on a PCA of the raw voxels;
* k-means — ``sklearn.cluster.KMeans`` with the true K on the raw voxels.

Each volume is normalised (zero mean, unit s.d.) before the baselines, as DISCA's input pipeline
does. Results sit beside the paper's DISCA numbers (Table S1) in
``benchmarks/results/table_s1.json`` and ``table_s1.md``.

The paper's protocol is 400 subtomograms per class, the full YOPO network, ~20 iterations — a GPU
job. On the 2-core CPU use the options to shrink it and state the protocol, e.g.::

    python benchmarks/bench_table_s1.py --n-per-class 60 --width-scale 0.25 --max-iter 6 \\
        --cells 60:0.1,60:0.01

``--methods`` picks what to run (``disca,disca_paper,classify3d,gmm,kmeans``; ``disca`` uses the
options given here, ``disca_paper`` the paper's choices: iteration 0 from the untrained network,
training on the K clusters, PCA 16; ``classify3d`` refines the clusters of the DISCA method run
before it in the same cell by 3D classification with the pose marginalised, as ``disca_classify3d``
does, with the cell's wedge and the ``--c3d-*`` settings; with ``--c3d-start iteration0`` from that
run's iteration 0 instead); ``--cells all`` runs the 10 cells.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import add_cluster_arguments, save_arrays, save_result  # noqa: E402
from table_s1_cell import (  # noqa: E402
    PAPER,
    STRUCTURES,
    IterationWatcher,
    parse_cells,
    simulate_cell,
)
from threadpoolctl import threadpool_limits  # noqa: E402

from disca_tools.cluster.config import BEYOND_PAPER, EMConfig  # noqa: E402
from disca_tools.cluster.mixture import fit_pca, select_mixture  # noqa: E402
from disca_tools.evaluate import clustering_metrics  # noqa: E402
from disca_tools.model.backend import import_tensorflow  # noqa: E402
from disca_tools.model.data import normalise  # noqa: E402


def parse_k(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(v) for v in text.split(",")]


def normalised_flat(volumes: np.ndarray) -> np.ndarray:
    """The volumes as the loop sees them (per-volume zero mean, unit s.d.), one row each."""
    return normalise(volumes).reshape(len(volumes), -1)


def run_gmm_bic(volumes, k_candidates, pca_dim, seed):
    x = normalised_flat(volumes)
    with threadpool_limits(
        1
    ):  # oversubscribed BLAS threads are 10-30x slower on the shared 2 cores
        pca = fit_pca(x, pca_dim, seed)
        return select_mixture(pca.transform(x), k_candidates, seed).labels


def run_kmeans(volumes, k, seed):
    from sklearn.cluster import KMeans

    with threadpool_limits(1):
        km = KMeans(n_clusters=k, n_init=10, random_state=seed)
        return km.fit_predict(normalised_flat(volumes))


def run_disca(volumes, truth, args, seed, paper: bool = False, save_dir: Path | None = None):
    """DISCA through the core API (disca_tools.cluster.em.run_em on an in-memory store).

    ``paper``: the paper's choices whatever the options say (every option beyond the paper at the
    paper's value, :meth:`EMConfig.paper_choices`, and PCA 16). ``save_dir``: every iteration's
    clustering is saved there (:class:`IterationWatcher`). Returns the reported labels, the row's
    extra figures and every iteration's labels (iteration number → labels)."""
    from disca_tools.cluster.em import run_em
    from disca_tools.io.store import SubtomogramStore
    from disca_tools.model.yopo import resolve_precision

    store = SubtomogramStore(
        volumes=volumes, names=[f"sim_{i:06d}" for i in range(len(volumes))], path=Path("<memory>")
    )
    choices = EMConfig.paper_choices() if paper else {}
    precision = resolve_precision(args.precision)
    cfg = EMConfig.from_options(args, seed=seed, precision=precision, **choices)
    watch = IterationWatcher(truth, save_dir=save_dir)
    res = run_em(store, np.arange(len(volumes)), cfg, on_iteration=watch)
    records = watch.records
    extra = {"best_iteration": int(res.best_iteration), "iterations": len(res.history)}
    extra["k_by_iteration"] = [int(h.k) for h in res.history]
    extra["homogeneity_by_iteration"] = [r["h"] for r in records]
    extra["accuracy_by_iteration"] = [r["accuracy"] for r in records]
    extra["ddbi_by_iteration"] = [round(float(h.ddbi), 4) for h in res.history]
    extra["eligible_by_iteration"] = [bool(h.eligible) for h in res.history]
    return np.asarray(res.labels), extra, watch.labels_by_iteration


def run_classify3d(volumes, truth, start_labels, tilt: float, args, save_dir: Path | None = None):
    """``disca_classify3d``'s core on the cell, from ``start_labels`` (a DISCA run's clusters).
    With ``save_dir``, the result (and with split-and-merge, the classification before it) is
    saved there as ``classify3d.npz`` for probes to start from."""
    from disca_tools.cluster.classify3d import ClassifyConfig, classify_with_poses, split_and_merge

    cfg = ClassifyConfig(
        rotations=args.c3d_rotations,
        iterations=args.c3d_iterations,
        hold_iterations=args.c3d_hold,
        temperature=args.c3d_temperature,
        lowpass_px=args.c3d_lowpass_px,
        max_shift_px=args.c3d_max_shift_px,
        max_tilt_deg=float(tilt),
        seed=args.seed,
        split_merge_rounds=args.c3d_split_merge_rounds,
        split_merge_judge=args.c3d_split_merge_judge,
    )
    read = lambda a, b: normalise(volumes[a:b])  # noqa: E731
    classified = classify_with_poses(read, len(volumes), start_labels, cfg)
    res = split_and_merge(read, len(volumes), classified, cfg)
    if save_dir is not None:
        save_arrays(
            save_dir / "classify3d.npz",
            labels=res.labels,
            posterior=res.posterior,
            poses=res.poses,
            offsets=res.offsets,
            references=res.references,
            labels_before_split_merge=classified.labels,
        )
    extra = {
        "classify3d_start": args.c3d_start,
        "start_accuracy": round(100 * clustering_metrics(truth, start_labels)["accuracy"], 2),
        "classify3d_accuracy_before_split_merge": round(
            100 * clustering_metrics(truth, classified.labels)["accuracy"], 2
        ),
        "classify3d_iterations": len(res.history),
        "classify3d_converged": res.converged,
        "classify3d_changed_by_iteration": [h["changed_fraction"] for h in res.history],
        "classify3d_log_likelihood_by_iteration": [h["log_likelihood"] for h in res.history],
        "classify3d_split_merge": res.moves,
    }
    return res.labels, extra


SAVED_METHODS = ("disca", "disca_paper", "classify3d")  # what --save-iterations keeps


def save_cell(root: Path, sim, tilt: float, snr: float, method: str) -> Path:
    """A folder under ``root`` for one cell's run of ``method`` (DISCA or classify3d), holding
    ``cell.npz`` (truth labels, RELION angles, shifts, class names, tilt, SNR)."""
    folder = root / f"t{tilt:g}_snr{snr:g}_{method}"
    folder.mkdir(parents=True, exist_ok=True)
    save_arrays(
        folder / "cell.npz",
        labels=sim.labels,
        angles_deg=sim.angles_deg,
        shifts_xyz=sim.shifts_xyz,
        class_names=np.array(sim.class_names),
        tilt=tilt,
        snr=snr,
    )
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-per-class", type=int, default=400)
    ap.add_argument("--box", type=int, default=24)
    ap.add_argument("--angpix", type=float, default=10.0)
    ap.add_argument("--structures", default=",".join(STRUCTURES))
    ap.add_argument("--cells", default="all", help="'all' or tilt:snr pairs, e.g. 60:0.1,40:0.01")
    ap.add_argument("--methods", default="disca,gmm,kmeans")
    ap.add_argument("--k-candidates", type=parse_k, default=list(range(2, 21)))
    add_cluster_arguments(
        ap, ["pca_dim", "width_scale", "max_iter", "epochs_per_iter", "lr", "precision", "seed"]
    )
    ap.add_argument(
        "--snr-convention",
        default="volume",
        choices=["volume", "aitom", "aitom-set"],
        help="what SNR means (disca_simulate --snr-convention); the paper's simulator is 'aitom' "
        "(with AITom's CTF: no amplitude contrast)",
    )
    add_cluster_arguments(ap, BEYOND_PAPER)
    ap.add_argument(
        "--save-iterations",
        type=Path,
        default=None,
        help="folder: each DISCA run's iterations (labels, PCA points, posteriors) and its cell's "
        "truth and poses, in a subfolder per cell and method (for probe_cluster_errors.py); "
        "classify3d's result and its classification before split-and-merge (classify3d.npz)",
    )
    from disca_tools.cluster.classify3d import ClassifyConfig

    c3d = ClassifyConfig()
    ap.add_argument("--c3d-rotations", type=int, default=c3d.rotations, help="classify3d")
    ap.add_argument("--c3d-iterations", type=int, default=c3d.iterations, help="classify3d")
    ap.add_argument("--c3d-hold", type=int, default=c3d.hold_iterations, help="classify3d")
    ap.add_argument("--c3d-temperature", type=float, default=c3d.temperature, help="classify3d")
    ap.add_argument("--c3d-lowpass-px", type=float, default=c3d.lowpass_px, help="classify3d")
    ap.add_argument("--c3d-max-shift-px", type=float, default=c3d.max_shift_px, help="classify3d")
    ap.add_argument(
        "--c3d-split-merge-rounds", type=int, default=c3d.split_merge_rounds, help="classify3d"
    )
    ap.add_argument(
        "--c3d-split-merge-judge",
        default=c3d.split_merge_judge,
        choices=["held-out", "likelihood"],
        help="classify3d",
    )
    ap.add_argument(
        "--c3d-start",
        default="reported",
        choices=["reported", "iteration0"],
        help="classify3d starts from the DISCA run's reported clusters, or from its iteration 0 "
        "(the clusters of the rotation-invariant descriptors with --init invariants, before any "
        "training; disca_cluster's iterations/run_it000_clusters.star). Iteration 0 does not "
        "depend on --max-iter: with --max-iter 1 DISCA stops after one round of training",
    )
    ap.add_argument("--tag", default="", help="suffix for the result files")
    args = ap.parse_args(argv)
    import_tensorflow()  # TensorFlow's start-up lines kept out of the log
    from disca_tools.runtime.log import configure

    configure()  # DISCA's per-iteration log lines on stderr

    structures = args.structures.split(",")
    methods = args.methods.split(",")
    k_true = len(structures)
    cells = parse_cells(args.cells)
    protocol = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    protocol.update(n_total=args.n_per_class * k_true, cells=[list(c) for c in cells])
    if "classify3d" in methods and not any(
        m in ("disca", "disca_paper") for m in methods[: methods.index("classify3d")]
    ):
        raise SystemExit("--methods: classify3d refines a DISCA run: put disca before it")
    rows = []
    for tilt, snr in cells:
        disca_labels = None
        t0 = time.time()
        sim = simulate_cell(args, tilt=tilt, snr=snr, structures=structures, box=args.box)
        t_sim = time.time() - t0
        truth = sim.labels
        for method in methods:
            t0 = time.time()
            extra: dict = {}
            save_dir = None
            if args.save_iterations is not None and method in SAVED_METHODS:
                save_dir = save_cell(args.save_iterations, sim, tilt, snr, method)
            if method in ("disca", "disca_paper"):
                labels, extra, by_iteration = run_disca(
                    sim.volumes, truth, args, args.seed, method == "disca_paper", save_dir
                )
                disca_labels = labels if args.c3d_start == "reported" else by_iteration[0]
            elif method == "classify3d":
                labels, extra = run_classify3d(
                    sim.volumes, truth, disca_labels, tilt, args, save_dir
                )
            elif method == "gmm":
                labels = run_gmm_bic(sim.volumes, args.k_candidates, args.pca_dim, args.seed)
            elif method == "kmeans":
                labels = run_kmeans(sim.volumes, k_true, args.seed)
            else:
                raise SystemExit(f"unknown method {method}")
            m = clustering_metrics(truth, labels)
            pk, ph, pa = PAPER[(tilt, snr)] if (tilt, snr) in PAPER else (None, None, None)
            row = {
                "tilt": tilt,
                "snr": snr,
                "effective_snr": round(sim.effective_snr, 4),
                "method": method,
                "k": m["k_found"],
                "homogeneity": round(m["homogeneity"], 4),
                "accuracy": round(100 * m["accuracy"], 2),
                "accuracy_defined": m["accuracy_defined"],
                "v_measure": round(m["v_measure"], 4),
                "seconds": round(time.time() - t0, 1),
                "seconds_simulate": round(t_sim, 1),
                "paper_disca_k": pk,
                "paper_disca_homogeneity": ph,
                "paper_disca_accuracy": pa,
                **extra,
            }
            rows.append(row)
            acc = f"{row['accuracy']:.2f}%" + ("" if row["accuracy_defined"] else " (K wrong)")
            print(
                f"±{tilt}° SNR {snr:<6} {method:<7} K={row['k']:<2} h={row['homogeneity']:.4f} "
                f"acc={acc:<16} {row['seconds']:>7.1f} s   paper DISCA: K={pk} h={ph} acc={pa}",
                flush=True,
            )
            save(rows, protocol, args.tag)
    print()
    print(markdown(rows, protocol))
    return 0


def beyond_paper(protocol: dict) -> str:
    """The options beyond the paper a run was given, as disca_cluster flags ('none': the paper's)."""
    paper = EMConfig.paper_choices()
    given = [
        f"--{name.replace('_', '-')}" + ("" if protocol[name] is True else f" {protocol[name]}")
        for name in BEYOND_PAPER
        if name in protocol and protocol[name] != paper[name]
    ]
    return " ".join(given) or "none"


def method_name(row: dict) -> str:
    """The row's method as the table shows it: classify3d says where it started when not from
    DISCA's reported clusters."""
    from_iteration0 = row.get("classify3d_start") == "iteration0"
    return row["method"] + (" (from DISCA's iteration 0)" if from_iteration0 else "")


def markdown(rows: list[dict], protocol: dict) -> str:
    lines = [
        "# Table S1 protocol (simulated, 5 structures)",
        "",
        f"Protocol: {protocol['n_per_class']} per class ({protocol['n_total']} in all), box "
        f"{protocol['box']}³ at {protocol['angpix']} Å, structures {protocol['structures']}; DISCA width "
        f"scale {protocol['width_scale']}, max {protocol['max_iter']} iterations, candidate K "
        f"{min(protocol['k_candidates'])}–{max(protocol['k_candidates'])}, PCA {protocol['pca_dim']}, "
        f"seed {protocol['seed']}; DISCA options beyond the paper: {beyond_paper(protocol)} "
        "(disca_paper: network init, K clusters, PCA 16); SNR convention "
        f"{protocol.get('snr_convention', 'volume')} "
        "(effective SNR: variance ratio of the simulated volumes). Accuracy after Hungarian matching (the paper reports it only when K is "
        "right; '*' marks a wrong K).",
        "",
        "| tilt | SNR | effective SNR | method | K | homogeneity | accuracy % | paper DISCA K / h / acc % | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        star = "" if r["accuracy_defined"] else "*"
        pa = "–" if r["paper_disca_accuracy"] is None else f"{r['paper_disca_accuracy']:.2f}"
        paper = f"{r['paper_disca_k']} / {r['paper_disca_homogeneity']} / {pa}"
        lines.append(
            f"| ±{r['tilt']}° | {r['snr']} | {r.get('effective_snr', r['snr'])} | {method_name(r)} | {r['k']} | {r['homogeneity']:.4f} | "
            f"{r['accuracy']:.2f}{star} | {paper} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def save(rows: list[dict], protocol: dict, tag: str) -> None:
    save_result("table_s1", tag, {"protocol": protocol, "rows": rows}, markdown(rows, protocol))


if __name__ == "__main__":
    raise SystemExit(main())
