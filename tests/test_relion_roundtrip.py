"""Proof against the real program: RELION 3.1's relion_reconstruct agrees with our geometry.

Subtomograms written by ``disca_simulate subtomograms --snr inf`` are reconstructed by
``relion_reconstruct`` with their ground-truth angles and origins; the result must be the structure's
reference (correlation ≥ 0.95). Deliberately wrong conventions (inverse rotation, origin sign flipped,
CTF weight ignored) must not reach it. ``make test`` installs RELION (Debian's ``relion``) if missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import correlation as _cc  # noqa: E402
from helpers import relion_reconstruct as _relion_reconstruct  # noqa: E402

from disca_tools.cli.simulate import main as simulate_main
from disca_tools.geometry import euler_to_matrix, matrix_to_euler
from disca_tools.io.mrc import read_info, read_volume, write_volume
from disca_tools.io.star import read_star_blocks, write_star_blocks
from disca_tools.simulate.imaging import Imaging, ctf_wedge_weight

pytestmark = pytest.mark.relion

STRUCTURE = "3j9i"  # 20S proteasome: elongated, so a wrong rotation convention shows


def _simulate(name: str, *extra: str) -> Path:
    args = ["subtomograms", "--o", name, "--structures", STRUCTURE, "--n-per-class", "100"]
    args += ["--box", "32", "--angpix", "10", "--snr", "inf", "--seed", "3", "-q", *extra]
    assert simulate_main(args) == 0
    return Path(name)


def _rewrite(src: Path, dst: Path, change) -> None:
    blocks = read_star_blocks(src)
    parts = blocks["particles"].copy()
    change(parts)
    blocks["particles"] = parts
    write_star_blocks(dst, blocks)


@pytest.fixture(scope="module")
def plain_set(tmp_path_factory):
    """No CTF, no wedge, shifts up to 2 voxels; paths relative to the project dir (cwd)."""
    root = tmp_path_factory.mktemp("relion_plain")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _simulate("Sim", "--no-ctf", "--tilt-range", "90", "--max-shift", "2")
    return root


@pytest.fixture(scope="module")
def ctf_set(tmp_path_factory):
    """CTF (300 kV, −5 µm) and ±60° wedge, written with ctf.mrc (cubic, origin at N/2)."""
    root = tmp_path_factory.mktemp("relion_ctf")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _simulate("Ctf", "--tilt-range", "60")
    return root


def test_reconstruction_with_ground_truth_gives_reference(plain_set, monkeypatch):
    monkeypatch.chdir(plain_set)
    ref, _ = read_volume(f"Sim/references/{STRUCTURE}.mrc")
    rec = _relion_reconstruct("Sim/particles.star", "rec.mrc")
    assert rec.shape == ref.shape == (32, 32, 32)
    assert _cc(rec, ref) >= 0.95


def test_inverse_rotation_convention_does_not_match(plain_set, monkeypatch):
    monkeypatch.chdir(plain_set)
    ref, _ = read_volume(f"Sim/references/{STRUCTURE}.mrc")
    good = _cc(_relion_reconstruct("Sim/particles.star", "good.mrc"), ref)

    def invert(df):
        ang = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
        inv = matrix_to_euler(np.transpose(euler_to_matrix(ang), (0, 2, 1)))
        df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = inv

    def swap_rot_psi(df):  # the other common misreading: angles in reverse order
        df[["rlnAngleRot", "rlnAnglePsi"]] = df[["rlnAnglePsi", "rlnAngleRot"]].to_numpy()

    for label, change in (("inverse", invert), ("swapped", swap_rot_psi)):
        _rewrite(Path("Sim/particles.star"), Path(f"{label}.star"), change)
        bad = _cc(_relion_reconstruct(f"{label}.star", f"{label}.mrc"), ref)
        assert bad < 0.95, label
        assert bad < good - 0.03, label


def test_origin_sign_round_trip(plain_set, monkeypatch):
    """origin = −shift·angpix is right: RELION's particle centre is coordinate − origin."""
    monkeypatch.chdir(plain_set)
    ref, _ = read_volume(f"Sim/references/{STRUCTURE}.mrc")
    good = _cc(_relion_reconstruct("Sim/particles.star", "good.mrc"), ref)

    def flip(df):
        for c in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"):
            df[c] = -df[c]

    def zero(df):
        for c in ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"):
            df[c] = 0.0

    _rewrite(Path("Sim/particles.star"), Path("flipped.star"), flip)
    _rewrite(Path("Sim/particles.star"), Path("zero.star"), zero)
    flipped = _cc(_relion_reconstruct("flipped.star", "flipped.mrc"), ref)
    zeroed = _cc(_relion_reconstruct("zero.star", "zero.mrc"), ref)
    assert good > zeroed > flipped
    assert good - flipped > 0.02


def test_ctf_and_wedge_weight_is_compensated_by_relion(ctf_set, monkeypatch):
    """ctf.mrc (cubic, origin at N/2) is accepted by RELION and undoes the simulated CTF × wedge."""
    monkeypatch.chdir(ctf_set)
    ref, _ = read_volume(f"Ctf/references/{STRUCTURE}.mrc")
    with_ctf = _cc(_relion_reconstruct("Ctf/particles.star", "ctf.mrc", ctf=True), ref)
    without = _cc(_relion_reconstruct("Ctf/particles.star", "noctf.mrc", ctf=False), ref)
    assert with_ctf >= 0.95
    assert without < 0.9


def test_ctf_weight_layouts_relion_accepts(ctf_set, monkeypatch):
    """The FFTW half layout (``layout="rfft"``) works as well as the cubic one; FFT order does not."""
    monkeypatch.chdir(ctf_set)
    ref, _ = read_volume(f"Ctf/references/{STRUCTURE}.mrc")
    imaging = Imaging(tilt_range_deg=60.0)
    results = {}
    for layout in ("centered", "rfft", "fft"):
        weight = ctf_wedge_weight((32, 32, 32), 10.0, imaging, layout=layout)
        write_volume(f"Ctf/ctf_{layout}.mrc", weight, 10.0, overwrite=True)
        _rewrite(
            Path("Ctf/particles.star"),
            Path(f"layout_{layout}.star"),
            lambda df, lay=layout: df.__setitem__("rlnCtfImage", f"Ctf/ctf_{lay}.mrc"),
        )
        rec = _relion_reconstruct(f"layout_{layout}.star", f"layout_{layout}.mrc", ctf=True)
        results[layout] = _cc(rec, ref)
    assert read_info("Ctf/ctf_rfft.mrc").shape_xyz == (17, 32, 32)  # (N/2+1)·N·N
    assert results["centered"] >= 0.95
    assert results["rfft"] == pytest.approx(results["centered"], abs=1e-3)
    assert results["fft"] < 0.5  # origin at the corner of a cube: wrong, and RELION shows it
