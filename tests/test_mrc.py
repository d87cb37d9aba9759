"""MRC I/O: permissive reading of real maps, bad input, float16, atomic writes, memory mapping."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from disca_tools.io.mrc import (
    check_angpix,
    create_volume_memmap,
    open_volume,
    read_info,
    read_volume,
    write_volume,
)
from disca_tools.runtime.errors import UserError

REAL = Path(__file__).parent / "data" / "real"
EMD_3197 = REAL / "EMD-3197_subtomogram_average.map"
MICROTUBULE = REAL / "microtubule_tomogram_crop_14pf.mrc"


def _ramp(shape=(5, 6, 7)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 10.0


# ----------------------------------------------------------------------------- real files


def test_reads_emdb_map_that_fails_validation():
    assert not mrcfile.validate(str(EMD_3197), print_file=open("/dev/null", "w"))  # nversion = 0
    vol, angpix = read_volume(EMD_3197)
    assert vol.shape == (20, 20, 20) and vol.dtype == np.float32
    assert angpix == pytest.approx(11.4, abs=1e-4)
    with mrcfile.open(EMD_3197, permissive=True) as m:
        np.testing.assert_array_equal(vol, m.data)
    info = read_info(EMD_3197)
    assert info.shape_xyz == (20, 20, 20) and info.angpix == pytest.approx(11.4, abs=1e-4)


def test_reads_real_tomogram_crop_zyx_and_override():
    info = read_info(MICROTUBULE)
    assert info.shape_xyz == (84, 136, 44)
    assert info.shape_zyx == (44, 136, 84)
    vol, angpix = read_volume(MICROTUBULE, angpix=7.0)
    assert vol.shape == (44, 136, 84)
    assert angpix == 7.0
    assert read_volume(MICROTUBULE)[1] == pytest.approx(10.52, abs=1e-3)


# ----------------------------------------------------------------------------- bad input


def test_missing_file_names_the_file(tmp_path):
    p = tmp_path / "nope.mrc"
    for fn in (read_volume, read_info, open_volume):
        with pytest.raises(UserError, match=r"nope\.mrc: file not found"):
            fn(p)


def test_directory_is_refused(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        read_volume(tmp_path)


def test_not_an_mrc_file(tmp_path):
    p = tmp_path / "particles.mrc"
    p.write_text("data_particles\nloop_\n_rlnCoordinateX #1\n1.0\n" * 40)
    with pytest.raises(UserError) as err:
        read_volume(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: not an MRC file") and "\n" not in msg
    tiny = tmp_path / "tiny.mrc"
    tiny.write_bytes(b"\x00" * 100)  # shorter than a header
    with pytest.raises(UserError, match=r"tiny\.mrc: not an MRC file \(only 100 bytes"):
        read_volume(tiny)
    zeros = tmp_path / "zeros.mrc"
    zeros.write_bytes(b"\x00" * 4096)  # a header of zeros: no dimensions
    with pytest.raises(UserError, match=r"zeros\.mrc: not an MRC file"):
        read_info(zeros)


def test_truncated_mrc(tmp_path):
    good = write_volume(tmp_path / "good.mrc", _ramp((8, 8, 8)), 5.0)
    data = good.read_bytes()
    bad = tmp_path / "truncated.mrc"
    bad.write_bytes(data[: 1024 + 8 * 8 * 4 * 3])  # header + 3 of 8 sections
    with pytest.raises(
        UserError,
        match=r"truncated\.mrc: truncated MRC file \(header promises 3072 bytes, file has 1792\)",
    ):
        read_volume(bad)
    with pytest.raises(UserError, match=r"truncated\.mrc"):
        open_volume(bad)


def test_check_angpix_disagreement():
    assert check_angpix("a.mrc", 10.0, None) == 10.0
    assert check_angpix("a.mrc", 10.0, 10.05) == 10.05
    assert check_angpix("a.mrc", 0.0, 7.0) == 7.0
    with pytest.raises(UserError, match=r"a\.mrc: voxel size 10 Å .* disagrees with 5"):
        check_angpix("a.mrc", 10.0, 5.0)
    with pytest.raises(UserError, match=r"a\.mrc: header has no voxel size"):
        check_angpix("a.mrc", 0.0, None)


# ----------------------------------------------------------------------------- writing


def test_write_float32_round_trip_and_header(tmp_path):
    vol = _ramp()
    p = write_volume(tmp_path / "v.mrc", vol, 4.5)
    back, angpix = read_volume(p)
    np.testing.assert_array_equal(back, vol)
    assert angpix == pytest.approx(4.5)
    assert mrcfile.validate(str(p), print_file=open("/dev/null", "w"))
    with mrcfile.open(p) as m:
        assert int(m.header.mode) == 2
        assert float(m.header.dmax) == pytest.approx(float(vol.max()))
        assert float(m.header.rms) == pytest.approx(float(vol.std()), rel=1e-5)


def test_write_float16(tmp_path):
    vol = _ramp()
    p = write_volume(tmp_path / "h.mrc", vol, 3.0, float16=True)
    assert p.stat().st_size == 1024 + vol.size * 2
    with mrcfile.open(p) as m:
        assert int(m.header.mode) == 12 and m.data.dtype == np.float16
    back, _ = read_volume(p)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, vol, rtol=1e-3)


def test_write_refuses_existing_and_non_3d(tmp_path):
    p = write_volume(tmp_path / "v.mrc", _ramp(), 1.0)
    before = p.read_bytes()
    with pytest.raises(UserError, match=r"v\.mrc: output already exists"):
        write_volume(p, _ramp() * 2, 1.0)
    assert p.read_bytes() == before
    write_volume(p, _ramp() * 2, 1.0, overwrite=True)
    np.testing.assert_array_equal(read_volume(p)[0], _ramp() * 2)
    with pytest.raises(UserError, match="expected a 3D volume"):
        write_volume(tmp_path / "flat.mrc", np.zeros((4, 4)), 1.0)
    assert not (tmp_path / "flat.mrc").exists()


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    write_volume(tmp_path / "a.mrc", _ramp(), 1.0)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.mrc"]

    class Boom(RuntimeError):
        pass

    class ExplodingHeader:
        def tobytes(self):
            raise Boom("disk full")

    import disca_tools.io.mrc as mrc_mod

    # the failure happens inside the atomic block, after the temporary file was created
    monkeypatch.setattr(mrc_mod, "mrc_header", lambda *a, **k: ExplodingHeader())
    with pytest.raises(Boom):
        write_volume(tmp_path / "b.mrc", _ramp(), 1.0)
    with pytest.raises(Boom):
        write_volume(tmp_path / "a.mrc", _ramp() * 3, 1.0, overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_volume(tmp_path / "a.mrc")[0], _ramp())  # old file intact
    # neither the final file nor a temporary one is left behind
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.mrc"]


# ----------------------------------------------------------------------------- memory mapping


def test_open_volume_is_a_memmap(tmp_path):
    vol = _ramp((6, 5, 4))
    p = write_volume(tmp_path / "m.mrc", vol, 2.0)
    data, angpix = open_volume(p)
    assert isinstance(data, np.memmap)
    assert angpix == pytest.approx(2.0)
    np.testing.assert_array_equal(np.asarray(data[2:4, 1]), vol[2:4, 1])
    with pytest.raises((ValueError, TypeError)):
        data[0, 0, 0] = 1.0  # read-only


def test_create_volume_memmap_fills_a_readable_file(tmp_path):
    p = tmp_path / "big.mrc"
    mm = create_volume_memmap(p, (4, 6, 8), 12.0)
    mm[:] = 0.0
    mm[1, 2, 3] = 5.0
    mm.flush()
    del mm
    vol, angpix = read_volume(p)
    assert vol.shape == (4, 6, 8) and angpix == pytest.approx(12.0)
    assert vol[1, 2, 3] == 5.0 and vol.sum() == 5.0
    h = read_info(p)
    assert h.shape_xyz == (8, 6, 4)
