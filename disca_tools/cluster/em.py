"""The generalized EM loop of DISCA (METHOD.md steps 1–6): train, resume, predict, fine-tune.

Iteration ``t`` (0, 1, …, ``max_iter``):

1. features of all N subtomograms, inference mode (streamed from the store).
   With ``calibrate_bn`` (not in the paper; off by default) every BatchNormalization layer's
   moving statistics are first set to those of the clean data (a seeded sample of
   ``calibrate_samples``): the untrained network's initial statistics normalise nothing, and those
   gathered in training describe inputs under the GaussianDropout noise, not the inputs the
   features are computed from;
2. PCA to ``pca_dim`` (with ``pca_trained_classes``, not in the paper and off by default, at most
   M − 1 dimensions after a round trained on M classes: :meth:`EMConfig.mixture_pca_dim`; the
   descriptors of ``init`` "invariants"/"voxels" at iteration 0 to ``init_pca_dim``, if set;
   with ``projection`` "lda", not in the paper and off by default, from iteration 1 on the
   features' projection on the previous clusters' K − 1 discriminant directions instead, and with
   ``init_refine`` "lda" iteration 0's clusters of the descriptors refined at their K by
   LDA-k-means: :mod:`disca_tools.cluster.discriminant`);
   full-covariance Gaussian mixtures for every candidate K, the paper's BIC
   (:func:`disca_tools.cluster.mixture.select_mixture`: inherited + de-novo fit for the current K,
   empty clusters dropped);
3. labels = argmax posterior; when K is unchanged they are renumbered to match iteration t−1
   (Hungarian on the contingency table); when K changes (and at the first iteration) the softmax
   head is replaced and trained alone on the fixed features — a regularised logistic regression in
   the PCA space the clusters were found in (:func:`warm_up_head`);
4. DDBI (O(N)) of the labels in PCA space; the best DDBI is kept;
5. unless finished, YOPO is trained on the N originals + N rotated copies with smoothed labels
   ``(1 − α)·onehot + α/K`` (α = α₀·0.9ᵗ), categorical hinge loss, Nadam (lr·decayᵗ), fresh
   optimizer state each iteration; with ``train_clusters`` > K (not in the paper; off by default)
   the training labels are a finer partition, each cluster split by k-means into sub-clusters
   (about ``train_clusters`` in all), and the head is warmed up on them afresh each iteration
   (from the first trained network on: iteration 0 of a fresh network trains on the K clusters);
   when the iteration-0 clusters come from the data (``init`` "invariants" or "voxels") the first
   round lasts ``init_epochs`` (if set): re-clustering a barely trained random network throws them
   away;
6. stop when K is unchanged and ≥ 99 % of labels keep their cluster for 3 consecutive iterations,
   or at ``max_iter``. The last iteration is a clustering without training after it.

Which iteration is reported. The clustering of iteration 0 comes from the untrained (random)
network unless a trained model was given: its DDBI is recorded but it can never be the result, since
a random network's features may score well while carrying no learned structure (the reference code
then saves nothing). The result is the eligible iteration with the lowest DDBI. Iteration 1 is not
eligible either when the training after it is on sub-clusters (``train_clusters`` > its K): its
network was trained on the K clusters, later ones on sub-clusters, and a network trained on K
labels pulls each cluster tight in its features, so iteration 1's DDBI is not comparable with
theirs (it won every time in the Table S1 runs, whatever happened later).

Defaults, changed from the reference and why: lr 1e-3 (reference 1e-5, which barely moves the
network in one epoch, METHOD.md), 2 epochs per iteration (reference 1), batch 32 (reference 64:
twice the steps per epoch), BatchNormalization momentum 0.9 (Keras' 0.99 leaves the moving
statistics used for inference-mode features near their initial values after one iteration on a
small set); lr decay 0.95 and α₀ = 0.2 with decay 0.9 as in the reference; candidate K 2–20 and
PCA 16 as in the paper. These were checked on small simulated sets of three real structures
(24³, SNR 1–10, width 0.1) only; they have not yet been tuned against the Table S1 benchmark.
With few particles lower ``pca_dim`` (full covariances need ≫ P²/2 points per cluster).

Reproducibility. Every random draw of iteration t is seeded from (seed, t): Keras/TF global seeds,
the dropout layer's state, the data order and rotations, the mixtures. The optimizer state is
reset each iteration, so a run resumed from the checkpoint of iteration t (weights, labels, state)
repeats the uninterrupted run exactly on the same machine.

Distribution. ``run_em(..., strategy=...)`` builds and compiles the network in a ``tf.distribute``
strategy's scope and trains on global batches of ``batch_size`` × replicas. With a multi-worker
strategy each worker computes every feature itself (no cross-worker gather) and repeats the same
seeded mixture fits, so all workers take the same decisions; only the caller decides who writes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.store import SubtomogramStore
from ..model import yopo as Y
from ..model.data import gather, predict_features, train_dataset
from ..model.distribute import is_multiworker
from ..runtime.errors import UserError
from ..runtime.log import check_abort, logger
from ..runtime.outputs import atomic_path, write_text_atomic
from .config import EMConfig
from .discriminant import fit_discriminant_projection, refine_by_discriminants
from .invariants import invariant_features
from .matching import match_labels
from .mixture import fit_pca, nested_subclusters, select_initial_mixture, select_mixture
from .training import Trainer, sync_batchnorm_statistics

CHECKPOINT_STATE = "state.json"
CHECKPOINT_WEIGHTS = "weights.weights.h5"
CHECKPOINT_LABELS = "labels.npy"
BEST_DIR = "best"
INACTIVE_BIAS = -1e4
# settings a continued run may change without a warning: more iterations, more mixture processes
# (whose results do not depend on their number)
_NOT_IN_RESULTS = {"max_iter", "mixture_jobs"}


@dataclass
class IterationRecord:
    """One row of history.tsv."""

    iteration: int
    k: int
    bic_by_k: dict[int, float]
    ddbi: float
    frac_changed: float
    loss: float
    seconds: float
    lr: float
    alpha: float
    eligible: bool
    inherited: bool
    seconds_features: float = 0.0
    seconds_mixture: float = 0.0
    seconds_train: float = 0.0
    epochs: int = 0  # training epochs after this iteration's clustering (0: not trained)


@dataclass(frozen=True)
class IterationClustering:
    """What ``run_em``'s ``on_iteration`` callback sees of an iteration: its clustering (labels
    matched to the previous iteration's), before the network is trained on it."""

    iteration: int
    k: int
    labels: np.ndarray
    x: np.ndarray  # the points the mixtures were fitted to (PCA of the features or descriptors)
    eligible: bool
    posteriors: np.ndarray  # (N, K), columns in the order of ``labels``


@dataclass
class EMResult:
    """The reported (best-DDBI) iteration's clustering and what is needed to reuse it."""

    labels: np.ndarray
    posteriors: np.ndarray
    features: np.ndarray
    pca: Any
    gmm: Any
    component_to_label: np.ndarray
    best_iteration: int
    history: list[IterationRecord]
    extractor: Any
    converged: bool
    config: EMConfig

    @property
    def k(self) -> int:
        return int(self.posteriors.shape[1])


# ----------------------------------------------------------------------------- helpers


def smooth_targets(
    labels: np.ndarray, k: int, alpha: float, width: int | None = None
) -> np.ndarray:
    """``(1 − α)·onehot + α/K`` as float32 (N, width), zero beyond the K active classes."""
    width = k if width is None else int(width)
    out = np.zeros((len(labels), width), dtype=np.float32)
    out[:, :k] = alpha / k
    out[np.arange(len(labels)), np.asarray(labels)] += 1.0 - alpha
    return out


def iteration_seed(seed: int, iteration: int) -> int:
    return int((int(seed) * 100003 + int(iteration) * 7919 + 17) % (2**31 - 1))


def _set_seeds(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(int(seed))


def _save_weights(model, path: Path) -> None:
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    model.save_weights(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, arr)


def _save_pickle(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        pickle.dump(obj, fh)


def _permute_posteriors(post: np.ndarray, mapping: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reorder posterior columns so column ``mapping[c]`` holds component ``c``."""
    k = post.shape[1]
    comp_to_label = np.array([mapping[c] for c in range(k)], dtype=np.int64)
    out = np.empty_like(post)
    out[:, comp_to_label] = post
    return out, comp_to_label


def warm_up_head(
    model,
    features: np.ndarray | None,
    labels: np.ndarray,
    k: int,
    cfg: EMConfig,
    seed: int,
    pca: Any = None,
) -> float:
    """Replace the head by one for ``k`` clusters (``labels``), before the network is trained.

    The head layer has ``cfg.head_units`` units; the first ``k`` are set here and the others are
    switched off (zero kernel, bias −10⁴: their softmax output and gradients are exactly zero, so
    training never revives them), which replaces the classification layer without rebuilding and
    retracing the network.

    With ``pca`` (the PCA of ``features`` in which the clusters were found) the head is trained
    alone on the fixed features: a multinomial logistic regression (L-BFGS, C = ``cfg.head_c``) on
    the PCA-reduced, standardised features, composed with the PCA into one linear layer on the
    features. It uses only the directions the clusters live in. (Fitting it on all F feature
    dimensions instead lets it agree with any labelling when F approaches N — 1024 features,
    a few thousand particles — through directions that are noise; the network then learns to
    reproduce those and forgets the classes: measured with benchmarks/probe_em_dynamics.py.)
    Without ``pca`` (the clusters came from something else: voxels, invariant descriptors) the
    head is re-initialised at random and learns with the network (``features`` may then be None).
    Returns the agreement of the head with ``labels`` on ``features`` (fraction of equal argmax;
    NaN without features).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    head = Y.head_layer(model)
    units = int(head.units)
    if k > units:
        raise ValueError(f"head has {units} units, {k} clusters asked for")
    labels = np.asarray(labels)
    x = None if features is None else np.asarray(features, dtype=np.float64)
    n_features = int(head.kernel.shape[0])
    full_kernel = np.zeros((n_features, units))
    full_bias = np.full(units, INACTIVE_BIAS)
    if pca is None:
        import keras

        init = keras.initializers.Orthogonal(seed=int(seed) % (2**31 - 1))
        full_kernel[:, :k] = np.asarray(init((n_features, k)))
        full_bias[:k] = 0.0
    else:
        z = pca.transform(x)
        mu, sd = z.mean(axis=0), z.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        clf = LogisticRegression(C=cfg.head_c, max_iter=cfg.head_max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit((z - mu) / sd, labels)
        coef, icpt = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:  # binary: one logit difference, split symmetrically
            coef = np.vstack([-coef / 2, coef / 2])
            icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
        # logits = ((pca(x) − μ)/σ)·coefᵀ + b, with pca(x) = (x − mean)·componentsᵀ (no whitening)
        w_z = (coef / sd).T  # (P, classes)
        kernel = pca.components_.T @ w_z  # (F, classes)
        bias = icpt - (mu + pca.mean_ @ pca.components_.T) @ w_z
        full_kernel[:, clf.classes_] = kernel
        full_bias[clf.classes_] = bias
    head.set_weights([full_kernel.astype(np.float32), full_bias.astype(np.float32)])
    if x is None:
        return float("nan")
    agreement = float(np.mean(np.argmax(x @ full_kernel + full_bias, axis=1) == labels))
    logger.debug(
        "head warm-up (%s): agreement %.3f", "fit" if pca is not None else "random", agreement
    )
    return agreement


def _state_dict(
    cfg: EMConfig,
    it: int,
    k: int,
    stable: int,
    best_it: int,
    best_ddbi: float,
    history: list[IterationRecord],
    box: int,
) -> dict:
    return {
        "config": asdict(cfg),
        "box": box,
        "iteration": it,
        "k": k,
        "stable": stable,
        "best_iteration": best_it,
        "best_ddbi": best_ddbi,
        "history": [asdict(h) for h in history],
    }


def _history_from(rows: list[dict]) -> list[IterationRecord]:
    out = []
    for r in rows:
        r = dict(r)
        r["bic_by_k"] = {int(k): float(v) for k, v in r["bic_by_k"].items()}
        out.append(IterationRecord(**r))
    return out


def load_checkpoint(ckpt: str | Path) -> dict:
    """The state of an interrupted run (UserError when there is none)."""
    p = Path(ckpt) / CHECKPOINT_STATE
    if not p.is_file():
        raise UserError(f"{p}: no checkpoint to continue from")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: unreadable checkpoint ({exc})") from None


# ----------------------------------------------------------------------------- the loop


def voxel_pca_features(
    store: SubtomogramStore, rows: np.ndarray, dim: int, seed: int, batch: int = 1024
) -> np.ndarray:
    """PCA of the (normalised) voxels, streamed (IncrementalPCA over batches): ``(N, dim)``.

    Used by ``init="voxels"`` to start the loop from clusters of the data itself rather than of an
    untrained network's features (which carry little class information at low SNR; see
    benchmarks/probe_initial_features.py). Two passes over the store, memory O(batch · S³ + dim · S³).
    """
    from sklearn.decomposition import IncrementalPCA

    n = len(rows)
    dim = int(min(dim, n - 1, store.box**3))
    step = max(batch, dim)
    ipca = IncrementalPCA(n_components=dim)
    chunks = [rows[s : s + step] for s in range(0, n, step)]
    if len(chunks) > 1 and len(chunks[-1]) < dim:  # IncrementalPCA needs ≥ dim rows per batch
        chunks[-2] = np.concatenate([chunks[-2], chunks.pop()])
    for chunk in chunks:
        check_abort()
        ipca.partial_fit(gather(store, chunk).reshape(len(chunk), -1))
    out = np.empty((n, dim), dtype=np.float64)
    for s in range(0, n, step):
        part = rows[s : s + step]
        out[s : s + len(part)] = ipca.transform(gather(store, part).reshape(len(part), -1))
    return out


def run_em(
    store: SubtomogramStore,
    rows: np.ndarray,
    cfg: EMConfig,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    init_extractor_weights: str | Path | None = None,
    strategy=None,
    on_iteration: Callable[[IterationClustering], None] | None = None,
) -> EMResult:
    """Run DISCA on the subtomograms ``store[rows]`` and return the best-DDBI iteration.

    ``checkpoint_dir`` receives, after every trained iteration, the network weights, the labels and
    the state (atomically), and the best iteration so far in ``best/``; ``resume`` continues from
    the last trained iteration (a final, untrained iteration is recomputed: it is deterministic).
    ``init_extractor_weights`` (a trained run's ``model.keras``) starts from a trained feature
    extractor (fine-tuning): then iteration 0 is eligible to be reported.

    ``strategy`` (a ``tf.distribute`` strategy, see :func:`disca_tools.model.distribute.make_strategy`):
    the network, its optimizer and head are built and compiled in its scope and trained on global
    batches of ``cfg.batch_size`` × replicas (each batch split among the replicas). With a
    multi-worker strategy every worker computes all the features itself and repeats the same
    deterministic mixture fits, so all workers agree on K and the labels.

    ``on_iteration`` is called with every iteration's :class:`IterationClustering` (to watch the
    loop, e.g. score each iteration against known classes); it must not change its arrays.
    """
    from .ddbi import ddbi

    rows = np.asarray(rows, dtype=np.int64)
    n, box = len(rows), store.box
    cfg.check(n, box)
    cfg.warn_skipped_k(n)
    kmax = cfg.head_units
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        (ckpt / BEST_DIR).mkdir(parents=True, exist_ok=True)

    history: list[IterationRecord] = []
    prev_labels: np.ndarray | None = None
    prev_k: int | None = None
    stable = 0
    best_it, best_ddbi = -1, math.inf
    best: dict[str, Any] | None = None
    start = 0
    pretrained = init_extractor_weights is not None

    import contextlib

    def scope():
        return strategy.scope() if strategy is not None else contextlib.nullcontext()

    replicas = int(strategy.num_replicas_in_sync) if strategy is not None else 1
    local_predict = strategy is not None and is_multiworker(strategy)
    global_batch = cfg.batch_size * replicas
    if replicas > 1:
        logger.info(
            "Training on %d replicas: global batch %d (%d per replica)",
            replicas, global_batch, cfg.batch_size,
        )  # fmt: skip
    _set_seeds(iteration_seed(cfg.seed, -1))
    with scope():
        model = Y.build_yopo(cfg.yopo(box, kmax), seed=cfg.seed)
    k_trained = 0  # classes the network was last trained on (0: not trained in this run)
    if resume:
        if ckpt is None:
            raise ValueError("resume needs a checkpoint directory")
        state = load_checkpoint(ckpt)
        if int(state["box"]) != box or int(state["kmax"]) != kmax:
            raise UserError(
                f"{ckpt / CHECKPOINT_STATE}: checkpoint is for box {state['box']} and K ≤ {state['kmax']}; "
                f"this run has box {box} and K ≤ {kmax}"
            )
        history = _history_from(state["history"])
        start = int(state["iteration"]) + 1
        prev_k = int(state["k"])
        prev_labels = np.load(ckpt / CHECKPOINT_LABELS)
        if len(prev_labels) != n:
            raise UserError(
                f"{ckpt / CHECKPOINT_LABELS}: checkpoint has {len(prev_labels)} particles, data {n}"
            )
        stable = int(state["stable"])
        best_it, best_ddbi = int(state["best_iteration"]), float(state["best_ddbi"])
        pretrained = bool(state.get("pretrained", False))
        k_trained = int(state.get("k_trained", 0))
        with scope():
            model.load_weights(ckpt / CHECKPOINT_WEIGHTS)
        changed = {
            key: (old, asdict(cfg).get(key))
            for key, old in state["config"].items()
            if key not in _NOT_IN_RESULTS and asdict(cfg).get(key) != old
        }
        if changed:
            logger.warning(
                "Continuing with settings that differ from the checkpoint's: %s", changed
            )
        logger.info("Continuing after iteration %d (K=%d)", start - 1, prev_k)
    elif init_extractor_weights is not None:
        try:
            with scope():
                Y.feature_extractor(model).load_weights(init_extractor_weights)
        except Exception as exc:
            raise UserError(
                f"{init_extractor_weights}: cannot load into this network ({type(exc).__name__}: {exc})"
            ) from None
    with scope():
        trainer = Trainer(model, cfg.lr, strategy)
        extractor = Y.feature_extractor(model)
    converged = False
    for it in range(start, cfg.max_iter + 1):
        check_abort()
        t0 = time.time()
        seed_it = iteration_seed(cfg.seed, it)
        _set_seeds(seed_it)
        if cfg.calibrate_bn:
            sample = np.random.default_rng(seed_it).permutation(rows)[: cfg.calibrate_samples]
            Y.calibrate_batchnorm(model, gather(store, np.sort(sample)), cfg.predict_batch_size)
        # iteration-0 clusters from the data itself (not from the random network's features,
        # which are then not computed: nothing uses them, and they cost a prediction pass)
        from_data = it == 0 and not pretrained and cfg.init != "network"
        feats = None
        if not from_data:
            feats = predict_features(
                extractor, store, rows, cfg.predict_batch_size * replicas, local=local_predict,
                rotations=cfg.predict_rotations, seed=cfg.seed,
            )  # fmt: skip
            if not np.all(np.isfinite(feats)):
                raise UserError("features: the network produced NaN/inf (try a lower --lr)")
        t1 = time.time()
        if from_data and cfg.init == "voxels":
            pca, x = None, voxel_pca_features(store, rows, cfg.init_pca_components, seed_it)
        elif from_data and cfg.init == "invariants":
            inv = invariant_features(store, rows)
            x = fit_pca(inv, cfg.init_pca_components, seed_it).transform(inv)
            pca = None  # the clusters are not in the network's feature space
        elif cfg.projection == "lda" and prev_labels is not None and prev_k >= 2:
            pca = fit_discriminant_projection(feats, prev_labels, seed_it)
            x = pca.transform(feats)
        else:
            pca = fit_pca(feats, cfg.mixture_pca_dim(k_trained), seed_it)
            x = pca.transform(feats)
        if from_data:
            sel = select_initial_mixture(
                x, cfg.k_candidates, seed_it, cfg.init_covariance, cfg.mixture_jobs
            )
            if cfg.init_refine == "lda" and sel.k >= 2:  # one cluster has no directions
                descriptors = inv if cfg.init == "invariants" else x
                sel, x = refine_by_discriminants(descriptors, sel, seed_it)
        else:
            sel = select_mixture(
                x, cfg.k_candidates, seed_it, prev_labels=prev_labels, prev_k=prev_k,
                n_jobs=cfg.mixture_jobs,
            )  # fmt: skip
        k = sel.k
        mapping = {c: c for c in range(k)}
        labels = sel.labels
        same_k = prev_labels is not None and k == prev_k
        if same_k:
            labels, mapping = match_labels(prev_labels, sel.labels)
        post, comp_to_label = _permute_posteriors(sel.posteriors, mapping)
        frac = float(np.mean(labels != prev_labels)) if same_k else 1.0
        score = ddbi(x, labels)
        stable = stable + 1 if (same_k and frac <= 1.0 - cfg.stable_fraction) else 0
        converged = stable >= cfg.patience
        trained = it < cfg.max_iter and not converged
        # over-clustering: training on sub-clusters of the K clusters keeps the network from
        # learning to ignore what differs inside a cluster (two merged classes stay separable).
        # Not at iteration 0 of a fresh network: sub-clusters of untrained features (or of the
        # iteration-0 descriptors) are mostly noise, and the first round learns the K.
        on_subclusters = trained and cfg.train_clusters > k and (it >= 1 or pretrained)
        # see "Which iteration is reported" above: a fresh network's iteration 0 never; iteration
        # 1 (features of a network trained on the K clusters) not when sub-cluster training follows
        eligible = math.isfinite(score) and (
            pretrained or it >= 2 or (it == 1 and not on_subclusters)
        )
        if on_iteration is not None:
            on_iteration(IterationClustering(it, k, labels, x, bool(eligible), post))
        if eligible and score < best_ddbi:
            best_it, best_ddbi = it, score
            best = {
                "labels": labels,
                "posteriors": post,
                "features": feats,
                "mixture": {"pca": pca, "gmm": sel.gmm, "component_to_label": comp_to_label},
                "weights": [np.array(w) for w in extractor.get_weights()],
            }
            if ckpt is not None:
                b = ckpt / BEST_DIR
                _save_npy(b / "labels.npy", labels)
                _save_npy(b / "posteriors.npy", post)
                _save_npy(b / "features.npy", feats)
                _save_pickle(b / "mixture.pkl", best["mixture"])
                _save_weights(extractor, b / "extractor.weights.h5")
        t2 = time.time()
        lr = cfg.lr * cfg.lr_decay**it
        alpha = cfg.label_smoothing * cfg.smoothing_decay**it
        loss, epochs = float("nan"), 0
        if trained:
            train_labels, k_train = labels, k
            if on_subclusters:
                train_labels, parent = nested_subclusters(x, labels, cfg.train_clusters, seed_it)
                k_train = len(parent)
                warm_up_head(model, feats, train_labels, k_train, cfg, seed_it, pca)
            elif (
                not same_k
            ):  # new K (or first iteration): a fresh head, warmed up on fixed features
                warm_up_head(model, feats, labels, k, cfg, seed_it, pca)
            Y.reset_dropout_seed(model, seed_it)
            targets = smooth_targets(train_labels, k_train, alpha, kmax)
            ds = train_dataset(
                store, rows, targets, global_batch, seed_it, cfg.augment, multiple=replicas
            )
            epochs = cfg.init_epochs if from_data and cfg.init_epochs > 0 else cfg.epochs_per_iter
            loss = trainer.fit(ds, epochs, lr)
            k_trained = k_train
            if replicas > 1:  # before the checkpoint, so that --continue resumes the same network
                sync_batchnorm_statistics(model, strategy)
        t3 = time.time()
        rec = IterationRecord(
            iteration=it,
            k=k,
            bic_by_k={int(a): float(b) for a, b in sel.bic_by_k.items()},
            ddbi=float(score),
            frac_changed=frac,
            loss=loss,
            seconds=round(t3 - t0, 3),
            lr=lr,
            alpha=alpha,
            eligible=bool(eligible),
            inherited=bool(sel.inherited),
            seconds_features=round(t1 - t0, 3),
            seconds_mixture=round(t2 - t1, 3),
            seconds_train=round(t3 - t2, 3),
            epochs=epochs,
        )
        history.append(rec)
        logger.info(
            "iteration %d: K=%d DDBI=%.4g changed=%.3f loss=%.4g "
            "(%.1f s: features %.1f, mixtures %.1f, training %.1f)%s",
            it, k, score, frac, loss, rec.seconds, t1 - t0, t2 - t1, t3 - t2,
            " *" if best_it == it else "",
        )  # fmt: skip
        prev_labels, prev_k = labels, k
        if ckpt is not None and trained:
            _save_weights(model, ckpt / CHECKPOINT_WEIGHTS)
            _save_npy(ckpt / CHECKPOINT_LABELS, labels)
            state = _state_dict(cfg, it, k, stable, best_it, best_ddbi, history, box)
            state.update(pretrained=pretrained, kmax=kmax, k_trained=k_trained)
            write_text_atomic(ckpt / CHECKPOINT_STATE, json.dumps(state, indent=1))
        if converged:
            logger.info("Converged at iteration %d", it)
            break

    if best is None:
        if ckpt is not None and best_it >= 0:
            best = _load_best(ckpt, cfg, box)
        else:
            raise UserError("clustering: no iteration produced a valid clustering (K ≥ 2)")
    ext_model = Y.feature_extractor(Y.build_yopo(cfg.yopo(box, kmax), seed=cfg.seed))
    ext_model.set_weights(best["weights"])
    return EMResult(
        labels=np.asarray(best["labels"]),
        posteriors=np.asarray(best["posteriors"]),
        features=np.asarray(best["features"]),
        pca=best["mixture"]["pca"],
        gmm=best["mixture"]["gmm"],
        component_to_label=np.asarray(best["mixture"]["component_to_label"]),
        best_iteration=best_it,
        history=history,
        extractor=ext_model,
        converged=converged,
        config=cfg,
    )


def _load_best(ckpt: Path, cfg: EMConfig, box: int) -> dict[str, Any]:
    b = ckpt / BEST_DIR
    with open(b / "mixture.pkl", "rb") as fh:
        mixture = pickle.load(fh)
    ext = Y.feature_extractor(Y.build_yopo(cfg.yopo(box, cfg.head_units), seed=cfg.seed))
    ext.load_weights(b / "extractor.weights.h5")
    return {
        "labels": np.load(b / "labels.npy"),
        "posteriors": np.load(b / "posteriors.npy"),
        "features": np.load(b / "features.npy"),
        "mixture": mixture,
        "weights": ext.get_weights(),
    }


# ----------------------------------------------------------------------------- using a trained model


@dataclass
class Assignment:
    labels: np.ndarray
    posteriors: np.ndarray
    features: np.ndarray


def assign(
    extractor,
    mixture: dict,
    store: SubtomogramStore,
    rows: np.ndarray,
    batch_size: int = 64,
    rotations: int = 1,
    seed: int = 0,
) -> Assignment:
    """Assign subtomograms to a trained run's clusters: features → PCA → mixture posterior
    (``rotations``, ``seed``: the training run's, so that the features are computed alike)."""
    feats = predict_features(extractor, store, np.asarray(rows), batch_size, False, rotations, seed)
    x = mixture["pca"].transform(feats)
    post_c = mixture["gmm"].predict_proba(x)
    c2l = np.asarray(mixture["component_to_label"])
    post = np.empty_like(post_c)
    post[:, c2l] = post_c
    return Assignment(np.argmax(post, axis=1).astype(np.int64), post, feats)
