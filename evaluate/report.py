"""What an evaluation writes and prints: per-case rows as CSV, the summary as JSON, lesions as CSV, the scores
before and after postprocessing as a PNG, a table on the console."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .scoring import CONVENTIONS, REGISTRY

# the headline score of each family per region, as the figure, the gains and the run report show them
HEADLINE = {f.name: (f.headline, f.headline_name) for f in REGISTRY.values()}


def summarize(rows: list[dict], score_cols: list[str]) -> dict:
    """Mean, std and median over cases of every score column; NaN scores (the brats2025 family's 'no lesion on
    either side') are left out, and ``n`` counts the cases that have one."""
    out = {}
    for c in score_cols:
        v = np.array([row[c] for row in rows], float)
        v = v[~np.isnan(v)]
        out[c] = ({"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "n": int(v.size)}
                  if v.size else {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0})
    return out


def bootstrap_ci(diffs: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``diffs`` (N,) (per-case paired differences), ``n``
    resamples."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (n, len(diffs)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_gains(before: list[dict], after: list[dict], score_cols: list[str]) -> dict:
    """Per Dice column of each family: the mean per-case gain after - before, with its bootstrap 95% interval
    (cases whose score is NaN either way are left out)."""
    out = {}
    for c in score_cols:
        if "dice" not in c or "dice_std" in c:
            continue
        d = np.array([a[c] - b[c] for a, b in zip(after, before)], float)
        d = d[~np.isnan(d)]
        if d.size:
            lo, hi = bootstrap_ci(d)
            out[c] = {"mean_gain": float(d.mean()), "ci95": [lo, hi], "cases": int(d.size)}
    return out


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def write_reports(out_dir: Path, split: str, rows: list[dict], columns: list[str], summary: dict | None) -> None:
    """``<split>.csv`` (one row per case) and, with a summary, ``<split>.json`` (conventions stated beside it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / f"{split}.csv", rows, columns)
    if summary is not None:
        from train.runfolder import write_json

        write_json(out_dir / f"{split}.json", {**summary, "conventions": CONVENTIONS})


LESION_COLUMNS = ["case", "region", "side", "index", "volume_mm3", "status", "matches", "dice", "hd95"]


def write_lesions(path: Path, rows: list[dict]) -> None:
    """Every reference and predicted lesion of the brats2023 family: volume, hit / missed / left out / false
    positive, the lesions it hits or is hit by, and a reference lesion's Dice and HD95."""
    shown = [{**r, "volume_mm3": round(r["volume_mm3"], 3), "matches": " ".join(map(str, r["matches"])),
              "dice": "" if r["dice"] is None else r["dice"], "hd95": "" if r["hd95"] is None else r["hd95"]}
             for r in rows]
    _write_csv(path, shown, LESION_COLUMNS)


def save_score_figure(path: Path, before: list[dict], after: list[dict], families, convention: str) -> Path:
    """Per region (TC, WT, ET), each case's headline score of each family before (left) and after (right)
    postprocessing, joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = ("TC", "WT", "ET")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharey=True)
    for ax, r in zip(axes, regions):
        for k, fam in enumerate(families):
            col = HEADLINE[fam][0].format(r=r.lower())
            x = np.array([3 * k, 3 * k + 1], float)
            for b, a in zip(before, after):
                ax.plot(x, [b[col], a[col]], "-o", color=f"C{k}", alpha=0.6, ms=3)
        ax.set_xticks([3 * k + 0.5 for k in range(len(families))],
                      [HEADLINE[f][1].replace(" (sq_dsc)", "").replace(" lesion-wise", "\nlesion-wise")
                       for f in families], fontsize=7)
        ax.set_title(f"{r}: before -> after postprocessing", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("case score")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def print_table(rows: list[dict], summary: dict, regions: list[str]) -> None:
    """Each family's Dice and HD95 per case and region, then the means, and the postprocessing gains."""
    stats = summary["scores"]
    families = (("legacy", "(BraTS 2017-2021, whole region)", [("dice_{r}", "Dice"), ("hd95_{r}", "HD95")]),
                ("brats2023", "(BraTS 2023 lesion-wise: merged by dilation, small lesions left out)",
                 [("brats2023_dice_{r}", "Dice"), ("brats2023_hd95_{r}", "HD95")]),
                ("brats2025", "(BraTS 2024-25 on panoptica: lesion-wise Dice of matched lesions, detection F1)",
                 [("brats2025_lw_dice_{r}", "lwDice"), ("brats2025_f1_{r}", "F1")]))
    for family, note, kinds in families:
        cols = [(k.format(r=r.lower()), f"{h} {r}") for k, h in kinds for r in regions]
        cols = [c for c in cols if c[0] in stats]
        if not cols:
            continue
        print(f"{family}: {note}")
        print(f"{'case':<24} " + " ".join(f"{h:>9}" for _, h in cols))
        for row in rows:
            print(f"{row['case']:<24} " + " ".join(f"{row[k]:9.3f}" for k, _ in cols))
        print(f"{'mean':<24} " + " ".join(f"{stats[k]['mean']:9.3f}" for k, _ in cols))
    print(f"HD95 in mm; {summary['cases']} {summary['split']} cases scored on the {summary['grid']} grid from the "
          f"final label maps; MONAI DiceMetric mean {summary['monai_dice_mean']:.3f}; model: {summary['models']}")
    print("postprocessing: " + "; ".join(summary["postprocessing"]))
    for col, g in summary.get("postprocessing_gain", {}).items():
        if col.startswith("brats2023_dice") or col.startswith("dice_"):
            print(f"  {col}: {g['mean_gain']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}] over {g['cases']} cases")
