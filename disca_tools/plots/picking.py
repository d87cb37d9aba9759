"""Picking figure: a few z slices of a tomogram with the picks near each slice circled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.outputs import atomic_path


def _slab_image(volume_zyx: np.ndarray, z: int, half: int, binning: int) -> np.ndarray:
    """Mean of a thin slab around ``z`` (reads only that slab), binned in x/y for display."""
    z0, z1 = max(0, z - half), min(volume_zyx.shape[0], z + half + 1)
    ny, nx = volume_zyx.shape[1:]
    b = binning
    img = np.zeros((ny // b, nx // b), dtype=np.float64)
    for zz in range(z0, z1):
        sl = np.asarray(volume_zyx[zz, : ny // b * b, : nx // b * b], dtype=np.float32)
        img += sl.reshape(ny // b, b, nx // b, b).mean(axis=(1, 3))
    return img / max(1, z1 - z0)


def plot_picks(
    path: str | Path,
    volume_zyx: np.ndarray,
    coords_xyz: np.ndarray,
    radius_px: float,
    title: str = "",
    n_slices: int = 3,
    polarity: str = "dark",
    max_pixels: int = 1024,
) -> Path:
    """Write a PNG of ``n_slices`` z slices with picks within ``radius_px`` of each slice circled.

    ``coords_xyz`` are in pixels of ``volume_zyx`` (which may be a memory map; only a few slices are
    read). Large tomograms are shown binned in x/y to at most ``max_pixels`` across. Protein is shown
    dark whatever the polarity, as tomogram viewers do.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    nz, ny, nx = volume_zyx.shape
    disp_bin = max(1, int(np.ceil(max(ny, nx) / max_pixels)))
    zs = sorted({int(f * (nz - 1)) for f in np.linspace(0.3, 0.7, n_slices)}) if nz > 1 else [0]
    coords = np.asarray(coords_xyz, dtype=np.float64).reshape(-1, 3)
    fig, axes = plt.subplots(
        1, len(zs), figsize=(4.2 * len(zs), 4.2 * ny / max(nx, 1) + 0.6), squeeze=False
    )
    half = max(1, int(round(radius_px / 2)))
    for ax, z in zip(axes[0], zs, strict=True):
        img = _slab_image(volume_zyx, z, half, disp_bin)
        if polarity == "bright":
            img = -img
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
        near = coords[np.abs(coords[:, 2] - z) <= radius_px] if len(coords) else coords
        for x, y, zc in near:
            r = np.sqrt(max(radius_px**2 - (zc - z) ** 2, 0.25)) / disp_bin
            ax.add_patch(
                Circle((x / disp_bin, y / disp_bin), r, fill=False, color="tab:red", lw=0.8)
            )
        ax.set_title(f"z = {z} ({len(near)} picks)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"{len(coords)} picks", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return out
