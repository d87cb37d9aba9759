"""ParticleTable: the one in-memory form every STAR flavour is read into."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from disca_tools.io.particles import COORDS, TOMO_NAME, ParticleTable
from disca_tools.io.star import default_optics, read_particles

DATA = Path(__file__).parent / "data" / "star"
PARTICLE_FIXTURES = [
    DATA / "relion3" / "warp_export_relion30.star",
    DATA / "relion3" / "refine_relion31_optics.star",
    DATA / "relion3" / "refine_relion31_two_optics_groups.star",
    DATA / "relion4" / "pseudosubtomo_relion40.star",
    DATA / "relion5_warp" / "particles.star",
    DATA / "warptools_tomodrgn" / "warptools_test_4-tomos_10-ptcls_box-32_angpix-12.star",
]


def _table(**kw) -> ParticleTable:
    df = pd.DataFrame(
        {
            TOMO_NAME: ["01", "01", "02"],
            "rlnCoordinateX": [10.0, 20.0, 30.0],
            "rlnCoordinateY": [1.0, 2.0, 3.0],
            "rlnCoordinateZ": [5.0, 6.0, 7.5],
        },
        index=[7, 8, 9],
    )
    return ParticleTable(df, **kw)


def test_coords_px_and_rescaling():
    t = _table(coord_angpix=4.0)
    assert t.coords_px.shape == (3, 3)
    np.testing.assert_array_equal(t.coords_px[2], [30.0, 3.0, 7.5])
    # 30 px of 4 Å = 120 Å = 15 px of 8 Å
    np.testing.assert_allclose(t.coords_at(8.0)[2], [15.0, 1.5, 3.75])
    np.testing.assert_allclose(t.coords_at(1.0)[0], [40.0, 4.0, 20.0])
    with pytest.raises(ValueError, match="unknown"):
        _table().coords_at(8.0)


def test_angles_optics_and_metadata():
    t = _table(coord_angpix=4.0)
    assert not t.has_angles and t.image_angpix() is None
    df = t.particles.assign(rlnAngleRot=0.0, rlnAngleTilt=10.0, rlnAnglePsi=20.0)
    t2 = ParticleTable(df, 4.0, default_optics(2.0, 32))
    assert t2.has_angles and t2.image_angpix() == 2.0
    assert len(t2) == 3


def test_with_particles_keeps_metadata_and_resets_index():
    t = _table(coord_angpix=4.0, optics=default_optics(2.0, 32), flavour="relion5")
    t.tomogram_blocks["x"] = pd.DataFrame({"rlnA": [1]})
    sub = t.with_particles(t.particles[t.particles[TOMO_NAME] == "01"])
    assert list(sub.particles.index) == [0, 1]
    assert sub.coord_angpix == 4.0 and sub.flavour == "relion5" and sub.optics is t.optics
    assert "x" in sub.tomogram_blocks
    # defaults are per instance, never shared
    assert _table().tomogram_blocks == {} and _table().general == {}


@pytest.mark.parametrize("path", PARTICLE_FIXTURES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_fixture_has_the_canonical_columns(path):
    t = read_particles(path)
    df = t.particles
    assert TOMO_NAME in df.columns and all(c in df.columns for c in COORDS)
    assert all(isinstance(n, str) for n in df[TOMO_NAME])
    assert all(df[c].dtype == np.float64 for c in COORDS)
    assert t.coord_angpix is not None and t.coord_angpix > 0
    assert list(df.index) == list(range(len(df)))
    assert t.source == path
