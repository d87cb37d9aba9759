"""The generalized EM loop: targets, head replacement, reproducibility, resuming."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
from pathlib import Path

import numpy as np
import pytest

from disca_tools.cluster import em
from disca_tools.io.store import SubtomogramStore
from disca_tools.model import yopo as Y
from disca_tools.runtime.errors import UserError
from disca_tools.simulate.imaging import Imaging
from disca_tools.simulate.subtomograms import simulate_subtomogram_set

TINY = dict(
    k_candidates=[2, 3, 4], pca_dim=4, max_iter=2, epochs_per_iter=1, batch_size=16,
    width_scale=0.05, feature_dim=16, precision="float32", seed=7,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_store():
    sim = simulate_subtomogram_set(["4v4r", "1s3x", "3d2f"], 20, 24, 10.0, 10.0, Imaging(), seed=2)
    return SubtomogramStore(sim.volumes, [f"p{i}" for i in range(len(sim.volumes))], Path("mem"))


def test_smooth_targets():
    t = em.smooth_targets(np.array([0, 2, 1]), 3, 0.2, width=5)
    np.testing.assert_allclose(t[0], [0.8 + 0.2 / 3, 0.2 / 3, 0.2 / 3, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-6)
    assert np.argmax(t, axis=1).tolist() == [0, 2, 1]


def _head_probs(model, feats):
    head = Y.head_layer(model)
    inp = Y.keras.Input((feats.shape[1],))
    return Y.keras.Model(inp, head(inp)).predict(feats, verbose=0)


def test_head_replacement_agrees_with_labels_and_switches_off_unused_units():
    from disca_tools.cluster.mixture import fit_pca

    rng = np.random.default_rng(0)
    model = Y.build_yopo(Y.YopoConfig(24, 6, 0.05, 16))
    centres = rng.normal(0, 3, size=(3, 16))
    labels = np.repeat(np.arange(3), 40)
    feats = (centres[labels] + rng.normal(size=(120, 16))).astype(np.float32)
    cfg = em.EMConfig(k_candidates=[2, 3, 6])
    agreement = em.warm_up_head(model, feats, labels, 3, cfg, seed=0, pca=fit_pca(feats, 4, 0))
    assert agreement >= 0.98
    probs = _head_probs(model, feats)
    assert np.mean(np.argmax(probs, 1) == labels) >= 0.98
    assert np.all(probs[:, 3:] == 0.0)  # inactive units: exactly zero probability (and gradient)
    # no PCA (clusters not from these features): a random head, still only 3 live units
    em.warm_up_head(model, feats, labels, 3, cfg, seed=0)
    probs = _head_probs(model, feats)
    assert np.all(probs[:, 3:] == 0.0) and np.mean(np.argmax(probs, 1) == labels) < 0.9


def test_head_is_not_fitted_to_noise_directions():
    """Clusters that live in a few PCA directions, buried in many feature dimensions of pure noise
    (F close to N, as 1024 features of a few thousand particles are): the head follows the cluster
    directions, so a labelling that is *not* in them is not memorised."""
    from disca_tools.cluster.mixture import fit_pca

    rng = np.random.default_rng(1)
    n, f = 150, 120
    feats = rng.normal(size=(n, f))
    feats[:, 0] *= 10.0  # one strong direction carrying two clusters
    feats[:75, 0] += 80.0
    pca = fit_pca(feats, 4, 0)
    cfg = em.EMConfig(k_candidates=[2, 3])
    model = Y.build_yopo(Y.YopoConfig(24, 3, 0.05, f))
    clusters = (np.arange(n) < 75).astype(int)
    assert em.warm_up_head(model, feats, clusters, 2, cfg, 0, pca=pca) >= 0.98
    arbitrary = rng.integers(0, 2, size=n)  # a labelling only noise directions could separate
    assert em.warm_up_head(model, feats, arbitrary, 2, cfg, 0, pca=pca) < 0.7


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="too few"):
        em.EMConfig(k_candidates=[2, 3], pca_dim=16).check(20, 24)
    with pytest.raises(UserError, match="box"):
        em.EMConfig().check(1000, 16)
    with pytest.raises(UserError, match="max-iter"):
        em.EMConfig(max_iter=0).check(1000, 24)


def _same(a: em.EMResult, b: em.EMResult) -> None:
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.features, b.features)
    assert a.best_iteration == b.best_iteration
    np.testing.assert_array_equal(  # NaN (untrained last iteration) compares equal here
        [(h.k, h.ddbi, h.loss, h.frac_changed) for h in a.history],
        [(h.k, h.ddbi, h.loss, h.frac_changed) for h in b.history],
    )
    for wa, wb in zip(a.extractor.get_weights(), b.extractor.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_seeded_runs_agree_and_continue_equals_uninterrupted(tiny_store, tmp_path):
    rows = np.arange(len(tiny_store))
    full = em.run_em(tiny_store, rows, em.EMConfig(**TINY), checkpoint_dir=tmp_path / "a")
    again = em.run_em(tiny_store, rows, em.EMConfig(**TINY))
    _same(full, again)
    assert len(full.history) == 3 and full.best_iteration >= 1  # never the random network alone
    assert not full.history[0].eligible and np.isfinite(full.history[-1].ddbi)
    assert np.isfinite(full.history[0].loss) and np.isnan(full.history[-1].loss)

    # "killed" after iteration 0's training: a run capped at max_iter=1 leaves that checkpoint
    cut = dict(TINY, max_iter=1)
    em.run_em(tiny_store, rows, em.EMConfig(**cut), checkpoint_dir=tmp_path / "b")
    state = json.loads((tmp_path / "b" / em.CHECKPOINT_STATE).read_text())
    assert state["iteration"] == 0  # iteration 1 was clustered but not trained: it is redone
    resumed = em.run_em(
        tiny_store, rows, em.EMConfig(**TINY), checkpoint_dir=tmp_path / "b", resume=True
    )
    _same(full, resumed)


def test_pca_of_trained_features_is_capped_at_the_trained_classes(tiny_store, tmp_path):
    """--pca-trained-classes: after a round trained on M classes the mixtures see at most M − 1
    (at least 2) principal components, iteration 0 the full --pca-dim; --continue restores M."""
    rows = np.arange(len(tiny_store))
    capped = dict(TINY, pca_dim=8, max_iter=3, pca_trained_classes=True)
    seen: list[em.IterationClustering] = []
    full = em.run_em(
        tiny_store, rows, em.EMConfig(**capped), checkpoint_dir=tmp_path / "a",
        on_iteration=seen.append,
    )  # fmt: skip
    assert seen[0].x.shape[1] == 8
    for prev, cur in zip(seen[:-1], seen[1:], strict=True):  # each round trained on the K clusters
        assert cur.x.shape[1] == max(2, min(8, prev.k - 1))
    plain: list[em.IterationClustering] = []
    em.run_em(tiny_store, rows, em.EMConfig(**dict(capped, pca_trained_classes=False)),
              on_iteration=plain.append)  # fmt: skip
    assert [c.x.shape[1] for c in plain] == [8, 8, 8, 8]
    em.run_em(
        tiny_store, rows, em.EMConfig(**dict(capped, max_iter=1)), checkpoint_dir=tmp_path / "b"
    )
    state = json.loads((tmp_path / "b" / em.CHECKPOINT_STATE).read_text())
    assert state["k_trained"] == seen[0].k
    resumed = em.run_em(
        tiny_store, rows, em.EMConfig(**capped), checkpoint_dir=tmp_path / "b", resume=True
    )
    _same(full, resumed)


def test_voxel_pca_features_match_a_one_shot_pca(tiny_store):
    """init="voxels": one batch gives PCA exactly; streamed batches keep nearly all its variance."""
    from sklearn.decomposition import PCA

    from disca_tools.model.data import gather

    rows = np.arange(len(tiny_store.volumes))[
        ::-1
    ]  # any order: rows are gathered, not assumed sorted
    full = PCA(n_components=3).fit_transform(gather(tiny_store, rows).reshape(len(rows), -1))
    whole = em.voxel_pca_features(tiny_store, rows, dim=3, seed=0, batch=len(rows))
    for c in range(3):  # same components up to sign
        assert abs(np.corrcoef(whole[:, c], full[:, c])[0, 1]) > 0.999
    streamed = em.voxel_pca_features(tiny_store, rows, dim=3, seed=0, batch=8)
    assert streamed.shape == (len(rows), 3)
    assert streamed.var(axis=0).sum() > 0.9 * full.var(axis=0).sum()


def test_training_on_subclusters_reports_the_bic_clusters(tiny_store):
    """--train-clusters: the head is sized for the sub-clusters, training runs, and the reported
    clustering is still the mixture's (K among the candidates, labels 0..K-1); with --calibrate-bn
    too, the reported extractor's normalisation statistics are the data's, not the initial ones."""
    rows = np.arange(len(tiny_store))
    cfg = em.EMConfig(**dict(TINY, max_iter=2, train_clusters=6, calibrate_bn=True))
    assert cfg.head_units == 6
    seen: list[em.IterationClustering] = []
    res = em.run_em(tiny_store, rows, cfg, on_iteration=seen.append)
    # the callback sees every iteration's clustering, as history and the result record it
    assert [c.iteration for c in seen] == [0, 1, 2]
    assert [c.k for c in seen] == [h.k for h in res.history]
    assert [c.eligible for c in seen] == [h.eligible for h in res.history]
    np.testing.assert_array_equal(seen[res.best_iteration].labels, res.labels)
    assert seen[2].x.shape == (len(rows), cfg.pca_dim)
    assert np.isfinite(res.history[0].loss) and np.isfinite(
        res.history[1].loss
    )  # sub-clusters at 1
    assert res.k in cfg.k_candidates and set(np.unique(res.labels)) == set(range(res.k))
    # iteration 1's network was trained on the K clusters, not sub-clusters: not comparable, not reported
    assert [h.eligible for h in res.history] == [False, False, True] and res.best_iteration == 2
    # every particle was in the calibration sample (60 ≤ 512): the statistics are the data's
    from disca_tools.model.data import gather

    bn = res.extractor.get_layer("features_bn")
    taps = Y.keras.Model(res.extractor.inputs, bn.input).predict(
        gather(tiny_store, rows)[..., None], verbose=0
    )
    np.testing.assert_allclose(bn.moving_mean.numpy(), taps.mean(0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), taps.var(0), rtol=1e-3, atol=1e-5)
    with pytest.raises(UserError, match="train-clusters"):
        em.EMConfig(train_clusters=-1).check(1000, 24)


def test_iteration_1_is_eligible_when_no_subcluster_training_follows(tiny_store):
    """--train-clusters ≤ K: every round trains on the K clusters, so iteration 1 is comparable with
    the later ones and may be reported (only iteration 0 of the fresh network is not)."""
    rows = np.arange(len(tiny_store))
    cfg = em.EMConfig(**dict(TINY, max_iter=2, train_clusters=2))
    res = em.run_em(tiny_store, rows, cfg)
    assert [h.eligible for h in res.history] == [False, True, True]


def test_invariant_init_clusters_the_descriptors_at_iteration_0(tiny_store):
    """--init invariants: iteration 0 clusters PCA of the rotation-invariant descriptors (the same
    K as a direct computation), then trains the network on those clusters."""
    from disca_tools.cluster.invariants import invariant_features
    from disca_tools.cluster.mixture import fit_pca, select_mixture

    rows = np.arange(len(tiny_store))
    cfg = em.EMConfig(**dict(TINY, max_iter=1, init="invariants"))
    res = em.run_em(tiny_store, rows, cfg)
    seed0 = em.iteration_seed(cfg.seed, 0)
    inv = invariant_features(tiny_store, rows)
    direct = select_mixture(
        fit_pca(inv, cfg.pca_dim, seed0).transform(inv), cfg.k_candidates, seed0
    )
    assert res.history[0].k == direct.k and np.isfinite(res.history[0].loss)


def test_init_covariance_sets_only_the_iteration_0_mixtures(tiny_store):
    """--init-covariance diag: iteration 0 selects diagonal mixtures by scikit-learn's BIC on the
    descriptors (the same fits as a direct call); the later iterations keep full covariances."""
    from disca_tools.cluster.invariants import invariant_features
    from disca_tools.cluster.mixture import fit_pca, select_mixture

    rows = np.arange(len(tiny_store))
    seen: list[em.IterationClustering] = []
    cfg = em.EMConfig(**dict(TINY, max_iter=1, init="invariants", init_covariance="diag"))
    res = em.run_em(tiny_store, rows, cfg, on_iteration=seen.append)
    seed0, seed1 = em.iteration_seed(cfg.seed, 0), em.iteration_seed(cfg.seed, 1)
    inv = invariant_features(tiny_store, rows)
    x0 = fit_pca(inv, cfg.pca_dim, seed0).transform(inv)
    diag = select_mixture(x0, cfg.k_candidates, seed0, covariance="diag", criterion="sklearn")
    full = select_mixture(x0, cfg.k_candidates, seed0)
    assert res.history[0].bic_by_k == pytest.approx(diag.bic_by_k)
    assert res.history[0].bic_by_k != pytest.approx(full.bic_by_k)
    np.testing.assert_array_equal(seen[0].labels, diag.labels)
    prev = seen[0].labels
    again = select_mixture(seen[1].x, cfg.k_candidates, seed1, prev_labels=prev, prev_k=seen[0].k)
    assert res.history[1].bic_by_k == pytest.approx(again.bic_by_k)  # full, the paper's BIC
    with pytest.raises(UserError, match="init-covariance"):
        em.EMConfig(init_covariance="spherical").check(len(rows), tiny_store.box)
    with pytest.raises(UserError, match="init-covariance diag: applies only"):
        em.EMConfig(init="network", init_covariance="diag").check(len(rows), tiny_store.box)


@pytest.mark.parametrize("init", ["invariants", "voxels"])
def test_init_pca_dim_sets_only_the_iteration_0_descriptors(tiny_store, init):
    """--init-pca-dim: iteration 0 clusters the data's descriptors in that many principal
    components (the same points as a direct PCA); the network's features keep --pca-dim."""
    from disca_tools.cluster.invariants import invariant_features
    from disca_tools.cluster.mixture import fit_pca

    rows = np.arange(len(tiny_store))
    seen: list[em.IterationClustering] = []
    cfg = em.EMConfig(**dict(TINY, max_iter=1, init=init, pca_dim=3, init_pca_dim=6))
    em.run_em(tiny_store, rows, cfg, on_iteration=seen.append)
    assert [c.x.shape[1] for c in seen] == [6, 3]
    if init == "invariants":
        inv = invariant_features(tiny_store, rows)
        direct = fit_pca(inv, 6, em.iteration_seed(cfg.seed, 0)).transform(inv)
        np.testing.assert_allclose(seen[0].x, direct, rtol=1e-5, atol=1e-5)
    default: list[em.IterationClustering] = []
    em.run_em(tiny_store, rows, em.EMConfig(**dict(TINY, max_iter=1, init=init, pca_dim=3)),
              on_iteration=default.append)  # fmt: skip
    assert [c.x.shape[1] for c in default] == [3, 3]  # 0: --pca-dim for both
    with pytest.raises(UserError, match="init-pca-dim 6: applies only"):
        em.EMConfig(init="network", init_pca_dim=6).check(len(rows), tiny_store.box)
    with pytest.raises(UserError, match="init-pca-dim: must be"):
        em.EMConfig(init=init, init_pca_dim=-1).check(len(rows), tiny_store.box)
    with pytest.raises(UserError, match="too few for candidate K"):  # the larger PCA counts
        em.EMConfig(**dict(TINY, init=init, pca_dim=3, init_pca_dim=40)).check(
            len(rows), tiny_store.box
        )


def test_init_epochs_lengthen_only_the_first_round_from_descriptors(tiny_store):
    """--init-epochs: the random network learns the iteration-0 clusters of the descriptors for
    that many epochs; later rounds, and the paper's network init, keep --epochs-per-iter."""
    rows = np.arange(len(tiny_store))
    base = dict(TINY, max_iter=2, epochs_per_iter=1, init_epochs=3)
    res = em.run_em(tiny_store, rows, em.EMConfig(**dict(base, init="invariants")))
    assert [h.epochs for h in res.history] == [3, 1, 0]
    res = em.run_em(tiny_store, rows, em.EMConfig(**dict(base, max_iter=1)))
    assert [h.epochs for h in res.history] == [1, 0]
    with pytest.raises(UserError, match="--init-epochs"):
        em.EMConfig(**dict(base, init_epochs=-1)).check(len(rows), tiny_store.box)


@pytest.mark.parametrize(("init", "passes"), [("network", [0, 1]), ("invariants", [1])])
def test_the_untrained_network_predicts_only_when_its_features_are_clustered(
    tiny_store, monkeypatch, init, passes
):
    """Iteration 0 clusters the untrained network's features with --init network only; with
    --init invariants (or voxels) nothing uses them, so they are not computed. The rotations of
    --predict-rotations reach every pass."""
    rows = np.arange(len(tiny_store))
    real, seen, it = em.predict_features, [], []
    monkeypatch.setattr(
        em, "predict_features",
        lambda *a, **kw: seen.append((len(it), kw["rotations"])) or real(*a, **kw),
    )  # fmt: skip
    cfg = em.EMConfig(**dict(TINY, max_iter=1, init=init, predict_rotations=2))
    res = em.run_em(tiny_store, rows, cfg, on_iteration=lambda c: it.append(c.iteration))
    assert seen == [(p, 2) for p in passes] and it == [0, 1]
    assert res.best_iteration == 1 and res.features.shape == (len(rows), TINY["feature_dim"])


def test_lda_projection_and_refinement_replace_only_their_steps(tiny_store):
    """--projection lda: from iteration 1 on the mixtures see the features on the previous
    clusters' K − 1 discriminant directions; --init-refine lda: iteration 0's clusters of the
    descriptors are those of refine_by_discriminants at the K the mixtures chose."""
    from disca_tools.cluster.discriminant import DiscriminantProjection, refine_by_discriminants
    from disca_tools.cluster.invariants import invariant_features
    from disca_tools.cluster.mixture import fit_pca, select_initial_mixture

    rows = np.arange(len(tiny_store))
    seen: list[em.IterationClustering] = []
    opts = dict(TINY, max_iter=2, init="invariants", projection="lda", init_refine="lda")
    cfg = em.EMConfig(**opts)
    res = em.run_em(tiny_store, rows, cfg, on_iteration=seen.append)
    seed0 = em.iteration_seed(cfg.seed, 0)
    inv = invariant_features(tiny_store, rows)
    chosen = select_initial_mixture(fit_pca(inv, cfg.pca_dim, seed0).transform(inv),
                                    cfg.k_candidates, seed0)  # fmt: skip
    refined, z = refine_by_discriminants(inv, chosen, seed0)
    np.testing.assert_array_equal(seen[0].labels, refined.labels)
    np.testing.assert_allclose(seen[0].x, z)
    for before, after in zip(seen[:-1], seen[1:], strict=True):
        assert after.x.shape[1] == max(1, before.k - 1)
    assert res.history[-1].k == seen[-1].k
    # the reported iteration's projection and mixture assign its features as the run did
    assert isinstance(res.pca, DiscriminantProjection) and res.best_iteration >= 1
    post = res.gmm.predict_proba(res.pca.transform(res.features))
    np.testing.assert_array_equal(np.asarray(res.component_to_label)[post.argmax(1)], res.labels)
    with pytest.raises(UserError, match="--projection: must be one of pca, lda"):
        em.EMConfig(projection="pls").check(len(rows), tiny_store.box)
    with pytest.raises(UserError, match="pca-trained-classes: applies only to --projection pca"):
        em.EMConfig(projection="lda", pca_trained_classes=True).check(len(rows), tiny_store.box)
    with pytest.raises(UserError, match="init-refine lda: applies only"):
        em.EMConfig(init="network", init_refine="lda").check(len(rows), tiny_store.box)
