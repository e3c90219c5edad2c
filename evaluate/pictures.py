"""Per-case PNG: axial, coronal and sagittal slices through the tumour centre, contours over FLAIR."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prep.synth.preview import save_figure
from store.conventions import REGIONS

REGION_COLOURS = {"WT": "#2ca02c", "TC": "#d62728", "ET": "#ffdd00"}


def save_overlay(flair: np.ndarray, gt: np.ndarray, pred: np.ndarray, out: str | Path, title: str,
                 brain: np.ndarray | None = None) -> Path:
    """``flair`` (X, Y, Z) and boolean regions ``gt``/``pred`` (3, X, Y, Z), all RAS; ground truth solid,
    prediction dashed. ``brain`` (X, Y, Z) marks what to show (default: nonzero FLAIR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg = np.argwhere(gt[1] if gt[1].any() else pred[1])  # through the tumour's centre
    centre = fg.mean(0).astype(int) if len(fg) else np.array(flair.shape) // 2
    # z-scored intensities: window on the brain's own range, background (exactly 0) shown black
    brain = flair != 0 if brain is None else brain
    vals = flair[brain]
    vmin, vmax = (np.percentile(vals, 1), np.percentile(vals, 99.5)) if vals.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for ax, (name, axis) in zip(axes, (("axial", 2), ("coronal", 1), ("sagittal", 0))):
        def cut(a, axis=axis):
            return np.rot90(np.take(a, centre[axis], axis=axis))

        ax.imshow(np.ma.masked_where(~cut(brain), cut(flair)), cmap="gray", vmin=vmin, vmax=vmax)
        ax.set_facecolor("black")
        for i, r in enumerate(REGIONS):
            for regions, style in ((gt, "solid"), (pred, "dashed")):
                sl = cut(regions[i].astype(float))
                if sl.any():
                    ax.contour(sl, levels=[0.5], colors=REGION_COLOURS[r], linestyles=style, linewidths=1.2)
        ax.set_title(name, color="white", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{title}: ground truth solid, prediction dashed (WT green, TC red, ET yellow)", color="white",
                 fontsize=9)
    return save_figure(fig, out)
