"""disca_cluster: DISCA — sort subtomograms into structurally homogeneous classes, no template, no K.

  disca_cluster --i particles.star --o Cluster/run1 [--seed 0] [--k-candidates 2-20]
  disca_cluster --i particles.star --o Cluster/run1 --continue          (resume after a stop)
  disca_cluster --i new.star --o Cluster/assign --model Cluster/run1     (assign with a trained run)
  disca_cluster --i new.star --o Cluster/tuned --init-model Cluster/run1 (fine-tune a trained run)
  disca_cluster --i new.star --o Cluster/s2 --model Cluster/run1 --shard 2/8  (one shard of 8)
  disca_cluster --merge-shards Cluster/s1 … Cluster/s8 --o Cluster/assign      (merge the shards)

The generalized EM loop of the DISCA paper: YOPO features (inference) → PCA (--pca-dim) →
full-covariance Gaussian mixtures for every candidate K, lowest BIC (paper's formula) → labels
(Hungarian-matched between iterations) → YOPO trained on the particles plus rotated copies with
smoothed labels (categorical hinge loss, Nadam). The iteration with the best (lowest) DDBI after at
least one round of training is reported. Stops when K and ≥ 99 % of labels are unchanged for 3
iterations, or at --max-iter.

Subtomograms come from the fast store beside the STAR file (subtomograms.npy +
subtomograms_names.txt, as written by disca_extract / disca_simulate); for a STAR that merges
several extractions (Extract/particles.star from examples/slurm_pick_extract.sh), from the stores
of those extractions (Extract/<tomogram>/subtomograms.npy), read in place; else from the
rlnImageName .mrc files (relative to the working directory, then to the STAR file's folder), which
are copied once into DIR/subtomograms.npy so that training streams from a memmap. Each volume is
normalised to zero mean and unit variance.

Outputs in DIR:
  clusters.star       the input table (every column, same STAR flavour) + rlnClassNumber (1-based)
                      and rlnMaxValueProbDistribution (posterior of the chosen class)
  history.tsv         per iteration: K, BIC per candidate K, DDBI, fraction of labels changed,
                      loss, seconds (and whether it was eligible / reported)
  iterations/         run_itNNN_clusters.star: every iteration's classes, the same table as
                      clusters.star (whose iteration is the lowest DDBI's): to take another
                      iteration, give its file to disca_split_star (--no-iteration-stars: none)
  model.keras         the feature extractor of the reported iteration (subtomogram → features)
  features.npy        the features (N, F) of the reported iteration
  mixture.pkl         pickled dict: fitted PCA, Gaussian mixture, component → class mapping
  run_config.json     what is needed to reuse the run (--model, --init-model)
  plots/              bic.png, iterations.png, embedding.png, montage.png, sizes.png
  checkpoint/         weights, labels and state after every iteration (for --continue)
  decoded/            with --decode-centers: class_NNN.mrc per cluster centre + montage.png

Beyond the paper (off by default; measured in README 'Clustering accuracy'): --init invariants
starts from clusters of rotation-invariant descriptors of the data (the spherical-harmonic power, up
to degree 10, of and between real-space shells about the box centre, and shells of the power
spectrum) instead of the untrained network's features; --init-epochs N lets the random network
learn those clusters for N epochs first; --train-clusters N trains on about N sub-clusters of the K
clusters (over-clustering) so that merged classes can separate again (in the runs measured they did
not); --calibrate-bn sets the BatchNorm statistics from the clean data before each feature pass;
--input-dropout 0 removes the N(1, 1) input noise of the paper's GaussianDropout 0.5;
--predict-rotations N averages each subtomogram's features over it and N − 1 rotated copies. On a CPU-sized
network, --init invariants --init-epochs 8 --pca-dim 8 --input-dropout 0 did much better than the
paper's choices (the loop can merge classes but not split them, so iteration 0 must find them all,
and the first round must train long enough to keep them).

The full network (--width-scale 1) wants a GPU; on a CPU use e.g. --width-scale 0.25
--feature-dim 256. --precision auto computes in bfloat16 where the hardware supports it.
--j N fits the candidate-K mixtures in N worker processes (default 0: one per core this job may
use, e.g. its SLURM allocation's); the result does not depend on N. TensorFlow uses every core.

Several GPUs and nodes (--distribute, training and --init-model only). The network, its
optimizer and head are built in a tf.distribute strategy; each batch of --batch-size is split
among the replicas (global batch = --batch-size × replicas; scale --lr yourself if you wish).
  auto         multiworker when TF_CONFIG is set or inside an `srun` step of several tasks;
               mirrored when this machine sees more than one GPU; none otherwise
  none         TensorFlow's default strategy (one device)
  mirrored     MirroredStrategy over this machine's GPUs (without GPUs: its CPU device)
  multiworker  MultiWorkerMirroredStrategy, one process per node. The cluster comes from
               TF_CONFIG when set, else from SLURM (SlurmClusterResolver: SLURM_PROCID,
               SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE; port
               $DISCA_PORT_BASE, default 8888). By hand, per task:
                 TF_CONFIG='{"cluster": {"worker": ["node1:8888", "node2:8888"]},
                             "task": {"type": "worker", "index": '$SLURM_PROCID'}}'
               Task 0 (or the "chief" task) writes --o; the other workers write to a temporary
               folder. Every worker computes all features and the same mixture fits, so the
               nodes must be identical hardware. --continue: workers start from the chief's
               checkpoint.
See examples/slurm_cluster.sh for sbatch recipes (one node, several nodes, shard arrays).

Sharded assignment (--model with --shard I/N). Shard I takes the rows I−1, I−1+N, I−1+2N, …
of --i (interleaved, so every shard sees all tomograms) and writes in --o: clusters.star (those
rows only, every input column + rlnClassNumber and rlnMaxValueProbDistribution; no extra label),
features.npy (those rows) and shard.json (I, N, the rows' original indices, the input's path and
SHA-256 of its rlnImageName column, the model folder and SHA-256 of its files); no plots.
--merge-shards DIR … --o OUT checks that the shards come from the same model and input and cover
every row exactly once, and writes OUT/clusters.star in the input's original order and
OUT/features.npy (a missing, duplicate or foreign shard is an error; nothing is written).
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..cluster.config import INIT_COVARIANCES, INIT_REFINES, PROJECTIONS, EMConfig
from ..cluster.shards import (
    SHARD_FILE,
    files_fingerprint,
    merge,
    names_hash,
    parse_shard,
    read_shard,
    shard_rows,
)
from ..io.particles import CLASS, POSTERIOR
from ..io.star import read_particles, relion5_paths, write_particles
from ..runtime.cli import CommonOptions, ToolSpec, opt, resolve_jobs, run_tool
from ..runtime.errors import UserError, file_error
from ..runtime.log import logger
from ..runtime.outputs import atomic_path, check_not_input, prepare_output_dir, write_text_atomic

RUN_CONFIG = "run_config.json"
MODEL_FILE = "model.keras"
MIXTURE_FILE = "mixture.pkl"
FEATURES_FILE = "features.npy"
PLOTS = ("bic.png", "iterations.png", "embedding.png", "montage.png", "sizes.png")
ITERATIONS_DIR = "iterations"


def iteration_star(out: str | Path, iteration: int) -> Path:
    """Where a training run writes iteration ``iteration``'s classes (RELION's run_itNNN naming)."""
    return Path(out) / ITERATIONS_DIR / f"run_it{iteration:03d}_clusters.star"


@dataclass(kw_only=True)
class Options(CommonOptions):
    i: str | None = opt(
        "--i",
        "--input",
        default=None,
        help="particles STAR file (RELION 3.1 / 4 / 5, Warp); required except with --merge-shards",
    )
    o: str = opt("--o", "--output-dir", help="output folder")
    j: int = opt(
        "--j",
        "--jobs",
        default=0,
        help="processes fitting the candidate-K mixtures in parallel, 0: one per core this job may "
        "use (TensorFlow uses every core by itself; the result does not depend on --j)",
    )
    seed: int = opt(
        "--seed", default=EMConfig.seed, help="random seed (runs with one seed are reproducible)"
    )
    k_candidates: str = opt(
        "--k-candidates",
        default="2-20",
        help="candidate numbers of classes: '2-20', '2,3,5' or '2-6,8'",
    )
    pca_dim: int = opt(
        "--pca-dim", default=EMConfig.pca_dim, help="PCA dimension before the mixtures"
    )
    max_iter: int = opt("--max-iter", default=EMConfig.max_iter, help="maximum EM iterations")
    epochs_per_iter: int = opt(
        "--epochs-per-iter",
        default=EMConfig.epochs_per_iter,
        help="training epochs per EM iteration",
    )
    batch_size: int = opt("--batch-size", default=EMConfig.batch_size, help="training batch size")
    lr: float = opt("--lr", default=EMConfig.lr, help="Nadam learning rate at iteration 0")
    lr_decay: float = opt(
        "--lr-decay", default=EMConfig.lr_decay, help="learning rate factor per iteration"
    )
    label_smoothing: float = opt(
        "--label-smoothing",
        default=EMConfig.label_smoothing,
        help="label smoothing α at iteration 0 (×0.9 per iteration)",
    )
    init: str = opt(
        "--init",
        default=EMConfig.init,
        choices=["network", "invariants", "voxels"],
        help="iteration-0 clusters: of the untrained network's features (the paper), of "
        "rotation-invariant descriptors of the data (real-space and power-spectrum shells), or of PCA "
        "of the voxels. See README 'Clustering accuracy'",
    )
    init_epochs: int = opt(
        "--init-epochs",
        default=EMConfig.init_epochs,
        help="with --init invariants/voxels: epochs of the first round, in which the random network "
        "learns the iteration-0 clusters (not in the paper; 0 = --epochs-per-iter)",
    )
    train_clusters: int = opt(
        "--train-clusters",
        default=EMConfig.train_clusters,
        help="train on about this many sub-clusters of the K clusters (over-clustering; not in the "
        "paper; 0 = off): keeps merged classes separable; iteration 1 (trained on the K clusters) "
        "is then not reported (when N > its K). See README 'Clustering accuracy'",
    )
    input_dropout: float = opt(
        "--input-dropout",
        default=EMConfig.input_dropout,
        help="rate of YOPO's GaussianDropout on the input while training: the paper's 0.5 "
        "multiplies each voxel by N(1, 1) noise; 0: none (not in the paper). See README "
        "'Clustering accuracy'",
    )
    calibrate_bn: bool = opt(
        "--calibrate-bn",
        default=EMConfig.calibrate_bn,
        help="set BatchNorm statistics from the clean data before each feature pass (not in the "
        "paper). See README 'Clustering accuracy'",
    )
    init_covariance: str = opt(
        "--init-covariance",
        default=EMConfig.init_covariance,
        choices=list(INIT_COVARIANCES),
        help="with --init invariants/voxels: the iteration-0 mixtures' covariances, full with the "
        "paper's BIC (as every later iteration), diagonal with scikit-learn's BIC (not in the "
        "paper; finds more clusters), or auto: the one of the two with the lower scikit-learn BIC. "
        "See README 'Clustering accuracy'",
    )
    init_pca_dim: int = opt(
        "--init-pca-dim",
        default=EMConfig.init_pca_dim,
        help="with --init invariants/voxels: the PCA dimension of iteration 0's descriptors (0: "
        "--pca-dim, which then applies to the network's features only; not in the paper). See "
        "README 'Clustering accuracy'",
    )
    pca_trained_classes: bool = opt(
        "--pca-trained-classes",
        default=EMConfig.pca_trained_classes,
        help="PCA of a trained network's features in at most M − 1 dimensions, M the classes it "
        "was last trained on (--pca-dim the most; not in the paper): a network trained on M classes "
        "separates them in M − 1 directions, and the other components only add to the BIC's "
        "penalty. See README 'Clustering accuracy'",
    )
    projection: str = opt(
        "--projection",
        default=EMConfig.projection,
        choices=list(PROJECTIONS),
        help="what the mixtures see of the network's features from iteration 1 on: their PCA "
        "(--pca-dim; the paper) or lda, their projection on the K − 1 discriminant directions of "
        "the previous iteration's K clusters (shrinkage LDA; not in the paper): at low SNR the "
        "directions that separate classes carry little of the variance PCA keeps. See README "
        "'Clustering accuracy'",
    )
    init_refine: str = opt(
        "--init-refine",
        default=EMConfig.init_refine,
        choices=list(INIT_REFINES),
        help="with --init invariants/voxels: lda refines iteration 0's clusters at their K by "
        "LDA-k-means on the descriptors (discriminant directions of the clusters, then a mixture "
        "in them, until they settle; not in the paper). See README 'Clustering accuracy'",
    )
    predict_rotations: int = opt(
        "--predict-rotations",
        default=EMConfig.predict_rotations,
        help="features of each subtomogram averaged over it and N − 1 rotated copies (uniform "
        "random rotations, the same for every particle, noise-filled corners as in training; not in "
        "the paper): less dependent on how the network sees a pose; the network does N times the "
        "work (each subtomogram is still read once). --model uses the trained run's N. See README "
        "'Clustering accuracy'",
    )
    width_scale: float = opt(
        "--width-scale",
        default=EMConfig.width_scale,
        help="multiplies every YOPO convolution width (1 = the paper's network)",
    )
    feature_dim: int = opt(
        "--feature-dim", default=EMConfig.feature_dim, help="feature vector length"
    )
    precision: str = opt(
        "--precision",
        default="auto",
        choices=["auto", "float32", "mixed_bfloat16"],
        help="compute precision",
    )
    resume: bool = opt("--continue", default=False, help="continue the interrupted run in --o")
    no_iteration_stars: bool = opt(
        "--no-iteration-stars",
        default=False,
        help="do not write iterations/run_itNNN_clusters.star (every iteration's classes; "
        "see benchmarks/bench_em_parts.py for their time and size per million particles)",
    )
    model: str | None = opt(
        "--model",
        default=None,
        help="assign particles with this trained run's folder (no training)",
    )
    init_model: str | None = opt(
        "--init-model", default=None, help="fine-tune starting from this trained run's folder"
    )
    decode_centers: bool = opt(
        "--decode-centers",
        default=False,
        help="train a decoder and write each cluster centre's decoding",
    )
    decoder_epochs: int = opt(
        "--decoder-epochs", default=10, help="decoder training epochs (--decode-centers)"
    )
    angpix: float | None = opt(
        "--angpix", default=None, help="coordinate pixel size where the STAR file does not state it"
    )
    distribute: str = opt(
        "--distribute",
        default="auto",
        choices=["auto", "none", "mirrored", "multiworker"],
        help="tf.distribute strategy for training (see above)",
    )
    shard: str | None = opt(
        "--shard",
        default=None,
        metavar="I/N",
        help="with --model: assign only shard I of N (rows I-1, I-1+N, I-1+2N, ...)",
    )
    merge_shards: list[str] = opt(
        "--merge-shards",
        nargs="+",
        default=None,
        metavar="DIR",
        help="merge the --shard runs in these folders into --o (no --i)",
    )


def parse_k_candidates(text: str) -> list[int]:
    """'2-20' → [2..20]; '2,3,5' → [2, 3, 5]; '2-4,8' → [2, 3, 4, 8]."""
    out: set[int] = set()
    try:
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise UserError(f"--k-candidates: cannot read {text!r} (use e.g. 2-20 or 2,3,5)") from None
    if not out or min(out) < 2:
        raise UserError(f"--k-candidates: need numbers ≥ 2, got {text!r}")
    return sorted(out)


def model_fingerprint(folder: str | Path) -> str:
    """SHA-256 of a trained run's model, mixture and run_config files."""
    return files_fingerprint(folder, (RUN_CONFIG, MODEL_FILE, MIXTURE_FILE))


def _distribute_mode(o: Options) -> str:
    """The distribute mode of a training run (``none`` when nothing is trained)."""
    from ..model.distribute import resolve_distribute

    if o.model or o.merge_shards:
        return "none"
    return resolve_distribute(o.distribute)


def _output_dir(o: Options) -> str | None:
    """--o for the chief; a fresh temporary folder for the other workers of a multiworker run.

    Idempotent: the first call decides (and records the chief's folder in ``o._chief_output``).
    Reads only the environment: TensorFlow has not started yet.
    """
    from ..model.distribute import slurm_multitask, worker_task

    if getattr(o, "_chief_output", None) is not None or o.o is None:
        return o.o
    o._chief_output = o.o
    if o.model or o.merge_shards or o.distribute not in ("auto", "multiworker"):
        return o.o
    if o.distribute == "auto" and not (os.environ.get("TF_CONFIG") or slurm_multitask()):
        return o.o
    task, chief = worker_task("multiworker")
    if not chief:
        o.o = str(Path(tempfile.gettempdir()) / f"disca_cluster_worker{task}_{os.getpid()}")
        _WORKER["scratch"] = o.o
        atexit.register(_remove_scratch)  # and by main() before a hard exit
        logger.info("Worker %d (not the chief): writing to %s (removed at exit)", task, o.o)
    return o.o


def _output_names(o: Options, table) -> list[str]:
    star = Path(o.o) / "clusters.star"
    if o.shard:
        names = ["clusters.star", FEATURES_FILE, SHARD_FILE]
        if table.flavour == "relion5":
            names += [
                str(p.relative_to(o.o)) for k, p in relion5_paths(star).items() if k != "particles"
            ]
        return names
    names = ["clusters.star", FEATURES_FILE] + [f"plots/{p}" for p in PLOTS]
    if table.flavour == "relion5":
        names += [
            str(p.relative_to(o.o)) for k, p in relion5_paths(star).items() if k != "particles"
        ]
    if o.model is None:
        names += ["history.tsv", MODEL_FILE, MIXTURE_FILE, RUN_CONFIG, ITERATIONS_DIR]
    return names


def _read_run_config(folder: str | Path, flag: str) -> dict:
    d = Path(folder)
    if not d.is_dir():
        raise file_error(d, f"{flag}: not a folder")
    for name in (RUN_CONFIG, MODEL_FILE, MIXTURE_FILE):
        if not (d / name).is_file():
            raise file_error(d, f"{flag}: not a finished disca_cluster run (missing {name})")
    try:
        return json.loads((d / RUN_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise file_error(d / RUN_CONFIG, f"unreadable ({exc})") from None


def _write_history(path: Path, history, best_it: int, ks: list[int]) -> None:
    cols = ["iteration", "K"] + [f"BIC_K{k}" for k in ks] + [
        "DDBI", "fraction_changed", "loss", "seconds", "lr", "label_smoothing", "eligible", "reported",
        "seconds_features", "seconds_mixtures", "seconds_training", "epochs",
    ]  # fmt: skip
    lines = ["\t".join(cols)]
    for h in history:
        bic = [f"{h.bic_by_k[k]:.3f}" if k in h.bic_by_k else "nan" for k in ks]
        vals = [str(h.iteration), str(h.k), *bic, f"{h.ddbi:.6g}", f"{h.frac_changed:.4f}", f"{h.loss:.6g}",
                f"{h.seconds:.2f}", f"{h.lr:.3g}", f"{h.alpha:.4g}", str(int(h.eligible)),
                str(int(h.iteration == best_it)), f"{h.seconds_features:.2f}", f"{h.seconds_mixture:.2f}",
                f"{h.seconds_train:.2f}", str(h.epochs)]  # fmt: skip
        lines.append("\t".join(vals))
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_clusters(table, labels: np.ndarray, posteriors: np.ndarray, out: Path) -> Path:
    """``table`` with rlnClassNumber (1-based) and the chosen class's posterior, written to ``out``."""
    df = table.particles.copy()
    df[CLASS] = np.asarray(labels, dtype=np.int64) + 1
    df[POSTERIOR] = np.max(posteriors, axis=1).astype(np.float64)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_particles(out, table.with_particles(df), overwrite=True)
    return out


def _plots(out: Path, store, rows, labels, features, pca, history=None, best_it=None) -> None:
    from ..plots import clustering as P

    pd_ = out / "plots"
    pd_.mkdir(exist_ok=True)
    x = pca.transform(features)
    x2 = x[:, :2] if x.shape[1] >= 2 else np.column_stack([x[:, 0], np.zeros(len(x))])
    P.plot_embedding(x2, labels, pd_ / "embedding.png")
    P.plot_cluster_sizes(labels, pd_ / "sizes.png")
    P.plot_class_montage(store.volumes, rows, labels, pd_ / "montage.png")
    if history is not None:
        P.plot_bic(history, pd_ / "bic.png")
        P.plot_iterations(history, pd_ / "iterations.png", best_it)


def _decode(
    o: Options,
    out: Path,
    store,
    rows,
    features,
    labels,
    box: int,
    angpix: float,
    width_scale: float,
) -> dict:
    try:
        from ..cluster import decoder as D
    except ImportError:
        raise UserError(
            "--decode-centers: the decoder module is not available in this installation"
        ) from None
    from ..io.mrc import write_volume
    from ..model.data import gather

    dec = D.train_decoder(
        features, lambda idx: gather(store, rows[np.asarray(idx)]), box, seed=o.seed,
        epochs=o.decoder_epochs, width_scale=width_scale,
    )  # fmt: skip
    vols = D.decode_centers(dec, features, labels)
    d = out / "decoded"
    d.mkdir(exist_ok=True)
    for c, v in zip(np.unique(labels), vols, strict=True):
        write_volume(d / f"class_{int(c) + 1:03d}.mrc", v, angpix, overwrite=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(vols), figsize=(1.5 * len(vols), 1.8), squeeze=False)
    for j, v in enumerate(vols):
        axes[0, j].imshow(v[box // 2], cmap="gray")
        axes[0, j].set_title(f"class {j + 1}", fontsize=7)
        axes[0, j].set_xticks([])
        axes[0, j].set_yticks([])
    with atomic_path(d / "montage.png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return {"decoded_classes": len(vols)}


def run(o: Options) -> dict:
    from ..model.data import load_particle_volumes, locate_particle_volumes

    _output_dir(o)
    if o.merge_shards:
        return merge_shards(o)
    if not o.i:
        raise UserError("--i: the particles STAR file is required")
    if o.shard and not o.model:
        raise UserError("--shard: only with --model (assigning with a trained run)")
    if o.model and o.init_model:
        raise UserError("--model and --init-model: give one (assign with a run, or fine-tune it)")
    if o.model and o.resume:
        raise UserError("--continue: nothing to continue when assigning with --model")
    ks = parse_k_candidates(o.k_candidates)
    for name, v in (("--pca-dim", o.pca_dim), ("--max-iter", o.max_iter), ("--epochs-per-iter", o.epochs_per_iter),
                    ("--batch-size", o.batch_size), ("--feature-dim", o.feature_dim)):  # fmt: skip
        if v < 1:
            raise UserError(f"{name}: must be at least 1 (got {v})")
    if not (o.lr > 0 and 0 < o.lr_decay <= 1 and 0 <= o.label_smoothing < 1 and o.width_scale > 0):
        raise UserError("--lr, --lr-decay, --label-smoothing, --width-scale: out of range")
    table = read_particles(o.i, angpix=o.angpix)
    n = len(table)
    if n == 0:
        raise file_error(o.i, "no particles")
    if CLASS in table.particles.columns:
        logger.info("Replacing the input's %s with the clustering", CLASS)
    shard_info = None
    if o.shard:
        si, sn = parse_shard(o.shard)
        if sn > n:
            raise UserError(
                f"--shard: {sn} shards for {n} particles in {o.i} (some would be empty)"
            )
        idx = shard_rows(si, sn, n)
        shard_info = {"shard": si, "n_shards": sn, "rows": idx.tolist(), "n_rows": n,
                      "input": str(Path(o.i).resolve()),
                      "image_names_sha256": names_hash(table.particles["rlnImageName"])
                      if "rlnImageName" in table.particles.columns else None}  # fmt: skip
        table = table.with_particles(table.particles.iloc[idx].reset_index(drop=True))
    out = Path(o.o)
    names = _output_names(o, table)
    check_not_input([out / p for p in names], [o.i])
    ref_cfg = None
    if o.model:
        ref_cfg = _read_run_config(o.model, "--model")
    elif o.init_model:
        ref_cfg = _read_run_config(o.init_model, "--init-model")
    chief_out = Path(getattr(o, "_chief_output", None) or o.o)
    if o.resume and chief_out != out and (chief_out / "checkpoint").is_dir():
        # a non-chief worker continues from the chief's checkpoint, in its own folder
        shutil.copytree(chief_out / "checkpoint", out / "checkpoint", dirs_exist_ok=True)
    if o.resume and not (out / "checkpoint" / "state.json").is_file():
        raise file_error(
            out / "checkpoint" / "state.json", "--continue: no checkpoint of an interrupted run"
        )

    located = locate_particle_volumes(table, o.i, out)
    box = located.box
    cfg, init_weights = None, None
    if o.model is None:  # training: the whole configuration, checked before anything is written
        width, fdim = o.width_scale, o.feature_dim
        if ref_cfg is not None:
            width, fdim = float(ref_cfg["width_scale"]), int(ref_cfg["feature_dim"])
            init_weights = Path(o.init_model) / MODEL_FILE
        # every option named like an EMConfig field is that field (precision: resolved below)
        cfg = EMConfig.from_options(
            o, k_candidates=ks, width_scale=width, feature_dim=fdim, mixture_jobs=resolve_jobs(o.j)
        )
        cfg.check(n, box)
    if ref_cfg is not None and int(ref_cfg["box"]) != box:
        flag, folder = ("--model", o.model) if o.model else ("--init-model", o.init_model)
        raise file_error(
            folder, f"{flag}: trained on box {ref_cfg['box']}, these subtomograms are {box}"
        )

    created = not out.exists()
    try:
        prepare_output_dir(out, o.overwrite or o.resume, names)
        store, rows = load_particle_volumes(table, o.i, out, located)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    angpix = table.image_angpix() or 1.0

    from ..model.backend import import_tensorflow, seed_deterministically

    import_tensorflow()  # TensorFlow's start-up lines kept off the terminal
    from ..model import yopo as Y
    from ..model.distribute import make_strategy

    mode = _distribute_mode(o)
    strategy = make_strategy(mode) if mode != "none" else None  # before any other TF op
    _WORKER["joined"] = mode == "multiworker"
    precision = Y.resolve_precision(o.precision)
    seed_deterministically(o.seed)

    if o.model:
        return _assign(o, out, table, store, rows, ref_cfg, precision, shard_info)

    from ..cluster.em import run_em

    cfg = replace(cfg, precision=precision)  # resolved now that TensorFlow is set up
    logger.info(
        "%d particles, box %d, precision %s, YOPO widths %s, features %d",
        n,
        box,
        precision,
        Y.conv_widths(cfg.width_scale),
        cfg.feature_dim,
    )
    ckpt = out / "checkpoint"
    for stale in (ckpt, out / ITERATIONS_DIR):
        if not o.resume and stale.exists():
            shutil.rmtree(stale)  # a new run (with --overwrite): nothing of the old run is kept
    replicas = int(strategy.num_replicas_in_sync) if strategy is not None else 1
    logger.info("Distribution: %s (%d replica%s)", mode, replicas, "s" * (replicas != 1))

    def write_iteration(c) -> None:  # every iteration's classes, to take another than the reported
        write_clusters(table, c.labels, c.posteriors, iteration_star(out, c.iteration))

    result = run_em(
        store, rows, cfg, checkpoint_dir=ckpt, resume=o.resume, init_extractor_weights=init_weights,
        strategy=strategy, on_iteration=None if o.no_iteration_stars else write_iteration,
    )  # fmt: skip

    write_clusters(table, result.labels, result.posteriors, out / "clusters.star")
    _write_history(out / "history.tsv", result.history, result.best_iteration, ks)
    with atomic_path(out / FEATURES_FILE) as tmp:
        np.save(tmp, result.features)
    mixture = {
        "pca": result.pca,
        "gmm": result.gmm,
        "component_to_label": result.component_to_label,
    }
    with atomic_path(out / MIXTURE_FILE) as tmp, open(tmp, "wb") as fh:
        pickle.dump(mixture, fh)
    with atomic_path(out / MODEL_FILE) as tmp:
        result.extractor.save(tmp)
    run_cfg = {
        "box": box, "width_scale": cfg.width_scale, "feature_dim": cfg.feature_dim, "kmax": max(ks),
        "k": result.k, "pca_dim": cfg.pca_dim, "best_iteration": result.best_iteration,
        "precision": cfg.precision, "seed": cfg.seed, "n_particles": n,
        "input_dropout": cfg.input_dropout, "predict_rotations": cfg.predict_rotations,
    }  # fmt: skip
    write_text_atomic(out / RUN_CONFIG, json.dumps(run_cfg, indent=1) + "\n")
    _plots(
        out,
        store,
        rows,
        result.labels,
        result.features,
        result.pca,
        result.history,
        result.best_iteration,
    )
    extra = {}
    if o.decode_centers:
        extra = _decode(
            o, out, store, rows, result.features, result.labels, box, angpix, cfg.width_scale
        )
    sizes = np.bincount(result.labels).tolist()
    logger.info("K = %d (iteration %d); class sizes %s", result.k, result.best_iteration, sizes)
    return {
        "n_particles": n, "k": result.k, "best_iteration": result.best_iteration,
        "iterations": len(result.history), "converged": result.converged, "class_sizes": sizes,
        "precision": precision, "distribute": mode, "replicas": replicas, **extra,
    }  # fmt: skip


def _assign(
    o: Options,
    out: Path,
    table,
    store,
    rows,
    ref_cfg: dict,
    precision: str,
    shard_info: dict | None = None,
) -> dict:
    from ..cluster.em import assign
    from ..model import yopo as Y

    cfg = Y.YopoConfig(
        store.box,
        int(ref_cfg["kmax"]),
        float(ref_cfg["width_scale"]),
        int(ref_cfg["feature_dim"]),
        precision,
    )
    extractor = Y.feature_extractor(Y.build_yopo(cfg))
    try:
        extractor.load_weights(Path(o.model) / MODEL_FILE)
        with open(Path(o.model) / MIXTURE_FILE, "rb") as fh:
            mixture = pickle.load(fh)
    except Exception as exc:
        raise file_error(
            o.model, f"--model: cannot load the trained run ({type(exc).__name__}: {exc})"
        ) from None
    # runs from before --predict-rotations computed their features from the subtomogram alone
    rotations = int(ref_cfg.get("predict_rotations", 1))
    a = assign(
        extractor, mixture, store, rows, rotations=rotations, seed=int(ref_cfg.get("seed", 0))
    )
    write_clusters(table, a.labels, a.posteriors, out / "clusters.star")
    with atomic_path(out / FEATURES_FILE) as tmp:
        np.save(tmp, a.features)
    sizes = np.bincount(a.labels, minlength=a.posteriors.shape[1]).tolist()
    if shard_info is not None:
        meta = dict(
            shard_info, model=str(Path(o.model).resolve()), model_sha256=model_fingerprint(o.model),
            k=int(a.posteriors.shape[1]), feature_dim=int(a.features.shape[1]),
        )  # fmt: skip
        write_text_atomic(out / SHARD_FILE, json.dumps(meta) + "\n")
        return {"n_particles": len(table), "shard": f"{meta['shard']}/{meta['n_shards']}",
                "k": meta["k"], "class_sizes": sizes, "model": str(o.model)}  # fmt: skip
    _plots(out, store, rows, a.labels, a.features, mixture["pca"])
    return {
        "n_particles": len(table),
        "k": int(a.posteriors.shape[1]),
        "class_sizes": sizes,
        "model": str(o.model),
    }


def merge_shards(o: Options) -> dict:
    """Merge ``--shard`` runs (``o.merge_shards``) into ``o.o`` in the input's original row order."""

    if not o.o:
        raise UserError("--o: the output folder is required")
    if o.i or o.model or o.shard or o.init_model or o.resume:
        raise UserError("--merge-shards: takes only the shard folders and --o")
    shards = [read_shard(d, FEATURES_FILE) for d in o.merge_shards]
    table, feats, first = merge(shards)
    df = table.particles
    n_shards, n = int(first["n_shards"]), int(first["n_rows"])
    out = Path(o.o)
    names = ["clusters.star", FEATURES_FILE]
    if table.flavour == "relion5":
        names += [
            str(p.relative_to(out))
            for k, p in relion5_paths(out / "clusters.star").items()
            if k != "particles"
        ]
    inputs = [
        Path(d) / x for d in o.merge_shards for x in (SHARD_FILE, "clusters.star", FEATURES_FILE)
    ]
    check_not_input([out / p for p in names], inputs)
    prepare_output_dir(out, o.overwrite, names)
    write_particles(out / "clusters.star", table, overwrite=True)
    with atomic_path(out / FEATURES_FILE) as tmp:
        np.save(tmp, feats)
    classes = df[CLASS].to_numpy(dtype=np.int64)
    logger.info("Merged %d shards: %d particles", n_shards, n)
    return {
        "n_particles": n, "n_shards": n_shards, "input": first.get("input"),
        "model": first.get("model"), "class_sizes": np.bincount(classes)[1:].tolist(),
    }  # fmt: skip


SPEC = ToolSpec(
    name="disca_cluster",
    doc=__doc__,
    options=Options,
    run=run,
    output_dir=_output_dir,
    relion_inputs={"in_parts": "i"},
    relion_nodes=lambda o: [(f"{o.o.rstrip('/')}/clusters.star", "particles")],
)


# a multi-worker process: whether it has joined the workers' cluster, and its scratch --o
_WORKER: dict = {"joined": False, "scratch": None}


def _remove_scratch() -> None:
    """Remove a non-chief worker's temporary output folder (at exit)."""
    if _WORKER["scratch"]:
        shutil.rmtree(_WORKER["scratch"], ignore_errors=True)


def main(argv=None) -> int:
    try:
        status = run_tool(SPEC, argv)
    except BaseException:
        if not _WORKER["joined"]:
            raise
        traceback.print_exc()
        status = 1
    if _WORKER["joined"] and status != 0:
        # a failed worker can block at exit in TensorFlow's coordination service, waiting for its
        # peers (seen in tests/test_distribute.py): end the process now so the job fails, not hangs
        _remove_scratch()  # os._exit skips atexit
        from ..cluster.mixture import stop_workers

        stop_workers()  # the mixture workers too, which would otherwise outlive this process
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
