"""The particle table: one in-memory form for every STAR flavour.

A :class:`ParticleTable` is a pandas DataFrame of particles plus the facts needed to interpret it.
Columns use RELION's label names (without the leading underscore), with these canonical meanings
whatever flavour the file was read from:

* ``rlnTomoName`` — tomogram name (always present after reading);
* ``rlnMicrographName`` — tomogram file when known (RELION 3.x legacy meaning);
* ``rlnCoordinateX/Y/Z`` — particle position in pixels of ``coord_angpix`` (0-based, RELION);
* optional ``rlnAngleRot/Tilt/Psi`` (ZYZ, degrees), ``rlnOriginX/Y/ZAngst`` (Å),
  ``rlnClassNumber``, ``rlnAutopickFigureOfMerit``, ``rlnMaxValueProbDistribution``,
  ``rlnImageName``, ``rlnCtfImage``, ``rlnOpticsGroup``;
* every other column passes through untouched and is written back.

Readers convert flavour-specific coordinates (RELION 5 centred Å, RELION 4 unbinned tilt-series
pixels, Warp's Mag/DPS pixel size) into this form; writers convert back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

TOMO_NAME = "rlnTomoName"
TOMO_FILE = "rlnMicrographName"
COORDS = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGINS_ANGST = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
CENTERED_ANGST = (
    "rlnCenteredCoordinateXAngst",
    "rlnCenteredCoordinateYAngst",
    "rlnCenteredCoordinateZAngst",
)
CLASS = "rlnClassNumber"
SCORE = "rlnAutopickFigureOfMerit"
POSTERIOR = "rlnMaxValueProbDistribution"
IMAGE = "rlnImageName"
CTF_IMAGE = "rlnCtfImage"
OPTICS_GROUP = "rlnOpticsGroup"


def origins_px(particles: pd.DataFrame, angpix: float) -> np.ndarray | None:
    """The particles' RELION origins ``rlnOriginX/Y/ZAngst`` in pixels of ``angpix`` Å, ``(N, 3)``
    x y z (None where the columns are absent). RELION's particle centre is ``coordinate − origin``."""
    if not all(c in particles.columns for c in ORIGINS_ANGST):
        return None
    return particles[list(ORIGINS_ANGST)].to_numpy(np.float64) / float(angpix)


STRING_COLUMNS = (
    "rlnTomoName",
    "rlnMicrographName",
    "rlnImageName",
    "rlnCtfImage",
    "rlnTomoParticleName",
    "rlnOpticsGroupName",
    "rlnTomoReconstructedTomogram",
    "rlnTomoTiltSeriesStarFile",
    "rlnTomoTiltSeriesName",
    "rlnTomoParticlesFile",
    "rlnTomoTomogramsFile",
)

FLAVOURS = ("relion30", "relion31", "relion4", "relion5", "warp", "pytom")

# RELION 5 tomograms.star (data_global) labels
TOMO_SIZES = ("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ")
TILT_SERIES_ANGPIX = "rlnTomoTiltSeriesPixelSize"
TOMO_BINNING = "rlnTomoTomogramBinning"
TOMO_RECONSTRUCTION = "rlnTomoReconstructedTomogram"


@dataclass
class ParticleTable:
    """Particles plus what is needed to interpret them.

    Attributes
    ----------
    particles: one row per particle (see the module docstring for canonical columns).
    coord_angpix: voxel size (Å) that ``rlnCoordinateX/Y/Z`` are expressed in; None if unknown.
    optics: RELION optics groups (``data_optics``) or None.
    tomograms: RELION 5 tomograms table (``rlnTomoName``, sizes, pixel size, binning, file) or None.
    flavour: the flavour read from (one of :data:`FLAVOURS`), kept so writers can answer in kind.
    source: the file it came from.
    general: RELION 5 ``data_general`` key/values.
    tomogram_blocks: the other data blocks of the tomograms.star read (Warp's per-tomogram tables),
        written back unchanged beside ``tomograms``.
    tomograms_source: the tomograms.star file ``tomograms`` came from, if any.
    """

    particles: pd.DataFrame
    coord_angpix: float | None = None
    optics: pd.DataFrame | None = None
    tomograms: pd.DataFrame | None = None
    flavour: str = "relion31"
    source: Path | None = None
    general: dict = field(default_factory=dict)
    tomogram_blocks: dict = field(default_factory=dict)
    tomograms_source: Path | None = None

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def coords_px(self) -> np.ndarray:
        """``(N, 3)`` particle positions ``(x, y, z)`` in pixels of ``coord_angpix``."""
        return self.particles[list(COORDS)].to_numpy(dtype=np.float64)

    def coords_at(self, angpix: float) -> np.ndarray:
        """Positions in pixels of another voxel size."""
        if not self.coord_angpix:
            raise ValueError("coordinate voxel size unknown")
        return self.coords_px * (self.coord_angpix / float(angpix))

    @property
    def has_angles(self) -> bool:
        return all(c in self.particles.columns for c in ANGLES)

    def image_angpix(self) -> float | None:
        """Pixel size of the subtomograms (rlnImagePixelSize of the first optics group), if known."""
        if (
            self.optics is not None
            and "rlnImagePixelSize" in self.optics.columns
            and len(self.optics)
        ):
            return float(self.optics["rlnImagePixelSize"].iloc[0])
        return None

    def with_particles(self, particles: pd.DataFrame) -> ParticleTable:
        """A copy sharing the metadata with a new particle DataFrame."""
        return replace(self, particles=particles.reset_index(drop=True))
