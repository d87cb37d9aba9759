"""Simulation of subtomograms and tomograms from real structures, with ground truth."""
