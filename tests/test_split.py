"""disca_split_star: per-class STAR files that keep everything, selection options, class averages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from disca_tools.cli.split_star import main
from disca_tools.io.mrc import read_volume
from disca_tools.io.star import read_star_blocks, write_star_blocks
from disca_tools.split import parse_class_list, parse_merges, split_blocks

DATA = Path(__file__).parent / "data" / "star"


@pytest.fixture
def clustered(
    simulated_subtomogram_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A project with Sim/ (3 classes × 8) and Sim/clusters.star: ground-truth classes as the
    clustering, a posterior per particle and two optics groups (every other particle in group 2)."""
    root = tmp_path / "proj"
    shutil.copytree(simulated_subtomogram_project, root)
    monkeypatch.chdir(root)
    blocks = read_star_blocks("Sim/particles.star")
    optics = blocks["optics"]
    g2 = optics.copy()
    g2["rlnOpticsGroup"] = 2
    g2["rlnOpticsGroupName"] = "opticsGroup2"
    blocks["optics"] = pd.concat([optics, g2], ignore_index=True)
    parts = blocks["particles"].copy()
    parts["rlnOpticsGroup"] = 1 + (np.arange(len(parts)) % 2)
    parts["rlnMaxValueProbDistribution"] = np.linspace(0.3, 1.0, len(parts))
    blocks["particles"] = parts
    write_star_blocks("Sim/clusters.star", blocks)
    return root


def test_split_keeps_blocks_columns_paths_and_writes_averages(clustered: Path) -> None:
    assert main(["--i", "Sim/clusters.star", "--o", "Split", "-q"]) == 0
    src = read_star_blocks("Sim/clusters.star")
    parts = src["particles"]
    seen = []
    store = np.load("Sim/subtomograms.npy")
    names = Path("Sim/subtomograms_names.txt").read_text().split()
    for c in (1, 2, 3):
        out = read_star_blocks(f"Split/class_{c:03d}.star")
        assert list(out) == ["optics", "particles"]  # RELION 3.1 legacy in, legacy out
        pd.testing.assert_frame_equal(out["optics"], src["optics"])  # both optics groups kept
        p = out["particles"]
        assert list(p.columns) == list(parts.columns)  # every column, same order
        expected = parts[parts["rlnClassNumber"] == c].reset_index(drop=True)
        pd.testing.assert_frame_equal(p, expected)  # paths stay project-relative, values untouched
        seen += list(p["rlnImageName"])
        avg, angpix = read_volume(f"Split/class_{c:03d}_average.mrc")
        rows = [names.index(n) for n in p["rlnImageName"]]
        np.testing.assert_allclose(avg, store[rows].mean(axis=0), atol=1e-5)
        assert angpix == pytest.approx(14.0)
    assert sorted(seen) == sorted(parts["rlnImageName"])
    tsv = pd.read_csv("Split/classes.tsv", sep="\t")
    for _, row in tsv.iterrows():
        members = parts[parts["rlnClassNumber"] == row["class"]]
        assert row["size"] == len(members)
        assert row["mean_posterior"] == pytest.approx(
            members["rlnMaxValueProbDistribution"].mean(), abs=1e-4
        )
    steps = Path("Split/next_steps.txt").read_text()
    assert (
        "relion_refine" in steps
        and "--ref Split/class_002_average.mrc" in steps
        and "--i Split/class_003.star" in steps
    )
    assert "--ctf" in steps  # the input has rlnCtfImage


def test_averages_from_mrc_files_equal_fast_store(clustered: Path) -> None:
    assert main(["--i", "Sim/clusters.star", "--o", "A", "-q", "--classes", "2"]) == 0
    Path("Sim/subtomograms.npy").unlink()
    assert main(["--i", "Sim/clusters.star", "--o", "B", "-q", "--classes", "2"]) == 0
    a, _ = read_volume("A/class_002_average.mrc")
    b, _ = read_volume("B/class_002_average.mrc")
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not Path("A/class_001.star").exists()


def test_selection_merge_min_size_min_probability(clustered: Path) -> None:
    blocks = read_star_blocks("Sim/clusters.star")
    parts = blocks["particles"]
    post = parts["rlnMaxValueProbDistribution"].to_numpy()
    res = split_blocks(blocks, merges=parse_merges(["2+3"]), min_probability=0.6)
    assert sorted(res.classes) == [1, 2]
    merged = res.classes[2]["particles"]
    want = parts[parts["rlnClassNumber"].isin([2, 3]) & (post >= 0.6)]
    assert len(merged) == len(want) and set(merged["rlnClassNumber"]) == {2}
    assert list(merged["rlnImageName"]) == list(want["rlnImageName"])
    row = res.summary.set_index("class").loc[2]
    assert row["merged_from"] == "2+3" and row["size_before_probability_cut"] == 16
    # --min-size drops the small class 1 (under the probability cut); --exclude and --classes
    n1 = int(((parts["rlnClassNumber"] == 1) & (post >= 0.6)).sum())
    res = split_blocks(blocks, merges=[[2, 3]], min_probability=0.6, min_size=n1 + 1)
    assert sorted(res.classes) == [2]
    assert sorted(split_blocks(blocks, exclude=[1]).classes) == [2, 3]
    assert sorted(split_blocks(blocks, classes=[1, 3]).classes) == [1, 3]
    assert parse_class_list("1,4 6-7") == [1, 4, 6, 7]
    # through the CLI
    assert (
        main(
            [
                "--i",
                "Sim/clusters.star",
                "--o",
                "M",
                "-q",
                "--merge",
                "2+3",
                "--exclude",
                "1",
                "--no-averages",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in Path("M").glob("class_*")) == ["class_002.star"]


def test_relion5_in_relion5_out(project_dir: Path) -> None:
    shutil.copytree(DATA / "relion5_warp", "R5")
    blocks = read_star_blocks("R5/particles.star")
    parts = blocks["particles"].copy()
    parts["rlnClassNumber"] = 1 + np.arange(len(parts)) % 2
    blocks["particles"] = parts
    write_star_blocks("R5/clusters.star", blocks)
    assert main(["--i", "R5/clusters.star", "--o", "S", "-q"]) == 0
    out = read_star_blocks("S/class_002.star")
    assert list(out) == list(blocks)  # data_general, data_optics, data_particles
    assert out["general"] == blocks["general"]
    assert list(out["particles"].columns) == list(parts.columns)
    assert len(out["particles"]) == int((parts["rlnClassNumber"] == 2).sum())
    opt = read_star_blocks("S/class_002_optimisation_set.star")
    pairs = next(iter(opt.values()))
    assert pairs["rlnTomoParticlesFile"] == "S/class_002.star"
    assert pairs["rlnTomoTomogramsFile"] == "R5/tomograms.star"  # project-relative, existing
    assert not Path("S/class_001_average.mrc").exists()  # 2D-stack pseudo-subtomograms: no average
    assert "--ios S/class_001_optimisation_set.star" in Path("S/next_steps.txt").read_text()


def test_bad_input_is_one_line_exit_2_nothing_written(
    clustered: Path, capsys: pytest.CaptureFixture
) -> None:
    blocks = read_star_blocks("Sim/clusters.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnClassNumber"])
    write_star_blocks("Sim/noclass.star", blocks)
    capsys.readouterr()
    assert main(["--i", "Sim/noclass.star", "--o", "Bad", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Sim/noclass.star" in err and "rlnClassNumber" in err
    assert not Path("Bad").exists() or not any(Path("Bad").glob("class_*"))
    # a missing subtomogram: error naming it, nothing written
    blocks = read_star_blocks("Sim/clusters.star")
    blocks["particles"].loc[3, "rlnImageName"] = "Sim/Subtomograms/missing.mrc"
    write_star_blocks("Sim/missing.star", blocks)
    Path("Sim/subtomograms.npy").unlink()
    assert main(["--i", "Sim/missing.star", "--o", "Bad2", "-q"]) == 2
    assert "missing.mrc" in capsys.readouterr().err
    assert not Path("Bad2").exists() or not any(Path("Bad2").iterdir())
    assert main(["--i", "Sim/clusters.star", "--o", "Bad3", "--classes", "9", "-q"]) == 2
    assert "class 9" in capsys.readouterr().err


def test_refuses_to_overwrite_and_never_touches_input(
    clustered: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["--i", "Sim/clusters.star", "-q", "--no-averages", "--classes", "1"]
    assert main([*args, "--o", "Sim"]) == 2  # the simulator's classes.tsv is there
    assert "Sim/classes.tsv" in capsys.readouterr().err
    assert main([*args, "--o", "Out"]) == 0
    assert main([*args, "--o", "Out"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--o", "Out", "--overwrite"]) == 0
    shutil.copy("Sim/clusters.star", "Out/class_001.star")
    before = Path("Out/class_001.star").read_bytes()
    assert (
        main(["--i", "Out/class_001.star", "--o", "Out", "-q", "--no-averages", "--overwrite"]) == 2
    )
    assert "overwrite an input" in capsys.readouterr().err
    assert Path("Out/class_001.star").read_bytes() == before


def test_every_member_is_located_before_averaging(
    clustered: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a store, each kept member's .mrc must exist: any one missing (the first included)
    is an error naming it; none found means no averages (a warning), or an error with --averages;
    a missing file of a class not kept does not matter."""
    Path("Sim/subtomograms.npy").unlink()
    blocks = read_star_blocks("Sim/clusters.star")
    parts = blocks["particles"]
    first_of_2 = int(np.flatnonzero(parts["rlnClassNumber"].to_numpy() == 2)[0])
    parts.loc[first_of_2, "rlnImageName"] = "Sim/Subtomograms/gone.mrc"
    write_star_blocks("Sim/one_missing.star", blocks)
    capsys.readouterr()
    assert main(["--i", "Sim/one_missing.star", "--o", "A", "-q", "--classes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gone.mrc" in err and "1 of 8 missing" in err
    assert not Path("A").exists() or not any(Path("A").iterdir())
    # the STAR's very first particle missing (was checked alone, and its absence skipped averaging)
    blocks0 = read_star_blocks("Sim/clusters.star")
    blocks0["particles"].loc[0, "rlnImageName"] = "Sim/Subtomograms/first_gone.mrc"
    write_star_blocks("Sim/first_missing.star", blocks0)
    assert main(["--i", "Sim/first_missing.star", "--o", "A0", "-q"]) == 2
    assert "first_gone.mrc" in capsys.readouterr().err
    # the same file missing, but its class is not kept: the other classes average as usual
    assert main(["--i", "Sim/one_missing.star", "--o", "B", "-q", "--classes", "1,3"]) == 0
    assert Path("B/class_001_average.mrc").is_file() and Path("B/class_003_average.mrc").is_file()
    # not one file found (a STAR used outside its project, say): no averages, or exit 2 if asked for
    blocks["particles"]["rlnImageName"] = [f"Elsewhere/p{i}.mrc" for i in range(len(parts))]
    write_star_blocks("Sim/elsewhere.star", blocks)
    assert main(["--i", "Sim/elsewhere.star", "--o", "C"]) == 0
    assert "no class averages (none of its 24 subtomograms found" in caplog.text
    assert Path("C/class_001.star").is_file() and not list(Path("C").glob("*_average.mrc"))
    assert main(["--i", "Sim/elsewhere.star", "--o", "D", "-q", "--averages"]) == 2
    assert "cannot compute class averages" in capsys.readouterr().err
