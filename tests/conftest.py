"""Shared, generic fixtures: a temporary RELION-style project folder and small simulated data sets.

The simulated sets are session-scoped (made once) and tiny; treat them as read-only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers import simulate_subtomograms, working_directory  # noqa: E402

from disca_tools.simulate.imaging import Imaging  # noqa: E402
from disca_tools.simulate.subtomograms import SubtomogramSet, simulate_subtomogram_set  # noqa: E402
from disca_tools.simulate.tomogram import TomogramSimulation, simulate_tomogram  # noqa: E402

SMALL_STRUCTURES = ["1bxn", "3j9i", "4v4r"]  # RuBisCO, 20S proteasome, 70S ribosome


@pytest.fixture
def project_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh folder made the working directory, as RELION runs programs from the project root."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def small_subtomogram_set() -> SubtomogramSet:
    """3 classes × 10 subtomograms, box 24 at 14 Å, SNR 0.5, CTF + ±60° wedge, seed 0."""
    return simulate_subtomogram_set(SMALL_STRUCTURES, 10, 24, 14.0, 0.5, Imaging(), seed=0)


@pytest.fixture(scope="session")
def small_tomogram() -> TomogramSimulation:
    """A 160×160×64 tomogram at 14 Å with 12 particles of 3 classes, SNR 0.5, seed 0 (protein dark)."""
    return simulate_tomogram(SMALL_STRUCTURES, (160, 160, 64), 12, 14.0, 0.5, Imaging(), seed=0)


@pytest.fixture(scope="session")
def simulated_subtomogram_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder holding ``Sim/`` written by ``disca_simulate subtomograms``.

    3 classes × 8, box 24 at 14 Å, SNR 1, seed 0. STAR paths are relative to the returned folder:
    chdir there (``monkeypatch.chdir``) before reading ``Sim/particles.star``.
    """
    root = tmp_path_factory.mktemp("sim_project")
    with working_directory(root):
        simulate_subtomograms("Sim", SMALL_STRUCTURES, 8, 24, 14, 1, 0)
    return root
