"""disca_cluster end to end on simulated subtomograms of real structures, and its bad inputs."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from helpers import simulate_subtomograms, working_directory  # noqa: E402

from disca_tools.cli import cluster as C
from disca_tools.cluster.config import EMConfig
from disca_tools.cluster.matching import accuracy_after_matching
from disca_tools.io.star import read_particles, read_star_blocks, write_star_blocks

TINY = ["--k-candidates", "2-5", "--pca-dim", "4", "--width-scale", "0.1", "--feature-dim", "32",
        "--precision", "float32", "--seed", "3", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with 3 very different structures (ribosome, small, elongated) at SNR 10."""
    root = tmp_path_factory.mktemp("project")
    with working_directory(root):
        simulate_subtomograms("Sim", ["4v4r", "1s3x", "3d2f"], 50, 24, 10, 10, 1)
        assert C.main(["--i", "Sim/particles.star", "--o", "Full", "--max-iter", "3", *TINY]) == 0
        yield root


def _classes(path: str | Path) -> np.ndarray:
    return read_particles(path).particles["rlnClassNumber"].to_numpy()


def test_finds_three_classes_and_writes_everything(project):
    truth = _classes("Sim/particles.star")
    table = read_particles("Full/clusters.star").particles
    inp = read_particles("Sim/particles.star").particles
    assert set(inp.columns) | {"rlnMaxValueProbDistribution"} == set(table.columns)
    assert (table["rlnImageName"] == inp["rlnImageName"]).all()
    labels = table["rlnClassNumber"].to_numpy()
    assert sorted(set(labels)) == [1, 2, 3]
    assert accuracy_after_matching(truth, labels) >= 0.9
    post = table["rlnMaxValueProbDistribution"].to_numpy()
    assert np.all((post > 0.33) & (post <= 1.0))
    hist = pd.read_csv("Full/history.tsv", sep="\t")
    assert hist["iteration"].tolist()[0] == 0 and {
        "K",
        "BIC_K2",
        "BIC_K5",
        "DDBI",
        "fraction_changed",
        "loss",
        "seconds",
    } <= set(hist.columns)
    assert hist["reported"].sum() == 1 and hist.loc[hist["reported"] == 1, "iteration"].item() >= 1
    # every iteration's classes; the reported iteration's are clusters.star
    stars = sorted(p.name for p in Path("Full/iterations").glob("*.star"))
    assert stars == [C.iteration_star("Full", i).name for i in hist["iteration"]]
    for it, k in zip(hist["iteration"], hist["K"], strict=True):
        assert len(set(_classes(C.iteration_star("Full", it)))) == k
    best = hist.loc[hist["reported"] == 1, "iteration"].item()
    pd.testing.assert_frame_equal(read_particles(C.iteration_star("Full", best)).particles, table)
    trained = hist["loss"].notna().to_numpy()  # every iteration but the last is trained
    assert (hist.loc[trained, "epochs"] > 0).all() and (hist.loc[~trained, "epochs"] == 0).all()
    cfg = json.loads(Path("Full/run_config.json").read_text())
    assert cfg["box"] == 24 and cfg["k"] == 3 and cfg["input_dropout"] == EMConfig.input_dropout
    assert np.load("Full/features.npy").shape == (150, 32)
    for p in C.PLOTS:
        assert Path("Full/plots", p).stat().st_size > 1000
    assert Path("Full/model.keras").is_file() and Path("Full/mixture.pkl").is_file()
    # refuses to overwrite without --overwrite, and leaves the outputs alone
    before = Path("Full/clusters.star").read_bytes()
    assert C.main(["--i", "Sim/particles.star", "--o", "Full", "--max-iter", "1", *TINY]) == 2
    assert Path("Full/clusters.star").read_bytes() == before


def test_continue_after_interruption_equals_uninterrupted_run(project):
    assert C.main(["--i", "Sim/particles.star", "--o", "Cut", "--max-iter", "1", *TINY]) == 0
    assert json.loads(Path("Cut/checkpoint/state.json").read_text())["iteration"] == 0
    assert (
        C.main(["--i", "Sim/particles.star", "--o", "Cut", "--max-iter", "3", "--continue", *TINY])
        == 0
    )
    np.testing.assert_array_equal(_classes("Cut/clusters.star"), _classes("Full/clusters.star"))
    a = pd.read_csv("Cut/history.tsv", sep="\t")
    b = pd.read_csv("Full/history.tsv", sep="\t")
    same = [c for c in b.columns if not c.startswith("seconds")]
    pd.testing.assert_frame_equal(a[same], b[same])
    np.testing.assert_array_equal(np.load("Cut/features.npy"), np.load("Full/features.npy"))
    for it in b["iteration"]:  # the iterations before and after the interruption
        np.testing.assert_array_equal(
            _classes(C.iteration_star("Cut", it)), _classes(C.iteration_star("Full", it))
        )


def test_warning_about_skipped_candidate_k_is_logged_once(project):
    import logging

    from disca_tools.runtime.log import logger

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        # 150 particles at PCA 4 allow K ≤ 30: candidates up to 40 are partly skipped
        args = ["--i", "Sim/particles.star", "--o", "Warn", "--max-iter", "1", *TINY]
        assert C.main([*args, "--k-candidates", "2-40", "--no-iteration-stars"]) == 0
    finally:
        logger.removeHandler(handler)
    assert sum("will be skipped" in m for m in seen) == 1
    assert Path("Warn/clusters.star").is_file() and not Path("Warn/iterations").exists()


def test_init_model_fine_tunes_the_trained_network(project):
    # the trained run's network (width, feature size), whatever the options say; its features
    # start the loop, so iteration 0 is a trained network's clustering and can be reported
    args = ["--i", "Sim/particles.star", "--o", "Tuned", "--init-model", "Full", "--max-iter", "1",
            *TINY, "--width-scale", "0.2", "--feature-dim", "16"]  # fmt: skip
    assert C.main(args) == 0
    full = json.loads(Path("Full/run_config.json").read_text())
    tuned = json.loads(Path("Tuned/run_config.json").read_text())
    assert (tuned["width_scale"], tuned["feature_dim"]) == (
        full["width_scale"],
        full["feature_dim"],
    )
    assert np.load("Tuned/features.npy").shape == (150, full["feature_dim"])
    hist = pd.read_csv("Tuned/history.tsv", sep="\t")
    assert hist.loc[hist["iteration"] == 0, "eligible"].item() == 1
    truth = _classes("Sim/particles.star")
    assert accuracy_after_matching(truth, _classes("Tuned/clusters.star")) >= 0.9


@pytest.mark.parametrize("images", ["in_place", "mrc_files"])
def test_model_assigns_new_particles_from_another_star(project, images):
    """A STAR in another folder (no fast store beside it). Its images in Sim/ are read from Sim's
    store in place; copies of them elsewhere (no store above them) are streamed into a store."""
    other, out = Path(f"Other_{images}"), Path(f"Assign_{images}")
    other.mkdir()
    if images == "in_place":
        shutil.copy("Sim/particles.star", other / "particles.star")
    else:
        shutil.copytree("Sim", "Copy", ignore=shutil.ignore_patterns("subtomograms*"))
        _star_with(str(other / "particles.star"), lambda p: p.assign(
            rlnImageName=p["rlnImageName"].str.replace("Sim/", "Copy/", regex=False)))  # fmt: skip
    args = ["--i", str(other / "particles.star"), "--o", str(out), "--model", "Full",
            "--precision", "float32", "-q"]  # fmt: skip
    assert C.main(args) == 0
    assert (out / "subtomograms.npy").is_file() == (images == "mrc_files")
    np.testing.assert_array_equal(_classes(out / "clusters.star"), _classes("Full/clusters.star"))
    np.testing.assert_allclose(
        np.load(out / "features.npy"), np.load("Full/features.npy"), rtol=1e-4, atol=1e-4
    )


def test_model_assigns_with_the_trained_runs_rotation_averaged_features(project):
    """--predict-rotations N: the run records N, its features are the rotation-averaged ones (not
    the plain features of the same network), and --model computes new particles' features alike."""
    import keras

    from disca_tools.model.data import open_store, predict_features

    args = ["--i", "Sim/particles.star", "--o", "Rot", "--max-iter", "1", "--predict-rotations", "3",
            *TINY]  # fmt: skip
    assert C.main(args) == 0
    assert json.loads(Path("Rot/run_config.json").read_text())["predict_rotations"] == 3
    feats = np.load("Rot/features.npy")
    extractor = keras.models.load_model("Rot/model.keras")
    store, rows = open_store("Sim"), np.arange(150)
    np.testing.assert_allclose(
        predict_features(extractor, store, rows, rotations=3, seed=3), feats, rtol=1e-4, atol=1e-4
    )
    plain = predict_features(extractor, store, rows)
    assert not np.allclose(plain, feats, atol=1e-3)
    args = ["--i", "Sim/particles.star", "--o", "RotAssign", "--model", "Rot", "--precision",
            "float32", "-q"]  # fmt: skip
    assert C.main(args) == 0
    np.testing.assert_allclose(np.load("RotAssign/features.npy"), feats, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(
        _classes("RotAssign/clusters.star"), _classes("Rot/clusters.star")
    )


def _star_with(path: str, edit) -> str:
    blocks = read_star_blocks("Sim/particles.star")
    blocks["particles"] = edit(blocks["particles"].copy())
    write_star_blocks(path, blocks, overwrite=True)
    return path


def _mrc(path: str, data: np.ndarray) -> str:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data.astype(np.float32))
        m.voxel_size = 10.0
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "mixed",
        "nan",
        "constant",
        "few",
        "model_dir",
        "model_box",
        "continue",
        "dropout",
        "rotations",
    ],  # fmt: skip
)
def test_bad_inputs_exit_2_and_write_nothing(project, case, capsys):
    Path("Bad").mkdir(exist_ok=True)
    star = "Bad/particles.star"
    args = ["--i", star, "--o", f"Out_{case}", *TINY]
    vol = np.asarray(mrcfile.read("Sim/Subtomograms/sub_000001.mrc"))

    def replace_first(name):
        return lambda df: df.assign(rlnImageName=[name] + df["rlnImageName"].tolist()[1:])

    if case == "missing":
        _star_with(star, replace_first("Bad/nothere.mrc"))
    elif case == "mixed":
        _star_with(star, replace_first(_mrc("Bad/small.mrc", vol[:20, :20, :20])))
    elif case == "nan":
        v = vol.copy()
        v[3, 4, 5] = np.nan
        _star_with(star, replace_first(_mrc("Bad/nan.mrc", v)))
    elif case == "constant":
        _star_with(star, replace_first(_mrc("Bad/flat.mrc", np.full_like(vol, 2.0))))
    elif case == "few":
        _star_with(star, lambda df: df.iloc[:12])
        args = ["--i", star, "--o", f"Out_{case}", "--pca-dim", "16", "-q"]
    elif case == "model_dir":
        _star_with(star, lambda df: df)
        Path("NotARun").mkdir(exist_ok=True)
        args = ["--i", star, "--o", f"Out_{case}", "--model", "NotARun", "-q"]
    elif case == "model_box":
        _star_with(star, lambda df: df)
        shutil.copytree(
            "Full", "Box32", dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint")
        )
        cfg = json.loads(Path("Box32/run_config.json").read_text())
        Path("Box32/run_config.json").write_text(json.dumps(dict(cfg, box=32)))
        args = ["--i", star, "--o", f"Out_{case}", "--model", "Box32", "-q"]
    elif case == "continue":
        _star_with(star, lambda df: df)
        args.append("--continue")
    elif case == "dropout":
        _star_with(star, lambda df: df)
        args += ["--input-dropout", "1"]
    elif case == "rotations":
        _star_with(star, lambda df: df)
        args += ["--predict-rotations", "0"]
    capsys.readouterr()
    assert C.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("disca_cluster: error:")
    assert not Path(f"Out_{case}").exists()
