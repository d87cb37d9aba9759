"""The fast subtomogram store: the one definition of its format.

``subtomograms.npy`` is a plain ``np.save`` array of shape ``(N, S, S, S)`` (float32, or float16),
memory-mappable; ``subtomograms_names.txt`` holds the ``rlnImageName`` of each row, one per line.
``disca_extract`` and ``disca_simulate`` write it beside their ``particles.star``; ``disca_cluster`` and
``disca_split_star`` stream from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.errors import file_error

STORE_FILE = "subtomograms.npy"
NAMES_FILE = "subtomograms_names.txt"


def open_store(folder: str | Path) -> tuple[np.ndarray, list[str]] | None:
    """Memory-map the store in ``folder``: ``(volumes, names)``, or None when there is none.

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
    return vols, names
