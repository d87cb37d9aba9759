"""Re-embedding figure: a few z slices of the re-embedded density with the classes coloured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io.mrc import open_volume
from ..runtime.outputs import atomic_path


def choose_slices(z_px: Sequence[float], nz: int, n: int = 3) -> list[int]:
    """``n`` z slices at evenly spaced quantiles of the particles' z (the middle of the volume if none)."""
    z = np.asarray(z_px, dtype=np.float64)
    z = z[(z >= 0) & (z < nz)]
    if not len(z):
        return [nz // 2]
    qs = np.linspace(0, 1, n + 2)[1:-1]
    return sorted({int(np.clip(round(float(np.quantile(z, q))), 0, nz - 1)) for q in qs})


def plot_reembed(
    density_path: str | Path,
    labels_path: str | Path,
    out_png: str | Path,
    z_slices: Sequence[int],
    class_numbers: Sequence[int] = (),
    title: str = "",
    max_pixels: int = 800,
) -> Path:
    """Write a PNG: for each z slice, the density in grey with the label of each voxel coloured.

    Only the requested slices are read (the volumes are memory-mapped); large slices are binned for
    display to at most ``max_pixels`` on a side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    dens, _ = open_volume(density_path)
    labels, _ = open_volume(labels_path)
    ny, nx = dens.shape[1:]
    step = max(1, int(np.ceil(max(ny, nx) / max_pixels)))
    classes = sorted(set(int(c) for c in class_numbers)) or [1]
    cmap = plt.get_cmap("tab10" if max(classes) <= 10 else "tab20")
    colours = ListedColormap([cmap((c - 1) % cmap.N) for c in range(1, max(classes) + 1)])

    n = len(z_slices)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    for ax, z in zip(axes[0], z_slices, strict=True):
        d = np.asarray(dens[int(z), ::step, ::step], dtype=np.float32)
        lab = np.asarray(labels[int(z), ::step, ::step])
        lo, hi = (float(v) for v in np.percentile(d, [1, 99.8]))
        ax.imshow(
            d,
            cmap="gray",
            vmin=lo,
            vmax=hi if hi > lo else lo + 1,
            origin="lower",
            interpolation="nearest",
        )
        overlay = np.ma.masked_where(lab <= 0, lab.astype(np.float32) - 1)
        ax.imshow(
            overlay,
            cmap=colours,
            vmin=-0.5,
            vmax=max(classes) - 0.5,
            alpha=0.45,
            origin="lower",
            interpolation="nearest",
        )
        ax.set_title(f"z = {int(z)}")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=colours(c - 1), label=f"class {c}") for c in classes]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
