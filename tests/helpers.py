"""Small helpers shared by the tests: correlation and the real RELION binaries."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from disca_tools.io.mrc import read_volume


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two volumes of the same shape."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def relion_exe(name: str) -> str:
    """Path of a RELION program; the test FAILS (never skips) when it is missing."""
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(
            f"{name} not found on PATH: run `make test` (installs Debian's relion 3.1) "
            "or `apt-get install relion`"
        )
    return exe


def relion_reconstruct(
    star: str, out: str, ctf: bool = False, extra: Sequence[str] = ()
) -> np.ndarray:
    """Run ``relion_reconstruct`` from the current (project) directory and read the map."""
    cmd = [
        relion_exe("relion_reconstruct"),
        "--i",
        star,
        "--o",
        out,
        *(["--ctf"] if ctf else []),
        *extra,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"relion_reconstruct failed: {res.stderr[-2000:]}"
    vol, _ = read_volume(out)
    return vol


@contextlib.contextmanager
def working_directory(path: str | Path) -> Iterator[Path]:
    """Run a block from ``path`` (the RELION project directory of a test)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield Path(path)
    finally:
        os.chdir(old)


def simulate_subtomograms(
    out: str,
    structures: Sequence[str],
    n_per_class: int,
    box: int,
    angpix: float,
    snr: float | str,
    seed: int,
    *extra: str,
) -> None:
    """Run ``disca_simulate subtomograms`` from the current directory (asserting success)."""
    from disca_tools.cli.simulate import main

    args = [
        "subtomograms",
        "--o",
        out,
        "--structures",
        *structures,
        "--n-per-class",
        str(n_per_class),
    ]
    args += [
        "--box",
        str(box),
        "--angpix",
        str(angpix),
        "--snr",
        str(snr),
        "--seed",
        str(seed),
        "-q",
    ]
    assert main([*args, *extra]) == 0
