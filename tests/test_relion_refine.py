"""Proof against the real RELION 3.1: our class STAR files and averages are what RELION needs.

* every per-class STAR written by ``disca_split_star`` from a simulated, "clustered" data set (ground
  truth classes and angles) is reconstructed by ``relion_reconstruct --ctf`` into that class's
  structure (correlation ≥ 0.9);
* a short ``relion_refine`` (3 iterations, CPU) on one class STAR with our unaligned class average as
  the reference completes, and ``disca_reembed`` reads its ``run_it003_data.star`` and class map.

RELION missing is a failure, never a skip: ``make test`` installs Debian's relion 3.1.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import correlation as _cc  # noqa: E402
from helpers import relion_exe as _exe  # noqa: E402
from helpers import simulate_subtomograms, working_directory  # noqa: E402

from disca_tools.cli.reembed import main as reembed_main
from disca_tools.cli.split_star import main as split_main
from disca_tools.io.mrc import read_volume
from disca_tools.io.star import read_star_blocks, write_star_blocks

pytestmark = pytest.mark.relion

STRUCTURES = {1: "3j9i", 2: "1bxn"}
BOX, ANGPIX = 24, 14.0


@pytest.fixture(scope="module")
def split_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sim/ (2 classes × 40, box 24 at 14 Å, CTF + wedge, no noise), Sim/clusters.star, Split/."""
    root = tmp_path_factory.mktemp("relion_project")
    with working_directory(root):
        simulate_subtomograms("Sim", list(STRUCTURES.values()), 40, BOX, ANGPIX, "inf", 5)
        blocks = read_star_blocks("Sim/particles.star")
        parts = blocks["particles"].copy()
        parts["rlnMaxValueProbDistribution"] = 0.9
        blocks["particles"] = parts
        write_star_blocks("Sim/clusters.star", blocks)
        assert split_main(["--i", "Sim/clusters.star", "--o", "Split", "-q"]) == 0
    return root


def test_relion_reconstruct_of_each_class_star_gives_its_structure(
    split_project: Path, monkeypatch
) -> None:
    monkeypatch.chdir(split_project)
    exe = _exe("relion_reconstruct")
    for c, name in STRUCTURES.items():
        out = f"Split/class_{c:03d}_reconstruct.mrc"
        res = subprocess.run(
            [exe, "--i", f"Split/class_{c:03d}.star", "--o", out, "--ctf"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, f"relion_reconstruct failed: {res.stderr[-2000:]}"
        rec, _ = read_volume(out)
        ref, _ = read_volume(f"Sim/references/{name}.mrc")
        other, _ = read_volume(f"Sim/references/{STRUCTURES[3 - c]}.mrc")
        assert _cc(rec, ref) >= 0.9, (name, _cc(rec, ref))
        assert _cc(rec, ref) > _cc(rec, other) + 0.1  # it is this class's structure, not a blob
        avg, _ = read_volume(f"Split/class_{c:03d}_average.mrc")
        assert _cc(avg, ref) < _cc(rec, ref)  # the unaligned average is only a starting point


def test_short_relion_refine_from_our_average_then_reembed(
    split_project: Path, monkeypatch
) -> None:
    monkeypatch.chdir(split_project)
    exe = _exe("relion_refine")
    Path("Refine").mkdir(exist_ok=True)
    cmd = [
        exe,
        "--i",
        "Split/class_002.star",
        "--ref",
        "Split/class_002_average.mrc",
        "--firstiter_cc",
    ]
    cmd += [
        "--ini_high",
        "60",
        "--iter",
        "3",
        "--K",
        "1",
        "--ctf",
        "--particle_diameter",
        "270",
        "--pool",
        "10",
    ]
    cmd += [
        "--pad",
        "1",
        "--healpix_order",
        "1",
        "--offset_range",
        "2",
        "--offset_step",
        "2",
        "--sym",
        "C1",
    ]
    cmd += ["--norm", "--scale", "--j", "2", "--o", "Refine/run"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"relion_refine failed: {res.stderr[-2000:]}"
    data = Path("Refine/run_it003_data.star")
    assert data.is_file() and Path("Refine/run_it003_class001.mrc").is_file()

    parts = read_star_blocks(data)["particles"]
    assert len(parts) == 40 and {"rlnAngleRot", "rlnOriginXAngst"} <= set(parts.columns)
    coords = parts[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy()
    size = (coords.max(axis=0) + BOX).astype(int)
    shape = ",".join(str(s) for s in size)
    assert set(parts["rlnClassNumber"]) == {
        1
    }  # RELION renumbers (K = 1): run_it003_class001.mrc serves it
    args = [
        "--i",
        str(data),
        "--maps",
        "Refine/run_it003_class001.mrc",
        "--tomo-shape",
        shape,
        "--angpix",
        str(ANGPIX),
    ]
    assert reembed_main([*args, "--o", "Reembed", "-q"]) == 0
    labels, _ = read_volume("Reembed/simulated_labels.mrc")
    summary = pd.read_csv("Reembed/reembed_summary.tsv", sep="\t")
    assert summary["particles"].sum() == 40
    centres = (
        coords
        - parts[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy() / ANGPIX
    )
    near = [
        labels[
            int(round(z)) - 3 : int(round(z)) + 4,
            int(round(y)) - 3 : int(round(y)) + 4,
            int(round(x)) - 3 : int(round(x)) + 4,
        ].max()
        for x, y, z in centres
    ]
    assert np.all(np.array(near) == 1)  # every refined particle placed at coordinate − origin
