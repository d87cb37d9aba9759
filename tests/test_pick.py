"""disca_pick: DoG picking finds known blobs, chunking is exact, suppression holds, real data, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from disca_tools.cli.pick import main as pick_main
from disca_tools.io.mrc import read_volume, write_volume
from disca_tools.io.star import read_particles, read_star_blocks
from disca_tools.pick import (
    PickParams,
    non_maximum_suppression,
    pick_volume,
    plan_blocks,
    sigmas_for_diameter,
)

REPO = Path(__file__).resolve().parent.parent
MICROTUBULE = REPO / "tests" / "data" / "real" / "microtubule_tomogram_crop_14pf.mrc"


def blob_volume(shape_zyx, centres_xyz, sigma=2.0, amplitude=-1.0, noise=0.05, seed=0):
    """Gaussian blobs (dark by default) at integer positions plus a little white noise."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, noise, shape_zyx).astype(np.float32)
    zz, yy, xx = np.ogrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    for x, y, z in centres_xyz:
        vol += amplitude * np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * sigma**2))
    return vol.astype(np.float32)


def random_centres(rng, n, shape_zyx, margin, min_sep):
    out = []
    while len(out) < n:
        c = [int(rng.integers(margin, s - margin)) for s in shape_zyx[::-1]]
        if all(np.linalg.norm(np.subtract(c, o)) >= min_sep for o in out):
            out.append(c)
    return np.array(out)


def as_set(coords):
    return {tuple(int(round(v)) for v in c) for c in coords}


def test_blobs_at_known_positions_are_found_exactly():
    rng = np.random.default_rng(1)
    shape = (40, 72, 88)
    centres = random_centres(rng, 12, shape, margin=6, min_sep=14)
    vol = blob_volume(shape, centres)
    lo, hi = sigmas_for_diameter(40, 10.0)  # 4-voxel blobs
    res = pick_volume(vol, PickParams(lo, hi, threshold_sd=3.0, min_distance=8, border=4))
    assert as_set(res.coords_xyz) == as_set(centres)
    assert np.all(np.diff(res.scores) <= 0)  # strongest first
    # the same blobs bright are found with polarity bright, not with dark
    bright = -vol
    assert as_set(
        pick_volume(
            bright, PickParams(lo, hi, "bright", threshold_sd=3.0, min_distance=8, border=4)
        ).coords_xyz
    ) == as_set(centres)
    assert not as_set(
        pick_volume(bright, PickParams(lo, hi, "dark", threshold_sd=3.0, min_distance=8)).coords_xyz
    ) & as_set(centres)


def test_binning_reports_input_pixels():
    centres = np.array([[21, 31, 17], [61, 47, 23]])  # odd-even mix
    vol = blob_volume((40, 80, 96), centres, sigma=3.0)
    res = pick_volume(vol, PickParams(0.9, 1.5, threshold_sd=3.0, min_distance=6, binning=2))
    got = sorted(map(tuple, res.coords_xyz))
    # binned voxel i covers input pixels 2i, 2i+1: its centre is 2i + 0.5, within 1 pixel of truth
    assert len(got) == 2
    for g, c in zip(got, sorted(map(tuple, centres)), strict=True):
        assert np.max(np.abs(np.subtract(g, c))) <= 1.0
        assert np.allclose(np.mod(g, 2), 0.5)


@pytest.mark.parametrize("polarity,binning", [("dark", 1), ("bright", 2)])
def test_chunked_equals_whole_volume(polarity, binning):
    rng = np.random.default_rng(2)
    vol = rng.normal(0, 1, (70, 90, 110)).astype(np.float32)
    base = dict(
        sigma_small=1.2,
        sigma_large=2.0,
        polarity=polarity,
        threshold_sd=1.0,
        min_distance=5,
        binning=binning,
    )
    whole = pick_volume(vol, PickParams(**base, chunk_voxels=10**9))
    small = PickParams(**base, chunk_voxels=30**3)
    assert (
        len(plan_blocks(tuple(s // binning for s in vol.shape), small.halo, small.chunk_voxels)) > 8
    )
    chunked = pick_volume(vol, small)
    assert len(whole) > 20
    assert np.array_equal(whole.coords_xyz, chunked.coords_xyz)
    assert np.array_equal(whole.scores, chunked.scores)
    assert whole.n_candidates == chunked.n_candidates


def test_chunked_from_memmap_equals_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.normal(0, 1, (48, 64, 80)).astype(np.float32)
    write_volume(tmp_path / "t.mrc", vol, 10.0)
    from disca_tools.io.mrc import open_volume

    mm, _ = open_volume(tmp_path / "t.mrc")
    p = dict(sigma_small=1.0, sigma_large=1.8, threshold=0.2, min_distance=4)
    a = pick_volume(vol, PickParams(**p))
    b = pick_volume(mm, PickParams(**p, chunk_voxels=24**3))
    assert (
        len(a) > 10
        and np.array_equal(a.coords_xyz, b.coords_xyz)
        and np.array_equal(a.scores, b.scores)
    )


def test_min_distance_holds_and_keeps_the_stronger():
    # two blobs 6 voxels apart, the second stronger; min distance 10 keeps only the stronger
    vol = blob_volume((32, 48, 48), [[20, 24, 16]], amplitude=-1.0)
    vol += blob_volume((32, 48, 48), [[26, 24, 16]], amplitude=-2.0, noise=0.0)
    res = pick_volume(vol, PickParams(1.0, 1.6, threshold_sd=3.0, min_distance=10))
    assert as_set(res.coords_xyz) == {(26, 24, 16)}
    res = pick_volume(vol, PickParams(1.0, 1.6, threshold_sd=3.0, min_distance=4))
    assert as_set(res.coords_xyz) == {(26, 24, 16), (20, 24, 16)}
    # dense noise peaks: every pair of picks at least min_distance apart
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 1, (40, 60, 60)).astype(np.float32)
    res = pick_volume(noise, PickParams(1.0, 1.6, threshold=0.0, min_distance=7.5))
    assert len(res) > 30
    assert pdist(res.coords_xyz).min() >= 7.5


def test_nms_matches_bruteforce_greedy():
    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 50, (400, 3))
    scores = rng.normal(size=400)
    keep = non_maximum_suppression(pts, scores, 6.0)
    # brute force O(P^2) greedy
    order = np.argsort(-scores, kind="stable")
    ref = []
    for i in order:
        if all(np.linalg.norm(pts[i] - pts[j]) >= 6.0 for j in ref):
            ref.append(i)
    assert list(keep) == ref


def test_max_picks_and_threshold():
    centres = np.array([[10, 10, 10], [30, 30, 10], [50, 10, 10]])
    vol = blob_volume((20, 40, 60), centres, noise=0.01)
    vol += blob_volume(
        (20, 40, 60), [[30, 30, 10]], amplitude=-1.0, noise=0.0
    )  # the middle one is 2x
    res = pick_volume(vol, PickParams(1.0, 1.6, threshold_sd=3.0, max_picks=1, min_distance=5))
    assert as_set(res.coords_xyz) == {(30, 30, 10)}
    none = pick_volume(vol, PickParams(1.0, 1.6, threshold=1e6))
    assert len(none) == 0 and none.coords_xyz.shape == (0, 3)


def test_real_microtubule_picks_sit_on_density(tmp_path):
    out = tmp_path / "Picks"
    rc = pick_main(
        [
            "--i",
            str(MICROTUBULE),
            "--o",
            str(out),
            "--particle-diameter",
            "250",
            "--polarity",
            "bright",
            "-q",
        ]
    )
    assert rc == 0
    table = read_particles(out / "coordinates.star")
    vol, angpix = read_volume(MICROTUBULE)
    assert abs(angpix - 10.52) < 0.01
    xyz = table.coords_px
    assert len(xyz) >= 3
    assert np.all((xyz >= 0) & (xyz < np.array(vol.shape[::-1])))
    # local density (3x3x3 mean) at every pick is above the volume mean (bright protein)
    vals = [
        vol[int(z) - 1 : int(z) + 2, int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2].mean()
        for x, y, z in xyz
    ]
    assert min(vals) > vol.mean()
    assert (out / "microtubule_tomogram_crop_14pf_picks.png").stat().st_size > 1000
    blocks = read_star_blocks(out / "coordinates.star")
    cols = set(blocks["particles"].columns)
    assert {"rlnMicrographName", "rlnTomoName", "rlnAutopickFigureOfMerit"} <= cols


def test_relion5_output_matches_pixel_coordinates(tmp_path):
    centres = np.array([[12, 20, 10], [40, 30, 14], [25, 50, 20]])
    write_volume(tmp_path / "TS_01.mrc", blob_volume((30, 64, 56), centres), 8.0)
    out = tmp_path / "P"
    rc = pick_main(
        [
            "--i",
            str(tmp_path / "TS_01.mrc"),
            "--o",
            str(out),
            "--particle-diameter",
            "32",
            "--relion5",
            "--border",
            "0",
            "--threshold",
            "0.1",
            "--no-plot",
            "-q",
        ]
    )
    assert rc == 0
    legacy = read_particles(out / "coordinates.star")
    r5 = read_particles(out / "particles.star")
    assert r5.flavour == "relion5"
    assert as_set(legacy.coords_px) == as_set(centres)
    assert np.allclose(np.sort(r5.coords_at(8.0), axis=0), np.sort(legacy.coords_px, axis=0))
    assert (out / "optimisation_set.star").exists() and (out / "tomograms.star").exists()
    # a RELION 5 tomograms.star as input picks its rlnTomoReconstructedTomogram files
    again = tmp_path / "P2"
    args = ["--particle-diameter", "32", "--border", "0", "--threshold", "0.1", "--no-plot", "-q"]
    assert pick_main(["--i", str(out / "tomograms.star"), "--o", str(again), *args]) == 0
    r5b = read_particles(again / "particles.star")
    assert r5b.flavour == "relion5"
    assert np.allclose(np.sort(r5b.coords_px, axis=0), np.sort(r5.coords_px, axis=0))


def test_zero_picks_is_an_empty_valid_result(tmp_path, caplog):
    write_volume(tmp_path / "flat.mrc", np.zeros((20, 30, 30), np.float32), 10.0)
    out = tmp_path / "P"
    rc = pick_main(
        [
            "--i",
            str(tmp_path / "flat.mrc"),
            "--o",
            str(out),
            "--particle-diameter",
            "50",
            "--threshold",
            "1",
        ]
    )
    assert rc == 0
    text = (out / "coordinates.star").read_text()
    assert "data_particles" in text and "_rlnCoordinateX" in text
    assert "no picks" in caplog.text


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "P"
    env_cmd = [sys.executable, str(REPO / "bin" / "disca_pick")]
    r = subprocess.run(
        [
            *env_cmd,
            "--i",
            str(tmp_path / "missing.mrc"),
            "--o",
            str(out),
            "--particle-diameter",
            "100",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "missing.mrc" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    write_volume(tmp_path / "t.mrc", np.zeros((20, 30, 30), np.float32), 10.0)
    write_volume(tmp_path / "m.mrc", np.zeros((20, 30, 31), np.float32), 10.0)

    def pick(*extra: str) -> int:
        return pick_main(
            ["--i", str(tmp_path / "t.mrc"), "--o", str(out), "--particle-diameter", "50", *extra]
        )

    assert pick("--mask", str(tmp_path / "m.mrc")) == 2  # mask of another shape
    assert pick("--angpix", "5") == 2  # disagrees with the header's 10 Å
    assert not (out / "coordinates.star").exists()
    # refuses to overwrite without --overwrite
    assert pick("-q") == 0
    assert pick("-q") == 2
    assert pick("-q", "--overwrite") == 0


def test_mask_and_parallel_workers(tmp_path):
    centres = np.array([[10, 12, 10], [40, 30, 12]])
    for k in (1, 2):
        write_volume(tmp_path / f"t{k}.mrc", blob_volume((24, 48, 56), centres, seed=k), 10.0)
    mask = np.zeros((24, 48, 56), np.float32)
    mask[:, :, 25:] = 1
    write_volume(tmp_path / "mask.mrc", mask, 10.0)
    args = [
        "--i",
        str(tmp_path / "t1.mrc"),
        str(tmp_path / "t2.mrc"),
        "--particle-diameter",
        "40",
        "--border",
        "0",
        "--threshold",
        "0.1",
        "--no-plot",
        "-q",
    ]
    assert pick_main([*args, "--o", str(tmp_path / "a")]) == 0
    assert pick_main([*args, "--o", str(tmp_path / "b"), "--j", "2"]) == 0
    a = read_star_blocks(tmp_path / "a" / "coordinates.star")["particles"]
    b = read_star_blocks(tmp_path / "b" / "coordinates.star")["particles"]
    assert a.equals(b) and len(a) == 4
    assert pick_main([*args, "--o", str(tmp_path / "c"), "--mask", str(tmp_path / "mask.mrc")]) == 0
    c = read_particles(tmp_path / "c" / "coordinates.star")
    assert as_set(c.coords_px) == {(40, 30, 12)}


def test_threshold_estimate_on_large_volumes_stays_exact():
    """Huge volumes prune candidates with an estimated floor; a bad estimate triggers an exact rescan."""
    rng = np.random.default_rng(6)
    vol = np.zeros((400, 64, 64), np.float32)
    vol[196:204] = rng.normal(
        0, 1, (8, 64, 64)
    )  # noise only in a thin central slab: samples overestimate
    base = dict(sigma_small=1.0, sigma_large=1.6, threshold_sd=1.0, min_distance=4)
    whole = pick_volume(vol, PickParams(**base, chunk_voxels=10**9))
    chunked = pick_volume(vol, PickParams(**base, chunk_voxels=24**3))
    from disca_tools.pick import BinnedVolume, _estimated_floor

    assert (
        _estimated_floor(BinnedVolume(vol), PickParams(**base, chunk_voxels=24**3))
        > whole.threshold
    )
    assert len(whole) > 20
    assert np.array_equal(whole.coords_xyz, chunked.coords_xyz)
    assert np.array_equal(whole.scores, chunked.scores)
