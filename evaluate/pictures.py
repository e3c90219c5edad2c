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


def curves_figure(histories: dict[str, list[dict]]) -> bytes:
    """PNG bytes of a run's curves, one line per model (a k-fold run's folds): training and validation loss,
    validation Dice per region, the learning rate, seconds per epoch and the share of it spent waiting for data;
    ``histories`` maps a model's name to its metrics.jsonl records."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    (loss, dice, lr), (secs, wait, spare) = axes
    spare.set_axis_off()
    styles = ("solid", "dashed", "dotted", "dashdot")
    for k, (name, recs) in enumerate(histories.items()):
        style, tag = styles[k % len(styles)], ("" if len(histories) == 1 else f"{name} ")
        ep = [r["epoch"] for r in recs]
        loss.plot(ep, [r["train_loss"] for r in recs], "C0", ls=style, label=f"{tag}train")
        val = [r for r in recs if "val_loss" in r]
        if val:
            loss.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "C1", ls=style, marker="o", ms=3,
                      label=f"{tag}validation")
        for i, region in enumerate(REGIONS):
            pts = [(r["epoch"], r["dice"][region]) for r in recs if region in r.get("dice", {})]
            if pts:
                dice.plot(*zip(*pts), color=REGION_COLOURS[region] if region != "ET" else "#b8860b", ls=style,
                          marker="o", ms=3, label=f"{tag}{region}" if k == 0 or i == 0 else None)
        lr.plot(ep, [r["lr"] for r in recs], "C2", ls=style, label=tag.strip() or None)
        secs.plot(ep, [r["seconds"] for r in recs], "C3", ls=style, label=tag.strip() or None)
        wait.plot(ep, [100 * r.get("data_wait_share", float("nan")) for r in recs], "C4", ls=style,
                  label=tag.strip() or None)
    for ax, title, ylabel in ((loss, "loss", "loss"), (dice, "validation Dice per region", "Dice"),
                              (lr, "learning rate", "lr"), (secs, "time per epoch", "s"),
                              (wait, "data wait (share of the step)", "%")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    dice.set_ylim(0, 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return buf.getvalue()
