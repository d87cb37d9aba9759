"""The fast subtomogram store across several extractions: StackedVolumes and find_stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import working_directory

from disca_tools.io.mrc import read_volume, write_volume
from disca_tools.io.particles import IMAGE, ParticleTable
from disca_tools.io.store import (
    NAMES_FILE,
    STORE_FILE,
    StackedVolumes,
    find_stores,
    resolve_image_name,
)
from disca_tools.model.data import gather, load_particle_volumes, normalise
from disca_tools.runtime.errors import UserError


def _write_store(folder: Path, names: list[str], vols: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / STORE_FILE, vols)
    (folder / NAMES_FILE).write_text("".join(f"{n}\n" for n in names))


def _extraction(root: Path, tomo: str, n: int, box: int, seed: int, dtype=np.float32):
    """An Extract/<tomo> folder as disca_extract writes it: store, names and per-particle MRCs."""
    vols = np.random.default_rng(seed).normal(size=(n, box, box, box)).astype(dtype)
    names = [f"Extract/{tomo}/Subtomograms/{tomo}/{tomo}_{i + 1:06d}.mrc" for i in range(n)]
    _write_store(root / "Extract" / tomo, names, vols)
    for name, v in zip(names, vols, strict=True):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_volume(root / name, v.astype(np.float32), 10.0)
    return names, vols


def test_stacked_volumes_index_like_one_concatenated_array():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(m, 4, 4, 4)).astype(np.float32) for m in (3, 1, 5)]
    parts[1] = parts[1].astype(np.float16)
    stacked = StackedVolumes(parts, [Path(f"s{i}") for i in range(3)])
    whole = np.concatenate([p.astype(np.float32) for p in parts])
    assert stacked.shape == whole.shape and len(stacked) == 9 and stacked.dtype == np.float32
    for key in (0, 3, 4, 8, -1, slice(2, 7), slice(None, None, -2), np.array([8, 0, 3, 3, 5])):
        assert np.array_equal(stacked[key], whole[key]), key
    mask = np.zeros(9, bool)
    mask[[1, 3, 6]] = True
    assert np.array_equal(stacked[mask], whole[mask])
    assert list(stacked.part_of(np.array([0, 2, 3, 4, 8]))) == [0, 0, 1, 2, 2]
    for bad in (9, -10, np.array([0, 9]), np.array([-1])):
        with pytest.raises(IndexError):
            stacked[bad]


def test_find_stores_reads_a_merged_star_from_each_extraction(tmp_path):
    a_names, a_vols = _extraction(tmp_path, "TS_01", 4, 6, 1)
    b_names, b_vols = _extraction(tmp_path, "TS_02", 3, 6, 2, dtype=np.float16)
    _write_store(tmp_path / "Extract" / "TS_03", ["Extract/TS_03/x.mrc"], np.ones((1, 8, 8, 8)))
    wanted = [b_names[2], a_names[0], b_names[0], a_names[3]]
    truth = np.stack([b_vols[2], a_vols[0], b_vols[0], a_vols[3]]).astype(np.float32)
    with working_directory(tmp_path):
        found = find_stores(wanted, folders=(Path("Extract"),), bases=(Path("."),))
    assert found is not None and isinstance(found.store.volumes, StackedVolumes)
    # TS_03 holds none of the names (and has another box): it takes no part
    assert [p.parent.name for p in found.store.paths] == ["TS_01", "TS_02"]
    assert np.array_equal(found.store.volumes[found.rows], truth)
    assert [found.store.names[r] for r in found.rows] == wanted
    # resolved against the STAR's folder too (a run from elsewhere)
    found = find_stores(wanted, folders=(), bases=(Path("/nonexistent"), tmp_path))
    assert found is not None and np.array_equal(found.store.volumes[found.rows], truth)
    # one store holding every name is used as it is
    with working_directory(tmp_path):
        one = find_stores(a_names[::-1], folders=(Path("Extract"),), bases=(Path("."),))
        assert isinstance(one.store.volumes, np.memmap) and len(one.store.paths) == 1
        assert np.array_equal(one.store.volumes[one.rows], a_vols[::-1])
        # a name that no store holds: None (the caller reads the .mrc files)
        assert find_stores([*a_names, "Extract/TS_09/y.mrc"], (), (Path("."),)) is None


def test_find_stores_refuses_stores_of_different_boxes(tmp_path):
    a_names, _ = _extraction(tmp_path, "TS_01", 2, 6, 1)
    b_names, _ = _extraction(tmp_path, "TS_02", 2, 8, 2)
    with working_directory(tmp_path), pytest.raises(UserError) as err:
        find_stores([*a_names, *b_names], (), (Path("."),))
    msg = str(err.value)
    assert msg.startswith(f"Extract/TS_02/{STORE_FILE}: subtomograms of 8³ voxels")
    assert "one box size" in msg


def test_cluster_data_of_a_merged_star_is_read_in_place(tmp_path):
    a_names, _ = _extraction(tmp_path, "TS_01", 5, 6, 1)
    b_names, _ = _extraction(tmp_path, "TS_02", 4, 6, 2)
    names = [n for pair in zip(a_names, b_names, strict=False) for n in pair] + a_names[4:]
    table = ParticleTable(particles=pd.DataFrame({IMAGE: names}))
    with working_directory(tmp_path):
        store, rows = load_particle_volumes(table, "Extract/particles.star", "Cluster")
        assert not Path("Cluster").exists()  # nothing copied
        expected = normalise(np.stack([read_volume(n)[0] for n in names]))
    assert np.allclose(gather(store, rows), expected, atol=1e-5)


def test_image_names_resolve_like_relion(tmp_path, monkeypatch):
    """rlnImageName: the working directory (the project) first, then the STAR file's folder; an
    ``N@`` stack prefix names the file after it; None when neither place has it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Extract").mkdir()
    (tmp_path / "Extract" / "sub").mkdir()
    (tmp_path / "Extract" / "sub" / "a.mrc").write_bytes(b"")  # beside the STAR only
    (tmp_path / "b.mrc").write_bytes(b"")  # in the project and beside the STAR
    (tmp_path / "Extract" / "b.mrc").write_bytes(b"")
    star = tmp_path / "Extract" / "particles.star"
    assert resolve_image_name("sub/a.mrc", star) == star.parent / "sub" / "a.mrc"
    assert resolve_image_name("b.mrc", star) == Path("b.mrc")
    assert resolve_image_name("3@b.mrc", star) == Path("b.mrc")
    assert resolve_image_name("gone.mrc", star) is None
