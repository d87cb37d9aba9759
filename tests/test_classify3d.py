"""disca_classify3d: 3D classification with the pose marginalised, from given classes.

The core (disca_tools.cluster.classify3d) on simulated subtomograms of shipped structures: poses
in RELION's convention, misassigned particles moved back, results independent of the batch size,
held iterations that never move a particle; the tool: outputs, angles, provenance, bad input.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import starfile
from helpers import simulate_subtomograms, working_directory
from scipy.special import logsumexp, softmax

from disca_tools.cli.classify3d import main
from disca_tools.cluster.classify3d import (
    ClassifyConfig,
    aligned_means,
    best_shifts,
    classify_with_poses,
    fourier_filter,
    held_out_log_likelihoods,
    initial_references,
    lowpass_weight,
    map_similarity,
    missing_wedge_weight,
    project,
    rotate_many,
    sphere_mask,
    split_and_merge,
)
from disca_tools.evaluate import clustering_metrics
from disca_tools.geometry import euler_to_matrix, random_rotations, rotation_angle_deg
from disca_tools.io.particles import ORIGINS_ANGST
from disca_tools.model.data import normalise
from disca_tools.runtime.errors import UserError
from disca_tools.simulate.imaging import Imaging
from disca_tools.simulate.subtomograms import simulate_subtomogram_set

STRUCTURES = ["1bxn", "3j9i", "4v4r"]


def scrambled(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``labels`` with about ``fraction`` of them replaced by a different class."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    pick = rng.random(len(out)) < fraction
    out[pick] = (out[pick] + rng.integers(1, labels.max() + 1, int(pick.sum()))) % (
        labels.max() + 1
    )
    return out


@pytest.fixture(scope="module")
def three_classes():
    """3 structures × 15, 24³ at 14 Å, SNR 0.5, CTF and ±60° wedge; normalised volumes."""
    s = simulate_subtomogram_set(STRUCTURES, 15, 24, 14.0, 0.5, Imaging(), seed=0)
    return normalise(s.volumes), s.labels


def reader(volumes):
    return lambda start, stop: volumes[start:stop]


def test_poses_follow_relions_convention():
    """From the true map, each particle's pose is its simulated RELION orientation within the
    sampling of 1,000 random rotations (the transposed convention gives ~110°, chance ~126°)."""
    s = simulate_subtomogram_set(["4v4r"], 12, 24, 14.0, 1.0, Imaging(apply_ctf=False), seed=0)
    ref = s.references["4v4r"]
    # on the scale of the normalised data: signal s.d. √(SNR / (1 + SNR))
    ref = (ref - ref.mean()) / ref.std() * np.sqrt(0.5)
    cfg = ClassifyConfig(rotations=1000, iterations=1, hold_iterations=1, batch_size=5)
    res = classify_with_poses(
        reader(normalise(s.volumes)), 12, np.zeros(12, int), cfg, initial=ref[None]
    )
    truth = euler_to_matrix(s.angles_deg)
    errors = rotation_angle_deg(np.einsum("nij,nkj->nik", res.poses, truth))
    assert np.median(errors) < 25.0, errors


def test_misassigned_particles_return_to_their_class(three_classes):
    volumes, truth = three_classes
    start = scrambled(truth, 0.3, seed=1)
    assert clustering_metrics(truth, start)["accuracy"] < 0.85
    cfg = ClassifyConfig(rotations=300, iterations=5, hold_iterations=2, batch_size=16)
    res = classify_with_poses(reader(volumes), len(volumes), start, cfg)
    assert clustering_metrics(truth, res.labels)["accuracy"] >= 0.95
    assert res.history[0]["held"] and not res.history[-1]["held"]
    assert res.references.shape == (3, 24, 24, 24)
    assert np.all((res.posterior > 0) & (res.posterior <= 1 + 1e-6))


def test_batch_size_does_not_change_the_result(three_classes):
    volumes, truth = three_classes
    start = scrambled(truth, 0.3, seed=2)
    runs = [
        classify_with_poses(
            reader(volumes),
            len(volumes),
            start,
            ClassifyConfig(rotations=200, iterations=3, hold_iterations=1, batch_size=b),
        )
        for b in (4, 64)
    ]
    np.testing.assert_array_equal(runs[0].labels, runs[1].labels)
    np.testing.assert_allclose(runs[0].posterior, runs[1].posterior, atol=1e-4)
    np.testing.assert_allclose(runs[0].references, runs[1].references, rtol=1e-3, atol=1e-4)


def test_held_iterations_never_move_a_particle(three_classes):
    volumes, truth = three_classes
    start = scrambled(truth, 0.3, seed=3)
    cfg = ClassifyConfig(rotations=100, iterations=2, hold_iterations=2, batch_size=32)
    res = classify_with_poses(reader(volumes), len(volumes), start, cfg)
    np.testing.assert_array_equal(res.labels, start)
    assert all(h["changed_fraction"] == 0.0 for h in res.history)


def test_e_step_against_a_direct_computation(three_classes):
    """One E-step against a direct computation: ℓ_kr from the projections of the references, the
    class posterior the sum over poses of softmax_kr(ℓ_kr / T), the pose the most probable one
    of the chosen class, the history's log-likelihood the mean of log Σ_kr exp(ℓ_kr) / (K R)."""
    volumes, truth = three_classes
    n, box, temperature = len(volumes), volumes.shape[-1], 3.0
    cfg = ClassifyConfig(
        rotations=60, iterations=1, hold_iterations=0, batch_size=16,
        temperature=temperature, max_shift_px=0.0,
    )  # fmt: skip
    initial = np.stack([volumes[truth == c].mean(axis=0) for c in range(3)])
    res = classify_with_poses(reader(volumes), n, truth, cfg, initial=initial)

    lp = lowpass_weight(box, cfg.lowpass_px)
    mask = sphere_mask(box)
    _, sigma2 = initial_references(reader(volumes), n, truth, 3, lp, 16)
    rots = random_rotations(cfg.rotations, np.random.default_rng(cfg.seed)).astype(np.float32)
    proj = project(fourier_filter(initial.astype(np.float32), lp), rots,
                   missing_wedge_weight(box, 60.0) * lp, mask)  # fmt: skip
    x = fourier_filter(volumes, lp).reshape(n, -1)[:, mask]
    ll = ((x @ proj.T - 0.5 * (proj**2).sum(axis=1)) / sigma2).reshape(n, 3, len(rots))
    expected = softmax(ll.reshape(n, -1) / temperature, axis=1).reshape(ll.shape).sum(axis=2)
    assert len(res.classes) == 3  # no class emptied: labels are the direct argmax
    np.testing.assert_array_equal(res.labels, expected.argmax(axis=1))
    np.testing.assert_allclose(res.posterior, expected.max(axis=1), atol=2e-3)
    best_pose = ll[np.arange(n), res.labels].argmax(axis=1)
    np.testing.assert_allclose(res.poses, rots[best_pose], atol=1e-6)
    expected_ll = np.mean(logsumexp(ll, axis=(1, 2)) - np.log(3 * len(rots)))
    assert res.history[0]["log_likelihood"] == pytest.approx(expected_ll, abs=1e-3)


def test_best_shifts_recovers_sub_voxel_shifts():
    """A low-passed structure moved by known sub-voxel shifts (a phase ramp): the cross-correlation
    peak with its parabolic refinement gives each shift back within 0.15 voxel."""
    s = simulate_subtomogram_set(["4v4r"], 1, 24, 14.0, np.inf, Imaging(apply_ctf=False), seed=0)
    model = fourier_filter(s.volumes[:1], lowpass_weight(24, 3.0))
    shifts = np.array([[0.0, 0.0, 0.0], [0.4, -1.3, 0.8], [-1.7, 0.25, -0.6], [1.9, 1.5, -1.95]])
    moved = fourier_filter(np.repeat(model, len(shifts), axis=0), np.ones((24,) * 3), shifts)
    found = best_shifts(moved, np.repeat(model, len(shifts), axis=0), reach_px=2)
    np.testing.assert_allclose(found, shifts, atol=0.15)


def test_translation_search_finds_the_particle_centres():
    """Particles off-centre by up to ±1.5 voxels per axis: from the true map, the search brings
    each particle's centre nearer its simulated one than the box centre is (up to the one
    translation a class's map may share with its particles: compared in the map's frame), and
    with the centres found the map explains the particles better (log-likelihood)."""
    s = simulate_subtomogram_set(
        ["4v4r"], 24, 24, 14.0, 2.0, Imaging(apply_ctf=False), seed=1, max_shift_px=1.5
    )
    ref = s.references["4v4r"]
    ref = (ref - ref.mean()) / ref.std() * np.sqrt(2.0 / 3.0)  # signal s.d. √(SNR / (1 + SNR))
    volumes = normalise(s.volumes)
    runs = {
        reach: classify_with_poses(
            reader(volumes),
            24,
            np.zeros(24, int),
            ClassifyConfig(rotations=1000, iterations=3, hold_iterations=3, max_shift_px=reach),
            initial=ref[None],
        )  # fmt: skip
        for reach in (0.0, 2.0)
    }

    def error_in_map_frame(result):
        residual = np.einsum("nij,nj->ni", result.poses, result.offsets - s.shifts_xyz)
        return np.linalg.norm(residual - residual.mean(axis=0), axis=1)

    searched, fixed = (np.median(error_in_map_frame(runs[r])) for r in (2.0, 0.0))
    assert searched < 0.7 * fixed, (searched, fixed)
    np.testing.assert_array_equal(runs[0.0].offsets, 0.0)
    assert runs[2.0].history[-1]["log_likelihood"] > runs[0.0].history[-1]["log_likelihood"]


def test_missing_wedge_weight_samples_the_tilt_range():
    w = missing_wedge_weight(24, 60.0)
    c = 12
    assert w[c, c, c + 6] == 1.0  # along x (perpendicular to the beam and the tilt axis)
    assert w[c + 6, c, c] == 0.0  # along the beam
    assert w[c + 6, c, c + 6] == 1.0  # 45° from the beam: inside ±60°
    assert w[c + 6, c + 6, c + 2] == 0.0  # 72° from the x axis in the x-z plane: outside
    assert 0.6 < w.mean() < 0.75  # ~60/90 of the sphere's directions, plus the tilt axis
    assert np.all(missing_wedge_weight(24, 90.0) == 1.0)


def test_map_similarity_finds_a_rotated_copy():
    """A map and a rotated copy of it are more alike after alignment than two different maps."""
    rng = np.random.default_rng(0)
    smooth = fourier_filter(
        rng.standard_normal((2, 24, 24, 24)).astype(np.float32), lowpass_weight(24, 6.0)
    )
    turn = random_rotations(1, np.random.default_rng(5)).astype(np.float32)
    copy = rotate_many(smooth[:1], turn)
    sim = map_similarity(np.concatenate([smooth[:1], copy, smooth[1:]]))
    np.testing.assert_allclose(sim, sim.T)
    assert sim[0, 1] > 0.8 and sim[0, 1] > sim[0, 2] + 0.3, sim


def merged_and_split_start(per_class: int):
    """3 structures × ``per_class`` (SNR 0.5) and a start with the first two merged and the
    third cut in two at random: (volumes, truth, start)."""
    s = simulate_subtomogram_set(STRUCTURES, per_class, 24, 14.0, 0.5, Imaging(), seed=0)
    volumes, truth = normalise(s.volumes), np.asarray(s.labels)
    start = truth.copy()
    start[truth == 1] = 0
    third = np.flatnonzero(truth == 2)
    start[third[np.random.default_rng(0).random(len(third)) < 0.5]] = 1
    return volumes, truth, start


SPLIT_MERGE = ClassifyConfig(
    rotations=300,
    iterations=12,
    hold_iterations=3,
    split_merge_rounds=1,
    split_merge_pairs=2,
    split_merge_iterations=8,
)


def test_split_and_merge_leaves_a_merged_and_split_start():
    """From classes with two structures merged and the third cut in two, plain classification
    stays stuck; the split-and-merge trial that merges the halves and splits the merged class
    raises the held-out log-likelihood by more than 2 standard errors, is accepted and
    recovers the structures."""
    volumes, truth, start = merged_and_split_start(30)
    cfg = SPLIT_MERGE
    plain = classify_with_poses(reader(volumes), len(volumes), start, cfg)
    assert clustering_metrics(truth, plain.labels)["accuracy"] < 0.7
    res = split_and_merge(reader(volumes), len(volumes), plain, cfg)
    assert clustering_metrics(truth, res.labels)["accuracy"] >= 0.95
    assert len(res.moves) == 2  # 2 pairs × the one other class
    accepted = [m for m in res.moves if m["accepted"]]
    assert len(accepted) == 1
    gain = accepted[0]["score"] - accepted[0]["baseline_score"]
    assert gain > 2 * accepted[0]["gain_standard_error"] > 0
    # the halves of the third structure (start classes 2 and 3) are merged, the merged class split
    assert sorted(accepted[0]["merged"]) == [2, 3] and accepted[0]["split"] == 1
    assert sorted(res.classes.tolist()) == [0, 1, 2]
    # the history goes on from the classification's, numbered on
    assert res.history[: len(plain.history)] == plain.history
    assert [h["iteration"] for h in res.history] == list(range(len(res.history)))


def test_held_out_judge_refuses_maps_that_fit_their_own_noise():
    """With 15 particles per class the classification's own log-likelihood prefers a wrong
    trial (its maps fit their members' noise) and split-and-merge makes things worse; the
    held-out judge accepts the right trial and recovers the structures."""
    volumes, truth, start = merged_and_split_start(15)
    plain = classify_with_poses(reader(volumes), len(volumes), start, SPLIT_MERGE)
    by_likelihood = split_and_merge(
        reader(volumes), len(volumes), plain, replace(SPLIT_MERGE, split_merge_judge="likelihood")
    )
    assert clustering_metrics(truth, by_likelihood.labels)["accuracy"] < 0.6
    held_out = split_and_merge(reader(volumes), len(volumes), plain, SPLIT_MERGE)
    assert clustering_metrics(truth, held_out.labels)["accuracy"] >= 0.95
    # the same trials, ranked differently: the likelihood's choice is refused when held out
    assert [m["accepted"] for m in held_out.moves] == [
        not m["accepted"] for m in by_likelihood.moves
    ]


def test_held_out_scores_do_not_see_the_particle(three_classes):
    """A particle's held-out score uses only the other half's maps: changing one particle of
    half 0 changes its own score and those of half 1 (scored by half 0's maps), never the other
    half-0 scores."""
    volumes, truth = three_classes
    cfg = ClassifyConfig(rotations=60, iterations=2, hold_iterations=2)
    res = classify_with_poses(reader(volumes), len(volumes), truth, cfg)
    before = held_out_log_likelihoods(reader(volumes), len(volumes), res, cfg)
    changed = volumes.copy()
    changed[2] = np.random.default_rng(1).standard_normal(changed[2].shape)
    after = held_out_log_likelihoods(reader(changed), len(changed), res, cfg)
    assert np.isfinite(before).all() and before.shape == (len(volumes),)
    others = np.setdiff1d(np.arange(0, len(volumes), 2), [2])
    np.testing.assert_array_equal(after[others], before[others])
    same_class_half_1 = np.flatnonzero(
        (res.labels == res.labels[2]) & (np.arange(len(truth)) % 2 == 1)
    )
    assert after[2] != before[2] and len(same_class_half_1)
    assert np.all(after[same_class_half_1] != before[same_class_half_1])


def test_bad_settings_are_user_errors(three_classes):
    volumes, truth = three_classes
    with pytest.raises(UserError, match="--max-shift-px"):
        ClassifyConfig(max_shift_px=-1.0).check()
    with pytest.raises(UserError, match="--hold-iterations"):
        ClassifyConfig(iterations=2, hold_iterations=3).check()
    with pytest.raises(UserError, match="--split-merge-rounds"):
        ClassifyConfig(split_merge_rounds=-1).check()
    with pytest.raises(UserError, match="--split-merge-judge"):
        ClassifyConfig(split_merge_judge="bic").check()
    with pytest.raises(UserError, match="Nyquist"):
        ClassifyConfig(lowpass_px=1.5).check()
    with pytest.raises(UserError, match="one label per particle"):
        classify_with_poses(reader(volumes), len(volumes), truth[:-1], ClassifyConfig())


@pytest.fixture(scope="module")
def c3d_project(tmp_path_factory):
    """``disca_simulate`` output (3 × 8, SNR 1) plus ``start.star``: its classes 30 % scrambled,
    the angle and origin columns dropped (what disca_cluster's clusters.star of picked particles looks like)."""
    root = tmp_path_factory.mktemp("c3d")
    with working_directory(root):
        simulate_subtomograms("Sim", STRUCTURES, 8, 24, 14, 1, 0)
        blocks = starfile.read("Sim/particles.star", always_dict=True)
        p = blocks["particles"]
        truth = p["rlnClassNumber"].to_numpy() - 1
        p["rlnClassNumber"] = scrambled(truth, 0.3, seed=4) + 1
        blocks["particles"] = p.drop(
            columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", *ORIGINS_ANGST]
        )
        starfile.write(blocks, "Sim/start.star")
    return root


def test_tool_refines_classes_and_writes_poses(c3d_project, monkeypatch, caplog):
    monkeypatch.chdir(c3d_project)
    args = ["--i", "Sim/start.star", "--o", "C3D", "--rotations", "200", "--iter", "5"]
    args += ["--max-shift-px", "2"]
    assert main([*args, "--hold-iter", "2", "-q"]) == 0
    out = starfile.read("C3D/clusters.star", always_dict=True)["particles"]
    start = starfile.read("Sim/start.star", always_dict=True)["particles"]
    truth = starfile.read("Sim/particles.star", always_dict=True)["particles"]
    assert set(start.columns) <= set(out.columns)
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnMaxValueProbDistribution"} <= set(
        out.columns
    )
    before = clustering_metrics(truth["rlnClassNumber"], start["rlnClassNumber"])["accuracy"]
    after = clustering_metrics(truth["rlnClassNumber"], out["rlnClassNumber"])["accuracy"]
    assert before < 0.85 and after >= 0.95
    # the centres found, as RELION origins (−offset · pixel size), nearer the simulated ones
    found = out[list(ORIGINS_ANGST)].to_numpy()
    simulated = truth[list(ORIGINS_ANGST)].to_numpy()
    assert np.all(np.abs(found) <= 2.0 * 14.0 + 1e-6)
    assert np.median(np.linalg.norm(found - simulated, axis=1)) < np.median(
        np.linalg.norm(simulated, axis=1)
    )
    for name in ("class_001.mrc", "class_002.mrc", "class_003.mrc", "history.tsv", "note.txt"):
        assert (c3d_project / "C3D" / name).is_file()
    assert "--rotations 200" in (c3d_project / "C3D" / "note.txt").read_text()
    # outputs are not replaced without --overwrite
    stamp = (c3d_project / "C3D" / "clusters.star").stat().st_mtime_ns
    assert main([*args, "-q"]) == 2
    assert (c3d_project / "C3D" / "clusters.star").stat().st_mtime_ns == stamp


def test_tool_records_split_and_merge_trials(c3d_project, monkeypatch):
    monkeypatch.chdir(c3d_project)
    args = ["--i", "Sim/start.star", "--o", "C3D_sm", "--rotations", "100", "--iter", "4"]
    args += ["--hold-iter", "2", "--split-merge-rounds", "1", "--split-merge-pairs", "1", "-q"]
    assert main(args) == 0
    rows = (c3d_project / "C3D_sm" / "split_merge.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert header[:4] == ["round", "merged", "similarity", "split"] and len(rows) == 2
    trial = dict(zip(header, rows[1].split("\t"), strict=True))
    assert len(trial["merged"].split(",")) == 2 and trial["split"] not in trial["merged"].split(",")
    recorded = json.loads((c3d_project / "C3D_sm" / "run.json").read_text())["results"]
    assert len(recorded["split_merge"]) == 1
    assert trial["accepted"] in ("0", "1")
    assert recorded["split_merge"][0]["accepted"] == (trial["accepted"] == "1")
    # the default judge, its scores beside the classification's own log-likelihoods
    assert {"score", "baseline_score", "gain_standard_error"} <= set(header)
    options = json.loads((c3d_project / "C3D_sm" / "run.json").read_text())["options"]
    assert options["split_merge_judge"] == "held-out"


def test_tool_keeps_the_inputs_angles(c3d_project, monkeypatch):
    monkeypatch.chdir(c3d_project)
    args = ["--i", "Sim/particles.star", "--o", "C3D_angles", "--rotations", "50"]
    assert main([*args, "--iter", "2", "-q"]) == 0  # fewer iterations than the 8 held by default
    out = starfile.read("C3D_angles/clusters.star", always_dict=True)["particles"]
    given = starfile.read("Sim/particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(out["rlnAngleTilt"], given["rlnAngleTilt"])
    np.testing.assert_allclose(out["rlnOriginXAngst"], given["rlnOriginXAngst"])
    history = (c3d_project / "C3D_angles" / "history.tsv").read_text().splitlines()
    assert [line.split("\t")[1] for line in history] == ["held", "1", "0"]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda p: p.drop(columns=["rlnClassNumber"]), "no rlnClassNumber column"),
        (lambda p: p.assign(rlnClassNumber=0), "class numbers ≥ 1"),
    ],
)
def test_bad_classes_are_one_line_errors(c3d_project, monkeypatch, capsys, edit, problem):
    monkeypatch.chdir(c3d_project)
    blocks = starfile.read("Sim/start.star", always_dict=True)
    blocks["particles"] = edit(blocks["particles"])
    starfile.write(blocks, "bad.star", overwrite=True)
    assert main(["--i", "bad.star", "--o", "Bad"]) == 2
    assert not (c3d_project / "Bad").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.star" in err[0] and problem in err[0]


def test_aligned_means_read_only_the_batches_holding_group_members(three_classes):
    """Particles outside every group (−1) do not count, and a batch of none of them is not read."""
    volumes, labels = three_classes
    n = len(labels)
    reads = []

    def read(start, stop):
        reads.append((start, stop))
        return volumes[start:stop]

    groups = np.where(
        np.arange(n) < 20, labels, -1
    )  # batches of 10: only the first two hold members
    poses = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3))
    lp = lowpass_weight(24, 3.0)
    means = aligned_means(read, n, groups, 3, poses, lp, 10)
    assert reads == [(0, 10), (10, 20)]
    x = fourier_filter(volumes[:20], lp)
    for c in np.unique(labels[:20]):
        members = labels[:20] == c
        np.testing.assert_allclose(means[c], x[members].mean(axis=0), rtol=1e-4, atol=1e-5)
