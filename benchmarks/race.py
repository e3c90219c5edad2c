"""The race's arithmetic and its pictures: where our points stand against nnU-Net's wall time, when our curve
reaches nnU-Net's Dice, nnU-Net's own per-epoch log, the table and the PNG of ``python -m benchmarks nnunet``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from store.conventions import REGIONS

SHARES = {"W/4": 0.25, "W/2": 0.5, "W": 1.0}  # our points, as shares of nnU-Net's whole wall time W


def grid_for(spacing_mm: float, fov_mm) -> tuple[int, ...]:
    """The cohort's grid at ``spacing_mm``: the field of view in whole voxels (240 x 240 x 155 mm at 4 mm: 60 x 60 x
    39)."""
    if spacing_mm <= 0:
        raise ValueError(f"--spacing must be a positive number of millimetres, not {spacing_mm:g}")
    return tuple(max(1, round(f / spacing_mm)) for f in fov_mm)


def patch_for(shape) -> int:
    """Our patch side for a cohort grid: a multiple of 16 (the UNet's four levels) within about 85% of the
    smallest side (the brain's crop), 16 to 64 voxels: 64 at 2 mm and finer, 32 at 4 mm."""
    return 16 * max(1, min(4, int(0.85 * min(shape)) // 16))


def time_to_reach(points: list[tuple[float, float]], target: float) -> dict:
    """When the curve ``points`` ((whole wall seconds, mean Dice), in time order) first reaches ``target``: linear
    between the two points around the crossing; by the first point when it already reaches it (an upper bound,
    nothing earlier was measured); None when no point does."""
    for i, (t, d) in enumerate(points):
        if d >= target:
            if i == 0:
                return {"seconds": t, "how": "by our first point (an upper bound)"}
            (t0, d0) = points[i - 1]
            return {"seconds": t0 + (target - d0) / (d - d0) * (t - t0), "how": "interpolated between our points"}
    return {"seconds": None, "how": "not reached"}


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def nnunet_epochs(fold_dir: Path) -> list[dict]:
    """nnU-Net's own training log (``training_log_*.txt`` in its fold folder): per epoch, its pseudo-Dice per label
    (on the validation patches it draws), their mean and the epoch's seconds."""
    logs = sorted(Path(fold_dir).glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    epochs: list[dict] = []
    for line in logs[-1].read_text().splitlines() if logs else ():
        text = line.split(": ", 1)[-1]
        if text.startswith("Pseudo dice"):
            values = [float(v) for v in _NUMBER.findall(re.sub(r"np\.float\d+\(", "", text[len("Pseudo dice"):]))]
            epochs.append({"epoch": len(epochs), "pseudo_dice": values,
                           "mean_pseudo_dice": float(np.mean(values)) if values else None})
        elif text.startswith("Epoch time:") and epochs:
            epochs[-1]["epoch_s"] = float(_NUMBER.findall(text)[0])
    return epochs


def plot(path: Path, theirs_point: tuple[float, float], ours: list[tuple[float, float]], title: str,
         labels: list[str]) -> Path:
    """Test mean Dice against whole wall minutes: our points joined (labelled W/4, W/2, W), nnU-Net's point, and
    nnU-Net's Dice as a dotted level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_png

    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    xs, ys = [t / 60 for t, _ in ours], [d for _, d in ours]
    ax.plot(xs, ys, "o-", color="#4c72b0", label="ours (build + train + predict)")
    for x, y, name in zip(xs, ys, labels):
        ax.annotate(name, (x, y), xytext=(4, -12), textcoords="offset points", fontsize=8)
    ax.plot([theirs_point[0] / 60], [theirs_point[1]], "s", color="#dd8452", markersize=8,
            label="nnU-Net v2 (plan + train + predict)")
    ax.axhline(theirs_point[1], color="#dd8452", linestyle=":", linewidth=1)
    ax.set_xlabel("wall minutes, whole pipeline")
    ax.set_ylabel("test mean Dice (TC, WT, ET)")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return save_png(fig, path)


def table(means: dict, theirs: dict, ours: dict, paired: dict, arm: str) -> str:
    """The race's table: each system's and point's whole wall time (its parts), Dice per region, means, HD95 and
    the paired difference of the mean Dice against nnU-Net."""
    w = theirs["wall_s"]
    lines = ["| system | wall time (preprocess + train + predict) | " + " | ".join(f"Dice {r}" for r in REGIONS)
             + " | mean Dice | mean brats2023 Dice | mean HD95 | vs nnU-Net (mean Dice) |", "|---|---|" + "---|" * 7]

    def row(name, walls, m, p):
        hd = np.mean([m[f"hd95_{r.lower()}"] for r in REGIONS])
        vs = f"{p['mean_difference']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p else "-"
        return (f"| {name} | {walls} | " + " | ".join(f"{m[f'dice_{r.lower()}']:.3f}" for r in REGIONS)
                + f" | {m['mean_dice']:.3f} | {m['mean_brats2023_dice']:.3f} | {hd:.1f} mm | {vs} |")

    lines.append(row(f"nnU-Net v2 {theirs['version']} 3d_fullres, {theirs['trainer']}",
                     f"{w['plan_and_preprocess_s']:.0f} + {w['train_s']:.0f} + {w['predict_s']:.0f} = "
                     f"{w['total_s']:.0f} s", means["nnU-Net"], None))
    for name, o in ours.items():
        ow = o["wall_s"]
        lines.append(row(f"ours ({arm}) at {name}", f"{ow['build_store_s']:.0f} + {ow['train_s']:.0f} + "
                         f"{ow['predict_s']:.0f} = {ow['total_s']:.0f} s", means[f"ours at {name}"],
                         paired[f"ours at {name}"]))
    return "\n".join(lines)
