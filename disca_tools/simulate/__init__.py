"""Simulation of subtomograms and tomograms from real structures, with ground truth.

``structures`` (shipped maps, loading/resampling), ``imaging`` (CTF, missing wedge, noise),
``subtomograms`` (the paper's Table S1 protocol) and ``tomogram`` (crowded tomograms).
"""

from .imaging import Imaging, add_noise, apply_imaging, ctf_wedge_weight
from .structures import list_structures, load_structure, structure_radius_px
from .subtomograms import SubtomogramSet, simulate_subtomogram_set
from .tomogram import TomogramSimulation, simulate_tomogram

__all__ = [
    "Imaging",
    "SubtomogramSet",
    "TomogramSimulation",
    "add_noise",
    "apply_imaging",
    "ctf_wedge_weight",
    "list_structures",
    "load_structure",
    "simulate_subtomogram_set",
    "simulate_tomogram",
    "structure_radius_px",
]
