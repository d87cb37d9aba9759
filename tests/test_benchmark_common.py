"""The one writer that every benchmark and probe saves its results through."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_save_result_records_machine_and_libraries(common, tmp_path):
    path = common.save_result("bench_x", "tag1", {"rows": [1, 2]}, "| a |\n", folder=tmp_path)
    assert path == tmp_path / "bench_x_tag1.json"
    record = json.loads(path.read_text())
    assert record["rows"] == [1, 2]
    assert record["machine"]["cpus"] >= 1
    assert record["machine"]["python"].count(".") == 2
    assert record["libraries"]["numpy"] == np.__version__
    assert (tmp_path / "bench_x_tag1.md").read_text() == "| a |\n"
    # written through a temporary file and a rename: nothing else is left in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_x_tag1.json", "bench_x_tag1.md"]


def test_a_save_interrupted_while_writing_keeps_the_previous_result(common, tmp_path, monkeypatch):
    first = common.save_result("bench_x", "", {"value": 1}, folder=tmp_path)
    real_write_text = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        common.save_result("bench_x", "", {"value": 2}, folder=tmp_path)
    monkeypatch.undo()
    assert json.loads(first.read_text())["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["bench_x.json"]


def test_json_default_converts_what_json_cannot(common, tmp_path):
    path = common.save_result(
        "bench_x", "", {"snr": np.float32(0.5)}, folder=tmp_path, json_default=float
    )
    assert json.loads(path.read_text())["snr"] == 0.5


def test_save_figure_writes_the_format_of_its_suffix(common, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = common.save_figure(fig, tmp_path / "plot.png")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_peak_rss_follows_this_process_allocations(common):
    before = common.peak_rss_mb()
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    assert common.peak_rss_mb() >= before + 250
    del block


def test_peak_rss_of_a_child_is_not_its_parents(common):
    """A child started while the parent holds 600 MiB reports its own small peak."""
    code = (
        "import resource, sys; sys.path.insert(0, sys.argv[1]); import common; "
        "print(common.peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    block = np.ones(600 * 2**20 // 8)
    out = subprocess.run(
        [sys.executable, "-c", code, str(BENCHMARKS)], capture_output=True, text=True, check=True
    )
    del block
    own_peak, maxrss = map(float, out.stdout.split())
    assert own_peak < 300
    # what ru_maxrss would have said on Linux (carried over fork and exec)
    if sys.platform.startswith("linux"):
        assert maxrss > 550


def test_timed_returns_the_seconds_and_the_result(common):
    import time

    seconds, out = common.timed(lambda a, b=0: (time.sleep(0.05), a + b)[1], 2, b=3)
    assert out == 5
    assert 0.05 <= seconds < 5.0


def test_measured_on_is_what_save_result_records(common, tmp_path):
    record = json.loads(common.save_result("bench_y", "", {}, folder=tmp_path).read_text())
    on = common.measured_on()
    assert record["machine"] == on["machine"] and record["libraries"] == on["libraries"]


def test_cluster_arguments_are_the_tools_and_reach_the_same_config(common):
    """A benchmark's disca_cluster flags are the tool's (names, defaults, choices), and the parsed
    values make the EMConfig that the tool's own options make."""
    import argparse
    from dataclasses import asdict

    from disca_tools.cli.cluster import Options, parse_k_candidates
    from disca_tools.cluster.config import BEYOND_PAPER, EMConfig
    from disca_tools.runtime.cli import build_parser

    ap = argparse.ArgumentParser()
    common.add_cluster_arguments(ap, ["pca_dim", "lr", "precision", *BEYOND_PAPER])
    argv = ["--pca-dim", "7", "--init", "invariants", "--init-covariance", "diag",
            "--init-pca-dim", "8", "--input-dropout", "0", "--pca-trained-classes"]  # fmt: skip
    bench = ap.parse_args(argv)
    tool = build_parser(Options, "disca_cluster", "").parse_args([*argv, "--o", "x"])
    ks = parse_k_candidates(tool.k_candidates)  # the tool's text, parsed as the tool does
    assert asdict(EMConfig.from_options(bench)) == asdict(
        EMConfig.from_options(tool, k_candidates=ks)
    )
    cfg = EMConfig.from_options(bench, seed=3)
    assert (cfg.pca_dim, cfg.init_pca_dim, cfg.input_dropout, cfg.seed) == (7, 8, 0.0, 3)
    assert cfg.pca_trained_classes and cfg.init_covariance == "diag"
    # unset: the defaults, which are the paper's choices ("auto" precision is resolved later)
    assert asdict(EMConfig.from_options(ap.parse_args([]), precision="float32")) == asdict(
        EMConfig()
    )
    assert EMConfig.paper_choices() == {  # METHOD.md: the paper's network start, PCA 16, dropout 0.5
        "init": "network", "init_epochs": 0, "init_covariance": "full", "init_pca_dim": 0,
        "train_clusters": 0, "calibrate_bn": False, "input_dropout": 0.5,
        "pca_trained_classes": False, "predict_rotations": 1, "projection": "pca",
        "init_refine": "none", "pca_dim": 16,
    }  # fmt: skip
    with pytest.raises(SystemExit):  # the tool's choices
        ap.parse_args(["--init-covariance", "spherical"])


def test_table_s1_names_the_options_beyond_the_paper_it_ran_with():
    spec = importlib.util.spec_from_file_location(
        "bench_table_s1", BENCHMARKS / "bench_table_s1.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    given = {"init": "invariants", "init_epochs": 8, "input_dropout": 0.0, "pca_trained_classes": True,
             "init_covariance": "full", "calibrate_bn": False}  # fmt: skip
    assert bench.beyond_paper(given) == (
        "--init invariants --init-epochs 8 --input-dropout 0.0 --pca-trained-classes"
    )
    assert bench.beyond_paper({"init": "network"}) == "none"


def test_a_probe_runs_its_cells_in_order_and_saves_protocol_rows_and_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import argparse

    import table_s1_cell

    ap = argparse.ArgumentParser()
    table_s1_cell.add_cell_arguments(ap, n_per_class=7)
    args = ap.parse_args(["--snr-convention", "aitom", "--tag", "t"])
    args.cells = "60:0.1,40:0.01"
    protocol = table_s1_cell.cell_protocol(args, rotations=11)
    assert protocol == {"n_per_class": 7, "angpix": 14.0, "snr_convention": "aitom", "seed": 0,
                        "box": 24, "rotations": 11}  # fmt: skip

    def run_cell(a, tilt, snr):
        return {"tilt": tilt, "snr": snr, **({"seconds": 5.0} if tilt == 40 else {})}

    def markdown(rows, proto):
        return "".join(f"{r['tilt']}:{r['snr']} {proto['rotations']}\n" for r in rows)

    assert table_s1_cell.run_probe("probe_x", args, run_cell, markdown, protocol, tmp_path) == 0
    record = json.loads((tmp_path / "probe_x_t.json").read_text())
    assert record["protocol"] == protocol
    assert [(c["tilt"], c["snr"]) for c in record["cells"]] == [(60, 0.1), (40, 0.01)]
    assert 0.0 <= record["cells"][0]["seconds"] < 5.0  # measured where the cell did not say
    assert record["cells"][1]["seconds"] == 5.0  # kept where it did
    assert (tmp_path / "probe_x_t.md").read_text() == "60:0.1 11\n40:0.01 11\n"


def test_classification_scores_of_a_probe(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import table_s1_cell

    labels = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    scores = table_s1_cell.classification_scores(pred, labels, 3, 60, 0.01)
    assert scores == {"accuracy": 66.67, "accuracy_per_class": [50.0, 66.7, 100.0],
                      "paper_acc": 94.8}  # fmt: skip
    assert table_s1_cell.classification_scores(pred, labels, 3, 40, 0.003)["paper_acc"] is None


@pytest.fixture()
def cluster_errors(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        "probe_cluster_errors", BENCHMARKS / "probe_cluster_errors.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_split_by_the_long_axis_to_the_beam_is_told_by_orientation(cluster_errors):
    from disca_tools.geometry import random_rotations

    rotations = random_rotations(600, np.random.default_rng(3))
    axis = np.array([0.6, 0.0, 0.8])
    beam_cos = np.abs(np.einsum("nji,j->ni", rotations, axis)[:, 2])  # |z| of Mᵀa
    along = beam_cos > 0.5  # long axis within 60° of the beam
    split = cluster_errors.split_by_orientation(rotations, along, axis)
    assert split["orientation_predicts_percent"] >= 85.0
    assert split["orientation_predicts_percent"] > split["majority_percent"] + 20
    near, far = split["long_axis_to_beam_deg"]
    assert near < 40.0 < 65.0 < far
    # a split that has nothing to do with orientation is not predicted from it
    noise = np.random.default_rng(4).random(600) < 0.5
    chance = cluster_errors.split_by_orientation(rotations, noise, axis)
    assert chance["orientation_predicts_percent"] < chance["majority_percent"] + 8


def test_the_best_merge_joins_the_halves_of_a_split_class(cluster_errors):
    truth = np.repeat([0, 1, 2], 50)
    labels = truth.copy()
    labels[:20] = 3  # class 0 over clusters 0 and 3
    labels[60] = 2  # one particle of class 1 elsewhere
    pair, accuracy = cluster_errors.best_merge(truth, labels)
    assert pair == (0, 3)
    assert accuracy == pytest.approx(100 * 149 / 150)


def test_the_long_axis_of_an_elongated_map_is_its_longest_direction(cluster_errors, monkeypatch):
    z, y, x = np.indices((21, 21, 21)) - 10.0
    rod = (((x / 9) ** 2 + (y / 3) ** 2 + (z / 3) ** 2) <= 1).astype(np.float32)
    monkeypatch.setattr(cluster_errors, "load_structure", lambda name, angpix: rod)
    axis = cluster_errors.long_axis("rod", 10.0)
    assert abs(axis[0]) == pytest.approx(1.0, abs=1e-6)


def test_the_watcher_saves_each_iteration_for_the_error_probe(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from types import SimpleNamespace

    import table_s1_cell

    truth = np.repeat([0, 1], 5)
    watch = table_s1_cell.IterationWatcher(truth, save_dir=tmp_path)
    labels = truth[::-1].copy()
    post = np.eye(2)[labels]
    x = np.arange(20.0).reshape(10, 2)
    watch(SimpleNamespace(iteration=3, k=2, labels=labels, x=x, eligible=True, posteriors=post))
    saved = np.load(tmp_path / "iteration_003.npz")
    assert saved["labels"].tolist() == labels.tolist()
    assert np.array_equal(saved["x"], x) and np.array_equal(saved["posteriors"], post)
    assert int(saved["k"]) == 2 and bool(saved["eligible"])
    assert watch.records[0]["accuracy"] == 100.0
    labels[:] = 0  # the watcher keeps its own copy of each iteration's labels
    assert watch.labels_by_iteration[3].tolist() == truth[::-1].tolist()


def test_save_arrays_writes_one_npz_through_a_rename(common, tmp_path):
    path = common.save_arrays(tmp_path / "it.npz", labels=np.arange(3), k=2)
    saved = np.load(path)
    assert saved["labels"].tolist() == [0, 1, 2] and int(saved["k"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["it.npz"]  # no temporary left, no ".npz.npz"


def test_table_s1_starts_classify3d_from_the_disca_iteration_asked_for(monkeypatch, capsys):
    """``--c3d-start`` hands classify3d the DISCA run's reported clusters (default) or its
    iteration 0's, and the table names the second start."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from types import SimpleNamespace

    import bench_table_s1

    truth = np.repeat([0, 1], 4)
    iteration0, reported = truth.copy(), truth[::-1].copy()
    cell = SimpleNamespace(
        volumes=np.zeros((8, 4, 4, 4), np.float32), labels=truth, effective_snr=0.2
    )
    monkeypatch.setattr(bench_table_s1, "simulate_cell", lambda *a, **k: cell)
    by_iteration = {0: iteration0, 1: reported}
    monkeypatch.setattr(bench_table_s1, "run_disca", lambda *a: (reported, {}, by_iteration))
    starts = []

    def classify3d_from(volumes, truth, start_labels, tilt, args, save_dir=None):
        starts.append(start_labels)
        return start_labels, {"classify3d_start": args.c3d_start}

    monkeypatch.setattr(bench_table_s1, "run_classify3d", classify3d_from)
    monkeypatch.setattr(bench_table_s1, "save", lambda rows, protocol, tag: None)
    for start, expected in (("reported", reported), ("iteration0", iteration0)):
        argv = ["--methods", "disca,classify3d", "--cells", "60:0.1", "--c3d-start", start]
        assert bench_table_s1.main(argv) == 0
        assert starts[-1] is expected
        table = capsys.readouterr().out.split("| tilt |")[-1]
        assert ("| classify3d (from DISCA's iteration 0) |" in table) == (start == "iteration0")
        assert "| classify3d |" in table or start == "iteration0"


def test_table_s1_saves_the_classification_before_and_after_split_and_merge(tmp_path, monkeypatch):
    """``--save-iterations`` keeps classify3d's result and the classification before
    split-and-merge (probes start from them), and the row reports the earlier accuracy. The
    real split-and-merge is wrapped so that its result surely differs from its input (with
    two classes it would return the input), so a swap of the two would fail."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import argparse
    import dataclasses

    import bench_table_s1

    from disca_tools.cluster import classify3d
    from disca_tools.evaluate import clustering_metrics
    from disca_tools.simulate.imaging import Imaging
    from disca_tools.simulate.subtomograms import simulate_subtomogram_set

    seen = {}
    real_split_and_merge = classify3d.split_and_merge

    def split_and_merge_moving_half(read, n, result, config, offsets=None):
        seen["before"] = result.labels.copy()
        out = real_split_and_merge(read, n, result, config, offsets)
        moved = out.labels.copy()
        moved[: n // 2] = 1 - moved[: n // 2]  # half the particles to the other class
        seen["after"] = moved
        return dataclasses.replace(out, labels=moved)

    monkeypatch.setattr(classify3d, "split_and_merge", split_and_merge_moving_half)
    s = simulate_subtomogram_set(["1bxn", "4v4r"], 8, 24, 14.0, 0.5, Imaging(), seed=0)
    start = s.labels.copy()
    start[:3] = 1 - start[:3]
    args = argparse.Namespace(
        c3d_rotations=30, c3d_iterations=5, c3d_hold=2, c3d_temperature=5.0, c3d_lowpass_px=3.0,
        c3d_max_shift_px=0.0, seed=0, c3d_split_merge_rounds=1, c3d_split_merge_judge="held-out",
        c3d_start="reported",
    )  # fmt: skip
    labels, extra = bench_table_s1.run_classify3d(s.volumes, s.labels, start, 60, args, tmp_path)
    saved = np.load(tmp_path / "classify3d.npz")
    assert np.array_equal(labels, seen["after"]) and np.array_equal(saved["labels"], labels)
    assert saved["poses"].shape == (16, 3, 3) and saved["references"].shape[1:] == (24, 24, 24)
    before = saved["labels_before_split_merge"]
    assert np.array_equal(before, seen["before"]) and not np.array_equal(before, labels)
    acc_before = round(100 * clustering_metrics(s.labels, before)["accuracy"], 2)
    assert extra["classify3d_accuracy_before_split_merge"] == acc_before
    assert acc_before != round(100 * clustering_metrics(s.labels, labels)["accuracy"], 2)
