"""The fast subtomogram store: the one definition of its format.

``subtomograms.npy`` is a plain ``np.save`` array of shape ``(N, S, S, S)`` (float32, or float16),
memory-mappable; ``subtomograms_names.txt`` holds the ``rlnImageName`` of each row, one per line.
``disca_extract`` and ``disca_simulate`` write it beside their ``particles.star``; ``disca_cluster`` and
``disca_split_star`` stream from it, or from several (:func:`find_stores`) when a STAR file merges the
particles of several extractions (one per tomogram on a cluster).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import file_error
from .star import reference_bases

STORE_FILE = "subtomograms.npy"
NAMES_FILE = "subtomograms_names.txt"


def open_store(folder: str | Path) -> SubtomogramStore | None:
    """Memory-map the store in ``folder``, or None when there is none.

    A store that exists but is unreadable, not ``(N, S, S, S)``, or whose names do not match its
    rows is a UserError naming the file.
    """
    f = Path(folder)
    vol_path, names_path = f / STORE_FILE, f / NAMES_FILE
    if not (vol_path.is_file() and names_path.is_file()):
        return None
    try:
        vols = np.load(vol_path, mmap_mode="r")
    except Exception as exc:  # corrupt or foreign file
        raise file_error(vol_path, f"not a readable subtomogram store ({exc})") from None
    names = names_path.read_text().splitlines()
    if vols.ndim != 4 or len(set(vols.shape[1:])) != 1:
        raise file_error(vol_path, f"expected an (N, S, S, S) array, got shape {vols.shape}")
    if len(names) != vols.shape[0]:
        raise file_error(
            names_path, f"{len(names)} names for {vols.shape[0]} subtomograms in {vol_path.name}"
        )
    return SubtomogramStore(vols, names, vol_path)


class StackedVolumes:
    """Several stores' ``(M_i, S, S, S)`` arrays read as one ``(ΣM_i, S, S, S)`` array, never copied.

    Row ``offsets[p] + j`` is row ``j`` of store ``p``. Indexing takes an int, a slice or an integer
    array (reads in ascending order are kindest to the memmaps); the result has the stores' common
    dtype (float32 when float16 and float32 stores are mixed).
    """

    ndim = 4

    def __init__(self, arrays: Sequence[np.ndarray], paths: Sequence[Path]) -> None:
        self.arrays = list(arrays)
        self.paths = list(paths)
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])]).astype(
            np.int64
        )
        self.dtype = np.result_type(*(a.dtype for a in self.arrays))
        self.shape = (int(self.offsets[-1]), *self.arrays[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def part_of(self, rows: np.ndarray | int) -> np.ndarray:
        """Index of the store holding each row."""
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            row = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} subtomograms")
            p = int(self.part_of(row))
            return np.asarray(self.arrays[p][row - self.offsets[p]], dtype=self.dtype)
        rows = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= len(self))):
            raise IndexError(f"rows must be a 1-D array within 0..{len(self) - 1}")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        parts = self.part_of(rows)
        for p in np.unique(parts):
            take = parts == p
            out[take] = self.arrays[p][rows[take] - self.offsets[p]]
        return out


@dataclass
class SubtomogramStore:
    """A memory-mapped (M, S, S, S) array of subtomograms and the image name of each row.

    ``volumes`` is one store's memmap, or several stores read as one (:class:`StackedVolumes`);
    ``path`` is the (first) store file.
    """

    volumes: np.ndarray | StackedVolumes
    names: list[str]
    path: Path

    @property
    def box(self) -> int:
        return int(self.volumes.shape[1])

    @property
    def paths(self) -> list[Path]:
        """Every store file read: one, or one per store of a :class:`StackedVolumes`."""
        if isinstance(self.volumes, StackedVolumes):
            return list(self.volumes.paths)
        return [Path(self.path)]

    def __len__(self) -> int:
        return int(self.volumes.shape[0])

    def source(self, row: int) -> str:
        """The store file and image name of a row, for messages."""
        path = self.path
        if isinstance(self.volumes, StackedVolumes):
            path = self.volumes.paths[int(self.volumes.part_of(row))]
        return f"{path} ({self.names[row]})"


@dataclass(frozen=True)
class FoundStores:
    """The store(s) holding a list of subtomograms, read as one, and the row of each requested name."""

    store: SubtomogramStore
    rows: np.ndarray


def _ancestor_folders(names: Sequence[str]) -> list[str]:
    """Every folder above the image files (``a/b/c.mrc`` gives ``a/b`` and ``a``), sorted."""
    found: set[str] = set()
    for d in {os.path.dirname(n) for n in names}:
        while d and d not in found and d != os.path.dirname(d):
            found.add(d)
            d = os.path.dirname(d)
    return sorted(found)


def find_stores(
    names: Sequence[str], folders: Sequence[Path], bases: Sequence[Path]
) -> FoundStores | None:
    """The fast store(s) holding every named subtomogram (``rlnImageName``), or None.

    First one store in ``folders`` (beside the STAR file, say) that lists every name. Else the stores
    in the folders above the image files, each resolved against ``bases`` (the project directory,
    the STAR's folder): a STAR that merges the per-tomogram ``particles.star`` of ``disca_extract``
    (``Extract/<tomogram>/subtomograms.npy``) is read from those stores in place, not copied. Only
    stores that hold one of the names take part; a name in several is read from the first (in
    sorted folder order). Stores of different box sizes are a UserError naming the file.
    """
    wanted = [str(n) for n in names]
    opened: dict[Path, SubtomogramStore | None] = {}

    def open_once(folder: Path) -> SubtomogramStore | None:
        key = Path(folder).resolve()  # the STAR's folder can also be above its images
        if key not in opened:
            opened[key] = open_store(folder)
        return opened[key]

    for folder in folders:
        found = open_once(folder)
        if found is not None:
            index = {n: i for i, n in enumerate(found.names)}
            rows = [index.get(n) for n in wanted]
            if all(r is not None for r in rows):
                return FoundStores(found, np.asarray(rows, np.int64))
    candidates: list[Path] = []
    seen: set[Path] = set()
    for rel in _ancestor_folders(wanted):
        for base in bases:
            folder = Path(base) / rel
            if (folder / STORE_FILE).is_file() and folder.resolve() not in seen:
                seen.add(folder.resolve())
                candidates.append(folder)
    needed = set(wanted)
    index: dict[str, int] = {}
    arrays, all_names, paths = [], [], []
    for folder in candidates:
        found = open_once(folder)
        if found is None or not any(n in needed and n not in index for n in found.names):
            continue
        vols, store_names = found.volumes, found.names
        if arrays and vols.shape[1:] != arrays[0].shape[1:]:
            raise file_error(
                folder / STORE_FILE,
                f"subtomograms of {vols.shape[1]}³ voxels, where {paths[0]} has "
                f"{arrays[0].shape[1]}³: the particles must share one box size",
            )
        for i, n in enumerate(store_names):
            index.setdefault(n, len(all_names) + i)
        arrays.append(vols)
        all_names.extend(store_names)
        paths.append(folder / STORE_FILE)
    rows = [index.get(n) for n in wanted]
    if not arrays or any(r is None for r in rows):
        return None
    volumes = arrays[0] if len(arrays) == 1 else StackedVolumes(arrays, paths)
    return FoundStores(SubtomogramStore(volumes, all_names, paths[0]), np.asarray(rows, np.int64))


def resolve_image_name(name: str, star_path: str | Path) -> Path | None:
    """The file of an ``rlnImageName`` of ``star_path`` (an ``N@`` stack prefix stripped), in the
    first of :func:`~disca_tools.io.star.reference_bases` that has it; None if neither."""
    raw = str(name).split("@", 1)[-1]
    for base in reference_bases(star_path):
        if (base / raw).is_file():
            return base / raw
    return None


def find_star_stores(
    names: Sequence[str], star_path: str | Path, also_in: Sequence[Path] = ()
) -> FoundStores | None:
    """:func:`find_stores` for the particles of the STAR file ``star_path``: a store beside it (or in
    ``also_in``), else the stores above the image files, resolved as :func:`resolve_image_name`
    resolves the names."""
    bases = reference_bases(star_path)
    return find_stores(names, folders=(bases[1], *also_in), bases=bases)
