"""Clustering and picking metrics and disca_evaluate (disca_tools.evaluate, cli/evaluate.py)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from disca_tools.cli.evaluate import main
from disca_tools.evaluate import (
    clustering_metrics,
    evaluate_clusters,
    match_particles,
    match_points,
    picking_metrics,
)
from disca_tools.io.particles import ParticleTable
from disca_tools.io.star import default_optics, write_star_blocks

# ----------------------------------------------------------------------------- metrics


def test_perfect_clustering_with_other_numbers():
    m = clustering_metrics(np.array([0, 0, 1, 1, 2]), np.array([5, 5, 7, 7, 1]))
    assert m["homogeneity"] == pytest.approx(1.0)
    assert m["completeness"] == pytest.approx(1.0)
    assert m["accuracy"] == 1.0 and m["accuracy_defined"]
    assert m["k_true"] == m["k_found"] == 3


def test_hand_computed_over_split():
    # truth 2 classes; prediction splits each in two: H(C|K)=0 so homogeneity 1;
    # completeness = 1 − H(K|C)/H(K) = 1 − ln2/ln4 = 0.5; V = 2·1·0.5/1.5
    m = clustering_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3]))
    assert m["homogeneity"] == pytest.approx(1.0)
    assert m["completeness"] == pytest.approx(0.5)
    assert m["v_measure"] == pytest.approx(2 / 3)
    assert m["accuracy"] == 0.5
    assert not m["accuracy_defined"]
    assert (m["k_true"], m["k_found"]) == (2, 4)


def test_hand_computed_merge_and_string_labels():
    m = clustering_metrics(np.array(["a", "a", "b", "b"]), np.array([1, 1, 1, 1]))
    assert m["homogeneity"] == pytest.approx(0.0)
    assert m["completeness"] == pytest.approx(1.0)
    assert m["accuracy"] == 0.5
    assert m["k_found"] == 1


def test_picking_hand_made():
    truth = np.array([[0, 0, 0], [100, 0, 0], [200, 0, 0]], float)
    picks = np.array([[3, 0, 0], [101, 0, 0], [102, 0, 0], [400, 0, 0]], float)
    m = picking_metrics(picks, truth, max_distance_px=10)
    # (3,0,0)→truth 0, (101,0,0)→truth 1; (102,0,0) duplicate, (400,0,0) far: FP 2; truth 2 missed
    assert (m["true_positives"], m["false_positives"], m["false_negatives"]) == (2, 2, 1)
    assert m["precision"] == 0.5 and m["recall"] == pytest.approx(2 / 3)
    assert m["false_positive_rate"] == 0.5
    assert m["false_negative_rate"] == pytest.approx(1 / 3)
    none = picking_metrics(np.zeros((0, 3)), truth, 10)
    assert none["recall"] == 0 and math.isnan(none["precision"])


def test_match_points_closest_first_one_to_one():
    a = np.array([[0, 0, 0], [6, 0, 0]], float)
    b = np.array([[4, 0, 0]], float)
    # a1-b0 (2) is closer than a0-b0 (4): a1 takes b0, a0 stays unmatched (one-to-one)
    ia, ib = match_points(a, b, 8)
    assert ia.tolist() == [1] and ib.tolist() == [0]
    b2 = np.array([[4, 0, 0], [-5, 0, 0]], float)
    ia, ib = match_points(a, b2, 8)
    assert sorted(zip(ia.tolist(), ib.tolist(), strict=True)) == [(0, 1), (1, 0)]
    ia, _ = match_points(a, b2, 3)
    assert ia.tolist() == [1]


# ----------------------------------------------------------------------------- tables


def table(xyz, tomo, classes, images=None, angpix=10.0):
    df = pd.DataFrame(
        {
            "rlnTomoName": tomo,
            "rlnCoordinateX": [p[0] for p in xyz],
            "rlnCoordinateY": [p[1] for p in xyz],
            "rlnCoordinateZ": [p[2] for p in xyz],
            "rlnClassNumber": classes,
        }
    )
    if images is not None:
        df["rlnImageName"] = images
    return ParticleTable(df, coord_angpix=angpix)


def test_match_by_coords_across_voxel_sizes_and_tomograms():
    truth = table([(10, 10, 10), (50, 50, 50), (10, 10, 10)], ["t1", "t1", "t2"], [1, 2, 1])
    # prediction written at 5 Å/px: twice the pixel numbers; its t2 particle is in the other tomogram
    pred = table(
        [(101, 100, 100), (21, 20, 20), (20, 20, 20)], ["t1", "t1", "t3"], [4, 3, 3], angpix=5.0
    )
    pi, ti = match_particles(pred, truth, by="coords", max_distance_px=2.0)
    assert sorted(zip(pi.tolist(), ti.tolist(), strict=True)) == [(0, 1), (1, 0)]


def test_match_by_image_name_ignores_folders():
    truth = table([(0, 0, 0)] * 3, ["t"] * 3, [1, 2, 3], ["Sim/a.mrc", "Sim/b.mrc", "Sim/c.mrc"])
    pred = table([(0, 0, 0)] * 2, ["t"] * 2, [2, 1], ["Extract/job1/c.mrc", "Extract/job1/a.mrc"])
    pi, ti = match_particles(pred, truth, by="image")
    assert pi.tolist() == [0, 1] and ti.tolist() == [2, 0]
    m = evaluate_clusters(pred, truth, by="image")
    assert m["n_matched"] == 2 and m["accuracy"] == 1.0
    # class 'b' was not picked: the truth still has 3 classes, the run found 2
    assert (m["k_true"], m["k_found"], m["k_true_matched"]) == (3, 2, 2)
    assert not m["accuracy_defined"]


def test_k_found_counts_clusters_of_unmatched_particles():
    """A cluster of particles that match no true particle (false picks) is still a cluster found:
    K found is 3 here, though the matched particles fall in 2 clusters."""
    truth = table([(0, 0, 0)] * 4, ["t"] * 4, [1, 1, 2, 2], ["a.mrc", "b.mrc", "c.mrc", "d.mrc"])
    pred = table(
        [(0, 0, 0)] * 6,
        ["t"] * 6,
        [1, 1, 2, 2, 3, 3],
        ["a.mrc", "b.mrc", "c.mrc", "d.mrc", "junk1.mrc", "junk2.mrc"],
    )
    m = evaluate_clusters(pred, truth, by="image")
    assert m["n_matched"] == 4 and m["homogeneity"] == pytest.approx(1.0)
    assert (m["k_found"], m["k_found_matched"], m["k_true"]) == (3, 2, 2)
    assert not m["accuracy_defined"]


# ----------------------------------------------------------------------------- CLI


def write_star(path, n=12, classes=None, images=True, optics=True, tomo="tomo1", shift=0.0):
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 500, (n, 3))
    df = pd.DataFrame(
        {
            "rlnMicrographName": [f"{tomo}.mrc"] * n,
            "rlnCoordinateX": xyz[:, 0] + shift,
            "rlnCoordinateY": xyz[:, 1],
            "rlnCoordinateZ": xyz[:, 2],
            "rlnOpticsGroup": [1] * n,
        }
    )
    if images:
        df["rlnImageName"] = [f"Sub/p{i:03d}.mrc" for i in range(n)]
    if classes is not None:
        df["rlnClassNumber"] = classes
    blocks = {"optics": default_optics(10.0, 24), "particles": df} if optics else {"particles": df}
    write_star_blocks(path, blocks)
    return path


def test_cli_clusters_writes_json(tmp_path, capsys):
    truth_classes = np.repeat([1, 2, 3], 4)
    pred_classes = np.array([2, 2, 2, 2, 3, 3, 3, 1, 1, 1, 1, 1])  # one particle of class 2 wrong
    truth = write_star(tmp_path / "truth.star", classes=truth_classes)
    pred = write_star(tmp_path / "clusters.star", classes=pred_classes)
    out = tmp_path / "Eval"
    assert main(["--i", str(pred), "--truth", str(truth), "--o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "homogeneity" in printed and "accuracy" in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert result["match"] == "image" and result["n_matched"] == 12
    assert result["accuracy"] == pytest.approx(11 / 12)
    assert result["k_found"] == result["k_true"] == 3
    assert (out / "run.json").exists()
    # refuses to overwrite, then accepts --overwrite
    assert main(["--i", str(pred), "--truth", str(truth), "--o", str(out), "-q"]) == 2
    assert (
        main(["--i", str(pred), "--truth", str(truth), "--o", str(out), "-q", "--overwrite"]) == 0
    )


def test_cli_coords_and_picks(tmp_path, capsys):
    truth = write_star(tmp_path / "truth.star", classes=np.repeat([1, 2], 6), images=False)
    picks = write_star(tmp_path / "picks.star", n=12, images=False, shift=3.0)  # 30 Å away
    js = tmp_path / "picks.json"
    args = [
        "--i",
        str(picks),
        "--truth",
        str(truth),
        "--picks",
        "--angpix",
        "10",
        "--json",
        str(js),
    ]
    assert main(args) == 0
    r = json.loads(js.read_text())
    assert r["true_positives"] == 12 and r["precision"] == 1.0 and r["false_negative_rate"] == 0.0
    assert r["max_distance_px"] == pytest.approx(8.0)
    js2 = tmp_path / "tight.json"
    args = [
        "--i",
        str(picks),
        "--truth",
        str(truth),
        "--picks",
        "--angpix",
        "10",
        "--json",
        str(js2),
    ]
    assert main([*args, "--max-distance-angst", "20"]) == 0
    r = json.loads(js2.read_text())
    assert r["true_positives"] == 0 and r["recall"] == 0.0 and r["false_positive_rate"] == 1.0
    capsys.readouterr()


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    truth = write_star(tmp_path / "truth.star", classes=np.repeat([1, 2], 6))
    no_class = write_star(tmp_path / "noclass.star")
    other = write_star(tmp_path / "other.star", classes=np.ones(12, int), tomo="x")
    before = truth.read_bytes()
    out = tmp_path / "E"
    cases = [
        (["--i", str(no_class), "--truth", str(truth)], "rlnClassNumber"),
        (["--i", str(tmp_path / "missing.star"), "--truth", str(truth)], "missing.star"),
        (
            ["--i", str(other), "--truth", str(truth), "--match", "coords", "--angpix", "10"],
            "no particle",
        ),
        (["--i", str(truth), "--truth", str(truth), "--json", str(truth)], "input"),
    ]
    for args, words in cases:
        assert main([*args, "--o", str(out)] if "--json" not in args else args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (out / "evaluation.json").exists()
    assert truth.read_bytes() == before  # an output named like an input is refused, input intact
