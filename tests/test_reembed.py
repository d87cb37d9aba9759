"""disca_reembed: class maps placed back into tomograms (RELION's convention), labels, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import correlation as _cc  # noqa: E402

from disca_tools.cli.reembed import main
from disca_tools.geometry import euler_to_matrix
from disca_tools.io.mrc import read_info, read_volume, write_volume
from disca_tools.io.star import default_optics, read_star_blocks, write_star_blocks
from disca_tools.reembed import Placements, match_maps, prepare_class_map, reembed_arrays
from disca_tools.simulate.imaging import NO_CTF_NO_WEDGE
from disca_tools.simulate.structures import load_structure
from disca_tools.simulate.tomogram import TomogramSimulation, simulate_tomogram

ANGPIX = 14.0
STRUCTURES = ["1bxn", "3j9i"]
SHAPE_XYZ = (96, 96, 48)


@pytest.fixture(scope="module")
def clean_sim() -> TomogramSimulation:
    """Noise-free, no CTF, no wedge: clean_zyx = −(sum of the placed structures)."""
    return simulate_tomogram(
        STRUCTURES, SHAPE_XYZ, 8, ANGPIX, float("inf"), NO_CTF_NO_WEDGE, seed=1
    )


def _label_near(labels: np.ndarray, row) -> int:
    """The most frequent non-zero label within ±3 voxels of a particle centre (3j9i is hollow)."""
    z, y, x = int(row.z_px), int(row.y_px), int(row.x_px)
    win = labels[max(z - 3, 0) : z + 4, max(y - 3, 0) : y + 4, max(x - 3, 0) : x + 4].ravel()
    win = win[win > 0]
    return int(np.bincount(win).argmax()) if len(win) else 0


def _write_project(sim: TomogramSimulation, shift_px: float = 3.0, angles: bool = True) -> None:
    """Tomo/tomo.mrc, maps class_001/002.mrc and gt.star (RELION 3.1); half the particles have their
    coordinates moved by ``shift_px`` and the move undone by rlnOrigin (centre = coordinate − origin)."""
    write_volume("Tomo/tomo.mrc", sim.volume_zyx, ANGPIX)
    for k, name in enumerate(STRUCTURES, start=1):
        write_volume(f"Maps/class_{k:03d}.mrc", load_structure(name, ANGPIX), ANGPIX)
    p = sim.particles
    n = len(p)
    move = np.where(np.arange(n) % 2 == 0, shift_px, 0.0)
    parts = pd.DataFrame(
        {
            "rlnMicrographName": ["Tomo/tomo.mrc"] * n,
            "rlnCoordinateX": p["x_px"] + move,
            "rlnCoordinateY": p["y_px"] - move,
            "rlnCoordinateZ": p["z_px"] + move,
            "rlnOriginXAngst": move * ANGPIX,
            "rlnOriginYAngst": -move * ANGPIX,
            "rlnOriginZAngst": move * ANGPIX,
            "rlnClassNumber": p["class_number"],
            "rlnOpticsGroup": 1,
        }
    )
    if angles:
        parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"] = (
            p["rot"],
            p["tilt"],
            p["psi"],
        )
    optics = default_optics(ANGPIX, 24)
    optics["rlnMicrographPixelSize"] = ANGPIX
    write_star_blocks("gt.star", {"optics": optics, "particles": parts})


def test_reembedding_ground_truth_reproduces_noise_free_tomogram(
    clean_sim, project_dir: Path
) -> None:
    _write_project(clean_sim)
    args = ["--i", "gt.star", "--maps", "Maps/class_001.mrc", "Maps/class_002.mrc"]
    assert main([*args, "--tomograms", "Tomo/tomo.mrc", "--o", "Re", "--slab", "7", "-q"]) == 0
    dens, angpix = read_volume("Re/tomo_reembedded.mrc")
    labels = read_volume("Re/tomo_labels.mrc")[0].astype(int)
    assert angpix == pytest.approx(ANGPIX) and dens.shape == clean_sim.clean_zyx.shape
    truth = -clean_sim.clean_zyx  # the simulator writes protein dark; before CTF here (no imaging)
    assert _cc(dens, truth) >= 0.95
    assert _cc(dens, np.flip(truth, axis=2)) < 0.5  # a mirrored placement would not pass
    for _, row in clean_sim.particles.iterrows():  # each particle's centre carries its class
        assert _label_near(labels, row) == row.class_number
    assert set(np.unique(labels)) == {0, 1, 2}
    assert Path("Re/tomo_reembed.png").stat().st_size > 1000
    summary = pd.read_csv("Re/reembed_summary.tsv", sep="\t")
    assert summary["particles"].sum() == len(clean_sim.particles)


def test_slabs_do_not_change_the_result_and_memmap_file_equals_arrays(
    clean_sim, project_dir: Path
) -> None:
    maps = {
        k: prepare_class_map(load_structure(n, ANGPIX), ANGPIX, ANGPIX, k)
        for k, n in enumerate(STRUCTURES, 1)
    }
    p = clean_sim.particles
    pl = Placements(
        p[["x_px", "y_px", "z_px"]].to_numpy(float) + 0.3,
        p["class_number"].to_numpy(),
        euler_to_matrix(p[["rot", "tilt", "psi"]].to_numpy()),
    )
    shape = clean_sim.clean_zyx.shape
    d1, l1 = reembed_arrays(pl, maps, shape, slab=shape[0])
    d2, l2 = reembed_arrays(pl, maps, shape, slab=5)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(l1, l2)
    _write_project(clean_sim, shift_px=0.0)
    assert (
        main(
            [
                "--i",
                "gt.star",
                "--maps",
                "Maps/class_001.mrc",
                "Maps/class_002.mrc",
                "--tomo-shape",
                "96,96,48",
                "--angpix",
                "14",
                "--o",
                "R",
                "--slab",
                "3",
                "-q",
                "--no-png",
            ]
        )
        == 0
    )
    d3, _ = read_volume("R/tomo_reembedded.mrc")
    d4, _ = reembed_arrays(
        Placements(p[["x_px", "y_px", "z_px"]].to_numpy(float), pl.classes, pl.matrices),
        maps,
        shape,
    )
    np.testing.assert_allclose(d3, d4, rtol=1e-4, atol=1e-4)  # angles round-trip the STAR at 1e-6°
    assert read_info("R/tomo_labels.mrc").dtype == np.int16


def test_maps_at_another_voxel_size_are_resampled(clean_sim, project_dir: Path) -> None:
    _write_project(clean_sim)
    for k, name in enumerate(STRUCTURES, start=1):  # RELION-style names, half the sampling
        write_volume(f"Maps/run_class{k:03d}.mrc", load_structure(name, 2 * ANGPIX), 2 * ANGPIX)
    args = [
        "--i",
        "gt.star",
        "--maps",
        "Maps/run_class002.mrc",
        "Maps/run_class001.mrc",
        "--o",
        "Re",
        "-q",
    ]
    assert main(args) == 0  # tomogram found through rlnMicrographName; maps matched by name
    dens, _ = read_volume("Re/tomo_reembedded.mrc")
    assert _cc(dens, -clean_sim.clean_zyx) >= 0.85  # a 28 Å map upsampled: lower resolution


def test_without_angles_places_spheres_of_each_class_size(
    clean_sim, project_dir: Path, caplog
) -> None:
    _write_project(clean_sim, angles=False)
    args = ["--i", "gt.star", "--maps", "Maps/class_001.mrc", "Maps/class_002.mrc", "--o", "S"]
    assert main(args) == 0
    labels = read_volume("S/tomo_labels.mrc")[0].astype(int)
    dens = read_volume("S/tomo_reembedded.mrc")[0]
    maps = {
        k: prepare_class_map(load_structure(n, ANGPIX), ANGPIX, ANGPIX, k)
        for k, n in enumerate(STRUCTURES, 1)
    }
    p = clean_sim.particles
    for _, row in p.iterrows():
        assert _label_near(labels, row) == row.class_number
    # each class's voxel count ≈ its particles × the sphere volume (spheres may touch the edges/each other)
    for k in (1, 2):
        expect = (p["class_number"] == k).sum() * 4 / 3 * np.pi * maps[k].radius_px ** 3
        assert 0.6 * expect < (labels == k).sum() < 1.2 * expect
    assert set(np.unique(dens)) <= {0.0, 1.0, 2.0, 3.0}


def test_match_maps_rules() -> None:
    assert match_maps(["a/run_class002.mrc", "a/run_class001.mrc"], [1, 2, 2]) == {
        1: Path("a/run_class001.mrc"),
        2: Path("a/run_class002.mrc"),
    }
    assert match_maps(["x.mrc", "y.mrc"], [7, 3]) == {3: Path("x.mrc"), 7: Path("y.mrc")}
    assert match_maps(["class_004_average.mrc"], [4])[4].name == "class_004_average.mrc"
    with pytest.raises(Exception, match="class 3 has no map"):
        match_maps(["run_class001.mrc"], [1, 3])
    with pytest.raises(Exception, match="all or none"):
        match_maps(["run_class001.mrc", "x.mrc"], [1, 2])


def test_bad_inputs_one_line_exit_2_nothing_written(clean_sim, project_dir: Path, capsys) -> None:
    _write_project(clean_sim)
    maps = ["--maps", "Maps/class_001.mrc", "Maps/class_002.mrc"]
    blocks = read_star_blocks("gt.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnClassNumber"])
    write_star_blocks("noclass.star", blocks)
    write_volume("Maps/class_002_flat.mrc", np.zeros((10, 12, 12), np.float32), ANGPIX)
    write_volume("Other/other.mrc", np.zeros((8, 8, 8), np.float32), ANGPIX)
    cases = [
        (["--i", "noclass.star", *maps], "rlnClassNumber"),
        (["--i", "gt.star", "--maps", "Maps/class_001.mrc"], "class 2 has no map"),
        (["--i", "gt.star", *maps, "--tomograms", "Other/other.mrc"], "match none"),
        (["--i", "gt.star", "--maps", "Maps/class_001.mrc", "Maps/class_002_flat.mrc"], "cubic"),
        (["--i", "gt.star", *maps, "--tomo-shape", "96,96"], "--tomo-shape"),
        (["--i", "missing.star", *maps], "missing.star"),
    ]
    for k, (args, message) in enumerate(cases):
        capsys.readouterr()
        assert main([*args, "--o", f"Bad{k}", "-q"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (args, err)
        assert not Path(f"Bad{k}").exists() or not any(Path(f"Bad{k}").iterdir())
    assert main(["--i", "gt.star", *maps, "--o", "Ok", "-q", "--no-png"]) == 0
    assert main(["--i", "gt.star", *maps, "--o", "Ok", "-q", "--no-png"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_relion5_particles_through_their_optimisation_set(clean_sim, project_dir: Path) -> None:
    from dataclasses import replace

    from disca_tools.io.star import make_tomograms_table, read_particles, write_relion5

    _write_project(clean_sim)
    table = read_particles("gt.star")
    tomos = make_tomograms_table(
        ["tomo"], [SHAPE_XYZ], ANGPIX, files=["Tomo/tomo.mrc"], binning=2.0
    )
    paths = write_relion5("R5/particles.star", replace(table, tomograms=tomos, flavour="relion5"))
    parts = read_star_blocks(paths["particles"])["particles"]
    assert "rlnCenteredCoordinateXAngst" in parts.columns and "rlnCoordinateX" not in parts.columns
    # shape and voxel size from the tomograms table (no MRC needed), coordinates from centred Å
    args = [
        "--i",
        str(paths["optimisation_set"]),
        "--maps",
        "Maps/class_001.mrc",
        "Maps/class_002.mrc",
    ]
    Path("Tomo/tomo.mrc").unlink()
    assert main([*args, "--o", "R5out", "-q", "--no-png"]) == 0
    dens, angpix = read_volume("R5out/tomo_reembedded.mrc")
    assert angpix == pytest.approx(ANGPIX) and dens.shape == clean_sim.clean_zyx.shape
    assert _cc(dens, -clean_sim.clean_zyx) >= 0.95


def test_real_map_into_real_tomogram_geometry(project_dir: Path) -> None:
    """EMD-3197 (20³ at 11.4 Å, an EMDB header) into the real microtubule crop (10.52 Å): resampled,
    placed at its coordinate with its own orientation, labelled; the tomogram itself is never altered."""
    real = Path(__file__).parent / "data" / "real"
    tomo, emd = (
        real / "microtubule_tomogram_crop_14pf.mrc",
        real / "EMD-3197_subtomogram_average.map",
    )
    info = read_info(tomo)
    before = tomo.read_bytes()
    parts = pd.DataFrame(
        {
            "rlnMicrographName": [str(tomo)] * 2,
            "rlnCoordinateX": [20.0, 60.0],
            "rlnCoordinateY": [20.0, 110.0],
            "rlnCoordinateZ": [20.0, 24.0],
            "rlnAngleRot": [0.0, 30.0],
            "rlnAngleTilt": [0.0, 70.0],
            "rlnAnglePsi": [0.0, -45.0],
            "rlnClassNumber": [1, 1],
        }
    )
    write_star_blocks("real.star", {"particles": parts})  # RELION 3.0 style, single block
    args = [
        "--i",
        "real.star",
        "--maps",
        str(emd),
        "--tomograms",
        str(tomo),
        "--coord-angpix",
        str(info.angpix),
    ]
    assert main([*args, "--o", "Real", "-q"]) == 0
    dens, angpix = read_volume("Real/microtubule_tomogram_crop_14pf_reembedded.mrc")
    assert dens.shape == info.shape_zyx and angpix == pytest.approx(info.angpix, rel=1e-4)
    vol, emd_angpix = read_volume(emd)
    cm = prepare_class_map(vol, emd_angpix, info.angpix, 1)
    n = cm.volume_zyx.shape[0]
    assert n == round(20 * 11.4 / info.angpix)  # resampled to the tomogram's voxel size
    box = dens[
        20 - n // 2 : 20 - n // 2 + n, 20 - n // 2 : 20 - n // 2 + n, 20 - n // 2 : 20 - n // 2 + n
    ]
    np.testing.assert_allclose(
        box, cm.volume_zyx, atol=1e-5
    )  # identity orientation: the map itself
    labels = read_volume("Real/microtubule_tomogram_crop_14pf_labels.mrc")[0]
    inside = int((cm.volume_zyx > cm.threshold).sum())  # both particles lie fully inside the crop
    assert 1.7 * inside < int((labels == 1).sum()) < 2.3 * inside
    assert (
        labels[24 - n // 2 : 24 + n // 2, 110 - n // 2 : 110 + n // 2, 60 - n // 2 : 60 + n // 2]
        == 1
    ).sum() > 0.7 * inside
    assert tomo.read_bytes() == before
