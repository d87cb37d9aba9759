"""disca_extract: box geometry, normalisation, borders, fast store, RELION round trip, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from helpers import correlation, relion_reconstruct  # noqa: E402

from disca_tools.cli.extract import main as extract_main
from disca_tools.cli.pick import main as pick_main
from disca_tools.extract import ExtractParams, box_centres_px, box_starts, read_box, read_store
from disca_tools.geometry import pad_or_crop
from disca_tools.io.mrc import write_volume
from disca_tools.io.star import read_particles, read_star_blocks, write_star_blocks
from disca_tools.simulate.imaging import NO_CTF_NO_WEDGE, Imaging
from disca_tools.simulate.structures import load_structure
from disca_tools.simulate.tomogram import simulate_tomogram

REPO = Path(__file__).resolve().parent.parent


def coords_star(path, xyz, tomo="tomo.mrc", **extra):
    xyz = np.asarray(xyz, dtype=float).reshape(-1, 3)
    df = pd.DataFrame(
        {
            "rlnMicrographName": tomo,
            "rlnCoordinateX": xyz[:, 0],
            "rlnCoordinateY": xyz[:, 1],
            "rlnCoordinateZ": xyz[:, 2],
            **extra,
        }
    )
    write_star_blocks(path, {"particles": df}, overwrite=True)
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION-like project directory as the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_box_geometry_centre_at_n_over_2():
    vol = np.zeros((30, 40, 50), np.float32)
    vol[11, 17, 23] = -5.0  # dark marker at x=23, y=17, z=11
    for box in (8, 9):
        p = ExtractParams(box=box, invert=True)
        starts, resid = box_starts(np.array([[23.0, 17.0, 11.0]]), p)
        sub = read_box(vol, starts[0], p)
        assert np.unravel_index(np.argmax(sub), sub.shape) == (box // 2,) * 3  # inverted: white
        assert np.allclose(resid, 0)
        assert abs(sub.mean()) < 1e-5 and abs(sub.std() - 1) < 1e-4
    # binning 2: marker block at input 22..23 → binned 11; centre is 2*11+0.5
    p = ExtractParams(box=6, binning=2, invert=False)
    vol2 = np.zeros((30, 40, 50), np.float32)
    vol2[10:12, 16:18, 22:24] = 1.0
    starts, resid = box_starts(np.array([[22.5, 16.5, 10.5]]), p)
    sub = read_box(vol2, starts[0], p)
    assert np.unravel_index(np.argmax(sub), sub.shape) == (3, 3, 3)
    assert np.allclose(box_centres_px(np.array([[22.5, 16.5, 10.5]]), 2), [[22.5, 16.5, 10.5]])
    assert np.allclose(resid, 0)


def test_pad_fills_matching_noise():
    rng = np.random.default_rng(0)
    vol = rng.normal(3.0, 2.0, (20, 20, 20)).astype(np.float32)
    p = ExtractParams(box=10, border="pad", invert=False)
    starts, _ = box_starts(np.array([[1.0, 10.0, 10.0]]), p)  # x from -4
    sub = read_box(vol, starts[0], p, rng)
    assert sub.shape == (10, 10, 10) and np.isfinite(sub).all()
    inside, outside = sub[:, :, 4:], sub[:, :, :4]
    assert (
        abs(outside.mean() - inside.mean()) < 0.25 and abs(outside.std() / inside.std() - 1) < 0.25
    )


def _ground_truth_tomogram(shape_xyz, n, angpix, imaging, seed) -> np.ndarray:
    """Write tomo.mrc (noise-free 4v4r particles) and gt.star with their true positions and angles."""
    sim = simulate_tomogram(["4v4r"], shape_xyz, n, angpix, float("inf"), imaging, seed=seed)
    write_volume("tomo.mrc", sim.volume_zyx, angpix)
    p = sim.particles
    xyz = p[["x_px", "y_px", "z_px"]].to_numpy()
    coords_star("gt.star", xyz, rlnAngleRot=p.rot, rlnAngleTilt=p.tilt, rlnAnglePsi=p.psi)
    return xyz


def test_simulated_ground_truth_reconstructs_in_relion(project):
    """Extract at ground-truth positions, reconstruct with ground-truth angles: the structure."""
    _ground_truth_tomogram((150, 150, 56), 36, 15.0, NO_CTF_NO_WEDGE, seed=2)
    assert extract_main(["--i", "gt.star", "--o", "Extract/job001", "--box", "28", "-q"]) == 0
    out = project / "Extract" / "job001"
    table = read_particles(out / "particles.star")
    assert table.optics["rlnImageDimensionality"].iloc[0] == 3
    assert 10 <= len(table) < 36  # some boxes leave this thin tomogram and are skipped
    images = list(table.particles["rlnImageName"])
    assert all(n.startswith("Extract/job001/Subtomograms/tomo/tomo_") for n in images)
    # fast store: same rows, same order, same values as the per-particle files
    store, names = read_store(out)
    assert store.shape == (len(table), 28, 28, 28) and store.dtype == np.float32
    assert names == images
    for k in (0, len(names) - 1):
        with mrcfile.open(names[k], permissive=True) as m:
            assert np.array_equal(m.data, store[k])
            assert abs(m.voxel_size.x - 15.0) < 1e-3
    assert abs(float(store.mean())) < 1e-4 and abs(float(store[0].std()) - 1) < 1e-3
    # the CTF/wedge weight: cubic, origin at N/2, accepted by RELION
    with mrcfile.open(table.particles["rlnCtfImage"].iloc[0], permissive=True) as m:
        w = m.data.copy()
    assert (
        w.shape == (28, 28, 28) and w[14, 14, 14] == 1.0 and w[0, 14, 14] == 0.0
    )  # wedge along kz
    rec = relion_reconstruct(str(out / "particles.star"), "rec.mrc")
    ref = pad_or_crop(load_structure("4v4r", 15.0), rec.shape)
    cc = correlation(rec, ref)
    assert cc >= 0.9, cc
    relion_reconstruct(str(out / "particles.star"), "rec_ctf.mrc", ctf=True)


def test_wedge_and_ctf_weight_compensated_by_relion(project):
    """A tomogram imaged with CTF and a ±60° wedge: RELION --ctf with our weights recovers the map."""
    imaging = Imaging(defocus_um=-2.0, tilt_range_deg=60.0)
    _ground_truth_tomogram((150, 150, 56), 36, 15.0, imaging, seed=3)
    assert (
        extract_main(
            [
                "--i",
                "gt.star",
                "--o",
                "X",
                "--box",
                "28",
                "--defocus",
                "-2",
                "--tilt-range",
                "60",
                "-q",
            ]
        )
        == 0
    )
    ref = pad_or_crop(load_structure("4v4r", 15.0), (28, 28, 28))
    ccs = {}
    for flag in ([], ["--ctf"]):
        rec = relion_reconstruct("X/particles.star", "r.mrc", extra=flag)
        ccs[bool(flag)] = correlation(rec, ref)
    assert ccs[True] > ccs[False] and ccs[True] >= 0.85, ccs


def test_pick_then_extract_relion5_float16_pad(project):
    rng = np.random.default_rng(4)
    vol = rng.normal(0, 0.05, (24, 60, 60)).astype(np.float32)
    zz, yy, xx = np.ogrid[:24, :60, :60]
    centres = [(15, 15, 12), (44, 20, 12), (30, 45, 11), (3, 56, 12)]  # the last one near a corner
    for x, y, z in centres:
        vol -= np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / 8).astype(np.float32)
    write_volume("TS_1.mrc", vol, 10.0)
    assert (
        pick_main(
            [
                "--i",
                "TS_1.mrc",
                "--o",
                "Pick",
                "--particle-diameter",
                "40",
                "--border",
                "0",
                "--threshold",
                "0.1",
                "--relion5",
                "--no-plot",
                "-q",
            ]
        )
        == 0
    )
    assert (
        extract_main(
            [
                "--i",
                "Pick/particles.star",
                "--o",
                "Ext",
                "--box",
                "12",
                "--float16",
                "--border",
                "pad",
                "-q",
            ]
        )
        == 0
    )
    out = read_particles("Ext/particles.star")
    assert out.flavour == "relion5" and len(out) == 4
    assert (project / "Ext" / "optimisation_set.star").exists()
    store, names = read_store("Ext")
    assert store.dtype == np.float16 and names == list(out.particles["rlnImageName"])
    with mrcfile.open(names[0], permissive=True) as m:
        assert m.data.dtype == np.float16
    # skip mode drops the corner particle and says so in run.json
    assert extract_main(["--i", "Pick/particles.star", "--o", "Ext2", "--box", "12", "-q"]) == 0
    assert len(read_particles("Ext2/particles.star")) == 3
    import json

    assert (
        json.loads((project / "Ext2" / "run.json").read_text())["results"]["n_border_skipped"] == 1
    )


def _run_cli(args):
    return subprocess.run(
        [sys.executable, str(REPO / "bin" / "disca_extract"), *args], capture_output=True, text=True
    )


def test_bad_input_exits_2_and_writes_nothing(project, capsys):
    write_volume("tomo.mrc", np.zeros((20, 40, 40), np.float32), 10.0)
    coords_star("ok.star", [[20, 20, 10]])
    cases = {
        "box": (["--i", "ok.star", "--box", "24"], "larger than the tomogram"),
        "outside": (["--i", coords_star("out.star", [[20, 60, 10]])], "outside"),
        "unknown": (
            ["--i", coords_star("unk.star", [[20, 20, 10]], tomo="nothere.mrc")],
            "cannot be found",
        ),
        "angpix": (["--i", "ok.star", "--angpix", "7"], "disagrees"),
        "mapping": (["--i", "ok.star", "--tomograms", "tomo"], "NAME=PATH"),
    }
    for what, (args, message) in cases.items():
        extra = ["--seed", "0"] if "--box" in args else ["--box", "8"]
        capsys.readouterr()
        assert extract_main([*args, "--o", f"E_{what}", *extra, "-q"]) == 2, what
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (what, err)
        assert not Path(f"E_{what}").exists() or not any(Path(f"E_{what}").iterdir()), what
    # the installed entry point: one line on stderr, exit status 2
    r = _run_cli(["--i", "out.star", "--o", "E_cli", "--box", "8", "-q"])
    assert r.returncode == 2 and "outside" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # an empty coordinate file (a pick run with zero picks) is an error for extraction
    write_star_blocks(
        "empty.star",
        {
            "particles": pd.DataFrame(
                {
                    "rlnMicrographName": pd.Series([], dtype=str),
                    "rlnCoordinateX": pd.Series([], dtype=float),
                    "rlnCoordinateY": pd.Series([], dtype=float),
                    "rlnCoordinateZ": pd.Series([], dtype=float),
                }
            )
        },
    )
    capsys.readouterr()
    assert extract_main(["--i", "empty.star", "--o", "E_empty", "--box", "8"]) == 2
    assert "empty" in capsys.readouterr().err
    # --tomograms mapping works; a second run refuses to overwrite, --overwrite replaces
    coords_star("named.star", [[20, 20, 10]], tomo="TS_7")
    assert (
        extract_main(
            ["--i", "named.star", "--o", "E", "--box", "8", "--tomograms", "TS_7=tomo.mrc", "-q"]
        )
        == 0
    )
    assert (
        extract_main(
            ["--i", "named.star", "--o", "E", "--box", "8", "--tomograms", "TS_7=tomo.mrc", "-q"]
        )
        == 2
    )
    assert (
        extract_main(
            [
                "--i",
                "named.star",
                "--o",
                "E",
                "--box",
                "8",
                "--tomograms",
                "TS_7=tomo.mrc",
                "-q",
                "--overwrite",
            ]
        )
        == 0
    )
    assert (
        read_star_blocks("E/particles.star")["particles"]["rlnMicrographName"].iloc[0] == "tomo.mrc"
    )


def test_binned_extraction_reconstructs_in_relion(project):
    """--bin 2 from a 7.5 Å tomogram gives 15 Å boxes centred on the particles (RELION agrees)."""
    xyz = _ground_truth_tomogram((280, 280, 100), 30, 7.5, NO_CTF_NO_WEDGE, seed=5)
    assert (
        extract_main(["--i", "gt.star", "--o", "B", "--box", "28", "--bin", "2", "--no-ctf", "-q"])
        == 0
    )
    table = read_particles("B/particles.star")
    assert abs(table.optics["rlnImagePixelSize"].iloc[0] - 15.0) < 1e-6 and len(table) >= 10
    # box centre (tomogram pixels) + sub-voxel remainder in the origin = the particle position
    kept = table.particles
    centre = kept[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy()
    origin = kept[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy() / 7.5
    truth = {tuple(c) for c in xyz}
    assert all(tuple(np.round(c, 6)) in truth for c in centre - origin)
    rec = relion_reconstruct("B/particles.star", "rb.mrc")
    ref = pad_or_crop(load_structure("4v4r", 15.0), rec.shape)
    cc = correlation(rec, ref)
    assert cc >= 0.9, cc
