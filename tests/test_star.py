"""STAR I/O: every real flavour in tests/data/star read to pixel coordinates, writers, bad input.

Expected coordinates are worked out by hand from the fixture text, with the arithmetic written
out, so a wrong convention fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from disca_tools.io.particles import ParticleTable
from disca_tools.io.star import (
    default_optics,
    detect_flavour,
    make_tomograms_table,
    read_particles,
    read_star_blocks,
    read_tomograms,
    relion5_paths,
    write_particles,
    write_relion5,
    write_relion31,
    write_star_blocks,
)
from disca_tools.runtime.errors import UserError

DATA = Path(__file__).parent / "data" / "star"
R30 = DATA / "relion3" / "warp_export_relion30.star"
R31 = DATA / "relion3" / "refine_relion31_optics.star"
R31_TWO = DATA / "relion3" / "refine_relion31_two_optics_groups.star"
R40 = DATA / "relion4" / "pseudosubtomo_relion40.star"
WARP = DATA / "relion5_warp" / "particles.star"
WARP_TOMOS = DATA / "relion5_warp" / "tomograms.star"
WT = DATA / "warptools_tomodrgn" / "warptools_test_4-tomos_10-ptcls_box-32_angpix-12.star"
WT_OPT = WT.with_name(WT.stem + "_optimisation_set.star")
PYTOM_TOMOS = DATA / "relion5_pytom" / "tomograms.star"
PYTOM_TS = DATA / "relion5_pytom" / "tomo200528_107_tilt_series.star"


def assert_clean(text: str) -> None:
    """No missing-value token RELION would choke on."""
    tokens = set(text.split())
    assert not tokens & {"<NA>", "nan", "NaN", "None", "inf", "-inf"}


def xyz(table: ParticleTable, row: int) -> np.ndarray:
    return table.coords_px[row]


# ----------------------------------------------------------------------------- RELION 3.x / 4


def test_relion30_warp_export_uses_mag_and_detector_pixel_size():
    t = read_particles(R30)
    assert t.flavour == "relion30"
    # 1e4 · rlnDetectorPixelSize / rlnMagnification = 1e4 · 5.364 / 10000
    assert t.coord_angpix == pytest.approx(1e4 * 5.364 / 10000.0)
    np.testing.assert_allclose(xyz(t, 0), [1028.455, 733.955, 422.955])
    np.testing.assert_allclose(xyz(t, 2), [115.955, 930.455, 366.455])
    # tomogram name from the file name in rlnMicrographName; the file itself kept
    assert t.particles["rlnTomoName"][0] == "01006_10.73Apx"
    assert t.particles["rlnMicrographName"][0].endswith("reconstruction/01006_10.73Apx.mrc")
    # in Å: 1028.455 px · 5.364 Å/px
    assert t.coords_at(1.0)[0, 0] == pytest.approx(1028.455 * 5.364)


def test_relion30_angpix_overrides_the_inferred_size():
    t = read_particles(R30, angpix=10.73)
    assert t.coord_angpix == 10.73
    np.testing.assert_allclose(xyz(t, 0), [1028.455, 733.955, 422.955])


def test_relion31_warp_legacy_coordinates_in_image_pixels():
    t = read_particles(R31)
    assert t.flavour == "relion31"
    assert t.coord_angpix == pytest.approx(2.446)  # rlnImagePixelSize of optics group 1
    np.testing.assert_allclose(xyz(t, 0), [915.549, 1480.63, 938.008])
    np.testing.assert_allclose(xyz(t, 1), [1636.359, 1468.359, 835.438])
    assert list(t.particles["rlnTomoName"]) == ["0002_12.23Apx", "0003_12.23Apx", "0003_12.23Apx"]
    assert t.optics is not None and t.optics["rlnImageDimensionality"][0] == 3
    assert t.image_angpix() == pytest.approx(2.446)


def test_relion31_two_optics_groups_rescaled_to_the_first_group():
    t = read_particles(R31_TWO)
    assert t.coord_angpix == pytest.approx(2.446)
    # row 0 is in group 1 (2.446 Å): unchanged
    np.testing.assert_allclose(xyz(t, 0), [915.549, 1480.63, 938.008])
    # row 1 is in group 2 (3.446 Å): 1636.359 px · 3.446 / 2.446 = 2305.36 px of 2.446 Å
    np.testing.assert_allclose(
        xyz(t, 1), np.array([1636.359, 1468.359, 835.438]) * 3.446 / 2.446, rtol=1e-9
    )
    assert xyz(t, 1)[0] == pytest.approx(2305.36, abs=0.01)


def test_relion4_pseudosubtomograms_in_unbinned_tilt_series_pixels():
    t = read_particles(R40)
    assert t.flavour == "relion4"
    assert t.coord_angpix == pytest.approx(1.971)  # rlnTomoTiltSeriesPixelSize, not 3.942
    assert len(t) == 1746
    np.testing.assert_allclose(xyz(t, 0), [1700.0, 428.0, 944.0])
    np.testing.assert_allclose(xyz(t, 1), [654.0, 2910.0, 1046.0])
    # in pixels of a bin-4 tomogram (7.884 Å): 1700 · 1.971 / 7.884 = 425
    assert t.coords_at(4 * 1.971)[0, 0] == pytest.approx(425.0)
    assert t.particles["rlnTomoName"][0] == "TS_017"
    assert t.particles["rlnTomoParticleName"][3] == "TS_017/155"


# ----------------------------------------------------------------------------- WarpTools 2


def test_warptools_relion5_export_pixels_of_the_export_size():
    t = read_particles(WARP)
    assert t.flavour == "warp"
    # rlnImagePixelSize 4.0 = rlnTomoTiltSeriesPixelSize 0.7894 · rlnTomoSubtomogramBinning 5.06714
    assert t.coord_angpix == pytest.approx(4.0)
    assert 0.7894 * 5.06714 == pytest.approx(4.0, abs=1e-4)
    np.testing.assert_allclose(xyz(t, 0), [354.242, 397.132, 75.828])
    np.testing.assert_allclose(xyz(t, 1), [745.904, 604.440, 75.828])
    # tomograms.star beside the particles was found; names (with .tomostar) kept as they are
    assert t.tomograms is not None and len(t.tomograms) == 5
    assert t.tomograms_source == WARP_TOMOS
    assert t.particles["rlnTomoName"][0] == "TS_17.tomostar"
    # all particles fit in the tomogram at 4 Å: 4400·0.7894/4 = 868.3, 6000·0.7894/4 = 1184.1,
    # 1000·0.7894/4 = 197.4 (in tilt-series pixels they would crowd into a corner)
    assert np.all(t.coords_px.max(0) < [4400 * 0.7894 / 4, 6000 * 0.7894 / 4, 1000 * 0.7894 / 4])
    assert t.coords_px[:, 2].max() > 0.8 * 1000 * 0.7894 / 4
    # the visible-frames vector passes through untouched as a string
    assert t.particles["rlnTomoVisibleFrames"][0] == "[" + ",".join(["1"] * 41) + "]"


def test_warptools_tomodrgn_via_optimisation_set():
    t = read_particles(WT_OPT)
    assert t.flavour == "warp"
    assert t.source == WT
    assert t.coord_angpix == pytest.approx(12.0)  # 1.667 · 7.19856 = 12.0
    np.testing.assert_allclose(xyz(t, 0), [494.521, 564.065, 28.146])
    np.testing.assert_allclose(xyz(t, 10), [508.142, 86.278, 27.755])
    assert t.particles["rlnTomoName"][10] == "Unt_050.tomostar"
    assert t.tomograms_source == WT.with_name(WT.stem + "_tomograms.star")
    assert set(t.tomogram_blocks) == {f"Unt_0{n}.tomostar" for n in (83, 50, 76, 88)}


def test_warptools_angpix_that_disagrees_is_an_error():
    with pytest.raises(UserError, match=r"^.*angpix-12\.star: --angpix 10 disagrees"):
        read_particles(WT, angpix=10.0)


# ----------------------------------------------------------------------------- RELION 5 centred


def _relion5_particles(folder: Path, names=("tomo200528_107",), centered=None, optics_ts=None):
    """A RELION 5 particles.star written as text (not by our writer)."""
    centered = centered or [(-1234.5, 2000.0, 100.25)]
    lines = ["", "data_general", "", "_rlnTomoSubTomosAre2DStacks 1", ""]
    if optics_ts is not None:
        lines += ["data_optics", "", "loop_", "_rlnOpticsGroup #1", "_rlnOpticsGroupName #2"]
        lines += ["_rlnTomoTiltSeriesPixelSize #3", f"1 optics1 {optics_ts}", ""]
    lines += ["data_particles", "", "loop_", "_rlnTomoName #1"]
    lines += ["_rlnCenteredCoordinateXAngst #2", "_rlnCenteredCoordinateYAngst #3"]
    lines += ["_rlnCenteredCoordinateZAngst #4", "_rlnAngleRot #5", "_rlnOpticsGroup #6"]
    for n, (x, y, z) in zip(names, centered, strict=True):
        lines.append(f"{n} {x} {y} {z} 12.5 1")
    path = folder / "particles.star"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_relion5_centred_angstrom_to_binned_tomogram_pixels(tmp_path):
    part = _relion5_particles(
        tmp_path,
        names=["tomo200528_107", "tomo200528_100"],
        centered=[(-1234.5, 2000.0, 100.25), (0.0, 0.0, 0.0)],
    )
    t = read_particles(part, tomograms=PYTOM_TOMOS)
    assert t.flavour == "relion5"
    # voxel = rlnTomoTiltSeriesPixelSize · rlnTomoTomogramBinning = 1.724 · 8.12065
    assert t.coord_angpix == pytest.approx(1.724 * 8.12065)
    # px = (centred Å / 1.724 + rlnTomoSize / 2) / 8.12065, sizes 4000 4000 2000
    expected = [
        (-1234.5 / 1.724 + 4000 / 2) / 8.12065,  # = 158.1071...
        (2000.0 / 1.724 + 4000 / 2) / 8.12065,
        (100.25 / 1.724 + 2000 / 2) / 8.12065,
    ]
    np.testing.assert_allclose(xyz(t, 0), expected, rtol=1e-9)
    assert xyz(t, 0)[0] == pytest.approx(158.1071, abs=1e-4)
    # the tomogram centre: (0 + 4000/2) / 8.12065 = 246.286
    np.testing.assert_allclose(xyz(t, 1), [2000 / 8.12065, 2000 / 8.12065, 1000 / 8.12065])
    # the centred columns are replaced by pixels; the tomogram file is named
    assert "rlnCenteredCoordinateXAngst" not in t.particles.columns
    assert (
        t.particles["rlnMicrographName"][0] == "Tomograms/job009/tomograms/rec_tomo200528_107.mrc"
    )
    assert t.particles["rlnAngleRot"][0] == 12.5
    assert t.general == {"rlnTomoSubTomosAre2DStacks": 1}


def test_relion5_through_an_optimisation_set_with_project_relative_paths(tmp_path, monkeypatch):
    part = _relion5_particles(tmp_path)
    (tmp_path / "opt.star").write_text(
        f"data_\n\n_rlnTomoParticlesFile {part.name}\n_rlnTomoTomogramsFile {PYTOM_TOMOS}\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # the particles path resolves against the star's folder
    t = read_particles(tmp_path / "opt.star")
    assert t.source == part
    assert xyz(t, 0)[0] == pytest.approx((-1234.5 / 1.724 + 2000) / 8.12065)


def test_relion5_angpix_without_binning_column(tmp_path):
    tomos = read_tomograms(PYTOM_TOMOS).drop(columns=["rlnTomoTomogramBinning"])
    write_star_blocks(tmp_path / "tomograms.star", {"global": tomos})
    part = _relion5_particles(tmp_path)
    # no binning: bin-1 tilt-series pixels, (−1234.5/1.724 + 2000)
    t = read_particles(part)
    assert t.coord_angpix == pytest.approx(1.724)
    assert xyz(t, 0)[0] == pytest.approx(-1234.5 / 1.724 + 2000)
    # --angpix says which tomogram: (−1234.5/1.724 + 2000) · 1.724 / 6.896
    t4 = read_particles(part, angpix=4 * 1.724)
    assert xyz(t4, 0)[0] == pytest.approx((-1234.5 / 1.724 + 2000) / 4)


def test_read_tomograms_pytom():
    tomos = read_tomograms(PYTOM_TOMOS)
    assert len(tomos) == 10
    assert tomos["rlnTomoName"][0] == "tomo200528_100"
    assert tomos["rlnTomoSizeZ"][5] == 2000
    assert tomos["rlnTomoReconstructedTomogram"][5].endswith("rec_tomo200528_107.mrc")


def test_flavour_detection():
    expect = {
        R30: "relion30",
        R31: "relion31",
        R31_TWO: "relion31",
        R40: "relion4",
        WARP: "warp",
        WT: "warp",
    }
    for path, flavour in expect.items():
        assert detect_flavour(read_star_blocks(path)) == flavour, path


# ----------------------------------------------------------------------------- writers


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        if pd.api.types.is_numeric_dtype(a[c]):
            np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), rtol=1e-6)
        else:
            assert list(a[c].astype(str)) == list(b[c].astype(str)), c


@pytest.mark.parametrize("path", [R31, R31_TWO, R40])
def test_write_relion31_round_trip(tmp_path, path):
    t = read_particles(path)
    out = write_relion31(tmp_path / "out.star", t)
    back = read_particles(out)
    assert back.coord_angpix == pytest.approx(t.coord_angpix)
    assert back.flavour == t.flavour
    _frames_equal(t.particles, back.particles)
    text = out.read_text()
    assert_clean(text)
    assert "_rlnImageDimensionality" in text and "_rlnMicrographPixelSize" in text
    # the reader-derived tomogram name is not written into a legacy file
    if path != R40:
        assert "_rlnTomoName" not in text


def test_write_particles_relion30_round_trip(tmp_path):
    t = read_particles(R30)
    out = write_particles(tmp_path / "out.star", t)
    assert set(out) == {"particles"}
    back = read_particles(out["particles"])
    assert back.flavour == "relion30"
    _frames_equal(t.particles, back.particles)


def test_written_micrograph_pixel_size_is_stated(tmp_path):
    t = read_particles(R31)
    out = write_relion31(tmp_path / "out.star", t)
    with pytest.raises(UserError, match="out.star: --angpix 12.23 disagrees"):
        read_particles(out, angpix=12.23)


def test_write_relion5_round_trip_from_warptools(tmp_path):
    t = read_particles(WARP)
    out = write_particles(tmp_path / "particles.star", t)
    assert out == relion5_paths(tmp_path / "particles.star")
    assert out["tomograms"].name == "tomograms.star"
    back = read_particles(out["optimisation_set"])
    assert back.flavour == "relion5"
    np.testing.assert_allclose(back.coords_at(t.coord_angpix), t.coords_px, atol=1e-3)
    assert list(back.particles["rlnTomoName"]) == list(t.particles["rlnTomoName"])
    assert back.particles["rlnTomoVisibleFrames"][5] == t.particles["rlnTomoVisibleFrames"][5]
    assert set(back.tomogram_blocks) == set(t.tomogram_blocks)  # per-tomogram tables kept
    blocks = read_star_blocks(out["particles"])
    assert blocks["general"] == {"rlnTomoSubTomosAre2DStacks": 1}
    assert "rlnTomoTiltSeriesPixelSize" in blocks["optics"].columns
    assert "rlnCoordinateX" not in blocks["particles"].columns
    # centred Å by hand for row 0: (354.242 · 4.0/0.7894 − 4400/2) · 0.7894 = −319.712
    x_angst = blocks["particles"]["rlnCenteredCoordinateXAngst"][0]
    assert x_angst == pytest.approx((354.242 * 4.0 / 0.7894 - 4400 / 2) * 0.7894, abs=2e-3)
    for p in out.values():
        assert_clean(p.read_text())


def test_write_relion5_from_mrc_tomograms_keeps_string_names(tmp_path):
    tomos = make_tomograms_table(
        ["01", "002"], [(500, 400, 100), (300, 300, 80)], 10.0, files=["T/01.mrc", "T/002.mrc"],
        binning=4,
    )  # fmt: skip
    # tilt-series pixel 10/4 = 2.5 Å; rlnTomoSize = size · 4
    assert list(tomos["rlnTomoSizeX"]) == [2000, 1200]
    assert list(tomos["rlnTomoTiltSeriesPixelSize"]) == [2.5, 2.5]
    df = pd.DataFrame(
        {
            "rlnTomoName": ["01", "002", "01"],
            "rlnCoordinateX": [1.25, 250.5, 0.0],
            "rlnCoordinateY": [3.0, 4.0, 200.0],
            "rlnCoordinateZ": [5.0, 79.0, 50.0],
            "rlnUnknownLabelXyz": [7, 8, 9],
            "rlnClassNumber": [1, 2, 1],
        }
    )
    t = ParticleTable(df, coord_angpix=10.0, tomograms=tomos, flavour="relion5")
    out = write_relion5(tmp_path / "picks.star", t)
    assert out["tomograms"].name == "picks_tomograms.star"
    text = out["particles"].read_text()
    assert "\n01\t" in text and "\n002\t" in text  # not 1 / 2
    assert_clean(text)
    blocks = read_star_blocks(out["particles"])
    assert blocks["general"] == {"rlnTomoSubTomosAre2DStacks": 0}
    # the size/2 centre: (1.25 · 4 − 2000/2) · 2.5 = −2487.5 Å; (0·4 − 1600/2) · 2.5 = −2000 ... y
    cen = blocks["particles"][["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst"]]
    assert cen.iloc[0, 0] == pytest.approx((1.25 * 4 - 2000 / 2) * 2.5)
    assert cen.iloc[2, 1] == pytest.approx((200.0 * 4 - 1600 / 2) * 2.5)  # the centre → 0
    back = read_particles(out["optimisation_set"])
    assert back.coord_angpix == pytest.approx(10.0)
    assert list(back.particles["rlnTomoName"]) == ["01", "002", "01"]
    np.testing.assert_allclose(back.coords_px, t.coords_px, atol=1e-3)
    assert list(back.particles["rlnUnknownLabelXyz"]) == [7, 8, 9]
    assert list(back.particles["rlnMicrographName"]) == ["T/01.mrc", "T/002.mrc", "T/01.mrc"]


def test_write_relion5_centred_round_trip_of_a_relion5_file(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    part = _relion5_particles(src, optics_ts=1.724)
    t = read_particles(part, tomograms=PYTOM_TOMOS)
    out = write_particles(tmp_path / "out" / "particles.star", t)
    blocks = read_star_blocks(out["particles"])
    row = blocks["particles"].iloc[0]
    assert row["rlnCenteredCoordinateXAngst"] == pytest.approx(-1234.5, abs=1e-3)
    assert row["rlnCenteredCoordinateZAngst"] == pytest.approx(100.25, abs=1e-3)
    assert "rlnMicrographName" not in blocks["particles"].columns  # derived, not written
    back = read_particles(out["particles"])
    np.testing.assert_allclose(back.coords_px, t.coords_px, atol=1e-3)


def test_writers_refuse_existing_outputs_and_inputs(tmp_path):
    t = read_particles(R31)
    out = write_relion31(tmp_path / "a.star", t)
    before = out.read_text()
    with pytest.raises(UserError, match="a.star: output already exists"):
        write_relion31(out, t)
    assert out.read_text() == before
    write_relion31(out, t, overwrite=True)
    with pytest.raises(UserError, match="would overwrite an input"):
        write_relion31(out, read_particles(out), overwrite=True)
    # RELION 5: one existing file of the three blocks the whole write
    tw = read_particles(WT)
    paths = relion5_paths(tmp_path / "particles.star")
    paths["optimisation_set"].write_text("keep")
    with pytest.raises(UserError, match="optimisation_set.star: output already exists"):
        write_relion5(paths["particles"], tw)
    assert not paths["particles"].exists() and not paths["tomograms"].exists()
    assert paths["optimisation_set"].read_text() == "keep"


def test_writers_refuse_missing_values_and_missing_metadata(tmp_path):
    t = read_particles(R31)
    df = t.particles.copy()
    df.loc[1, "rlnClassNumber"] = np.nan
    with pytest.raises(UserError, match="rlnClassNumber has missing values"):
        write_relion31(tmp_path / "x.star", t.with_particles(df))
    df = t.particles.copy()
    df["rlnTomoName"] = ["a b", "c", "d"]
    with pytest.raises(UserError, match="whitespace"):
        write_relion31(tmp_path / "x.star", t.with_particles(df))
    with pytest.raises(UserError, match="without optics"):
        write_relion31(tmp_path / "x.star", ParticleTable(t.particles, 2.446))
    with pytest.raises(UserError, match="without a tomograms table"):
        write_relion5(tmp_path / "x.star", t)
    assert not any(tmp_path.iterdir())


def test_write_relion31_with_default_optics_and_extra_columns(tmp_path):
    df = pd.DataFrame(
        {
            "rlnMicrographName": ["T/01.mrc"],
            "rlnCoordinateX": [10.0],
            "rlnCoordinateY": [20.0],
            "rlnCoordinateZ": [30.0],
            "rlnImageName": ["Extract/01_000001.mrc"],
            "disca_internal": [1.0],
        }
    )
    t = ParticleTable(df, coord_angpix=8.0, optics=default_optics(4.0, 24))
    out = write_relion31(tmp_path / "p.star", t)
    blocks = read_star_blocks(out)
    assert "disca_internal" not in blocks["particles"].columns
    assert blocks["particles"]["rlnOpticsGroup"][0] == 1
    assert blocks["optics"]["rlnMicrographPixelSize"][0] == 8.0
    back = read_particles(out)
    assert back.coord_angpix == 8.0 and back.image_angpix() == 4.0
    assert back.particles["rlnTomoName"][0] == "01"


# ----------------------------------------------------------------------------- bad input


def test_bad_input_missing_file_directory_and_not_star(tmp_path):
    with pytest.raises(UserError, match=r"^.*nope\.star: file not found$"):
        read_particles(tmp_path / "nope.star")
    with pytest.raises(UserError, match="is a directory"):
        read_particles(tmp_path)
    text = tmp_path / "notes.star"
    text.write_text("hello world\nthis is not a STAR file\n")
    with pytest.raises(UserError, match=r"notes\.star: no data blocks found"):
        read_particles(text)
    binary = tmp_path / "volume.star"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match=r"volume\.star: "):
        read_particles(binary)


def test_bad_input_no_coordinates():
    with pytest.raises(UserError, match=r"tilt_series\.star: no particle coordinates"):
        read_particles(PYTOM_TS)
    with pytest.raises(UserError, match=r"tomograms\.star: is a tomograms table"):
        read_particles(PYTOM_TOMOS)
    with pytest.raises(UserError, match=r"tilt_series\.star: not a RELION 5 tomograms table"):
        read_tomograms(PYTOM_TS)


def test_bad_input_relion5_without_tomograms(tmp_path):
    part = _relion5_particles(tmp_path)
    with pytest.raises(UserError, match=r"particles\.star: RELION 5 particles .* need a tomograms"):
        read_particles(part)


def test_bad_input_optimisation_set_naming_missing_files():
    # the real WarpTools file names matching.star, which was renamed to particles.star
    with pytest.raises(UserError, match=r"optimisation_set\.star: particles file 'matching.star'"):
        read_particles(DATA / "relion5_warp" / "optimisation_set.star")


def test_bad_input_tomogram_names_missing_from_tomograms(tmp_path):
    part = _relion5_particles(tmp_path, names=["tomo999"])
    with pytest.raises(UserError, match=r"particles\.star: tomogram 'tomo999' is not in"):
        read_particles(part, tomograms=PYTOM_TOMOS)
    # an explicit tomograms table that does not list a WarpTools file's tomograms
    with pytest.raises(UserError, match="'TS_1.tomostar'.* is not in the tomograms table"):
        read_particles(WARP, tomograms=WT.with_name(WT.stem + "_tomograms.star"))


def test_bad_input_pixel_sizes_that_disagree(tmp_path):
    with pytest.raises(UserError, match=r"pseudosubtomo_relion40\.star: --angpix 3.942 disagrees"):
        read_particles(R40, angpix=3.942)
    part = _relion5_particles(tmp_path, optics_ts=2.0)
    with pytest.raises(UserError, match="rlnTomoTiltSeriesPixelSize 2 in data_optics disagrees"):
        read_particles(part, tomograms=PYTOM_TOMOS)
    part = _relion5_particles(tmp_path)
    with pytest.raises(UserError, match="--angpix 10 disagrees with the file's tomogram voxel"):
        read_particles(part, tomograms=PYTOM_TOMOS, angpix=10.0)
    with pytest.raises(UserError, match="must be positive"):
        read_particles(R31, angpix=-1.0)


def test_write_relion5_bad_value_writes_nothing(tmp_path):
    t = read_particles(WT)
    df = t.particles.copy()
    df.loc[3, "rlnAngleRot"] = np.nan
    with pytest.raises(UserError, match=r"particles\.star \(data_particles\): column rlnAngleRot"):
        write_relion5(tmp_path / "particles.star", t.with_particles(df))
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- pytom-match-pick

PYTOM_HEADER = """
data_

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnCoordinateZ #3
_rlnAngleRot #4
_rlnAngleTilt #5
_rlnAnglePsi #6
_rlnLCCmax #7
_rlnCutOff #8
_rlnSearchStd #9
_rlnDetectorPixelSize #10
"""


def test_pytom_voxel_coordinates(tmp_path):
    path = tmp_path / "tomo200528_107_particles.star"
    rows = [
        "120.0 64.5 30.0 10.0 20.0 30.0 0.25 0.1 0.01 13.79 rec_tomo200528_107.mrc",
        "12.0 6.5 3.0 10.0 20.0 30.0 0.20 0.1 0.01 13.79 rec_tomo200528_107.mrc",
    ]
    path.write_text(PYTOM_HEADER + "_rlnMicrographName #11\n" + "\n".join(rows) + "\n")
    t = read_particles(path)
    assert t.flavour == "pytom"
    assert t.coord_angpix == pytest.approx(13.79)  # rlnDetectorPixelSize, no magnification
    np.testing.assert_allclose(xyz(t, 0), [120.0, 64.5, 30.0])
    assert t.particles["rlnTomoName"][0] == "rec_tomo200528_107"
    assert t.particles["rlnLCCmax"][1] == 0.20
    with pytest.raises(UserError, match="--angpix 10 disagrees"):
        read_particles(path, angpix=10.0)
    out = write_particles(tmp_path / "out.star", t)
    back = read_particles(out["particles"])
    assert back.flavour == "pytom"
    _frames_equal(t.particles, back.particles)


def test_pytom_relion5_mode_centred(tmp_path):
    path = tmp_path / "picks.star"
    row = "-1234.5 2000.0 100.25 10.0 20.0 30.0 0.25 0.1 0.01 14.0 tomo200528_107"
    text = PYTOM_HEADER.replace("_rlnCoordinateX #1", "_rlnCenteredCoordinateXAngst #1")
    text = text.replace("_rlnCoordinateY #2", "_rlnCenteredCoordinateYAngst #2")
    text = text.replace("_rlnCoordinateZ #3", "_rlnCenteredCoordinateZAngst #3")
    path.write_text(text + "_rlnTomoName #11\n" + row + "\n")
    assert detect_flavour(read_star_blocks(path)) == "pytom"
    t = read_particles(path, tomograms=PYTOM_TOMOS)
    # same arithmetic as RELION 5: (−1234.5 / 1.724 + 4000/2) / 8.12065
    assert xyz(t, 0)[0] == pytest.approx((-1234.5 / 1.724 + 2000) / 8.12065)
    out = write_particles(tmp_path / "out" / "particles.star", t)
    assert set(out) == {"particles", "tomograms", "optimisation_set"}
    back = read_particles(out["optimisation_set"])
    np.testing.assert_allclose(back.coords_px, t.coords_px, atol=1e-3)
    with pytest.raises(UserError, match=r"picks\.star: RELION 5 particles"):
        read_particles(path)


def test_rebinned_relion4_table_round_trips_through_relion31(tmp_path):
    t = read_particles(R40)
    # bin by 4: 1700 px of 1.971 Å = 425 px of 7.884 Å
    df = t.particles.copy()
    for c in ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"):
        df[c] = df[c] / 4
    binned = t.with_particles(df)
    binned.coord_angpix = 4 * 1.971
    back = read_particles(write_relion31(tmp_path / "bin4.star", binned))
    assert back.coord_angpix == pytest.approx(7.884)  # rlnMicrographPixelSize beats TS pixel
    np.testing.assert_allclose(back.coords_px[0], [425.0, 107.0, 236.0])


def test_plain_coordinate_file_takes_voxel_size_from_the_tomogram_header(tmp_path, monkeypatch):
    """A RELION 3.1 coordinate file without optics is in pixels of the tomogram it names."""
    from disca_tools.io.mrc import write_volume

    monkeypatch.chdir(tmp_path)
    Path("Tomograms").mkdir()
    write_volume("Tomograms/t1.mrc", np.zeros((8, 8, 8), np.float32), angpix=13.48)
    Path("coords.star").write_text(
        "data_particles\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
        "_rlnCoordinateZ #4\nTomograms/t1.mrc 1.0 2.0 3.0\n"
    )
    table = read_particles("coords.star")
    assert table.coord_angpix == pytest.approx(13.48)
    assert table.coords_px.tolist() == [[1.0, 2.0, 3.0]]
    # without the tomogram the size stays unknown rather than guessed
    Path("Tomograms/t1.mrc").unlink()
    assert read_particles("coords.star").coord_angpix is None
