"""What an evaluation writes and prints: per-case rows as CSV, the summary as JSON, a table on the console."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .scoring import CONVENTIONS


def summarize(rows: list[dict], score_cols: list[str]) -> dict:
    """Mean, std and median over cases of every score column."""
    out = {}
    for c in score_cols:
        v = np.array([row[c] for row in rows], float)
        out[c] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}
    return out


def write_reports(out_dir: Path, split: str, rows: list[dict], columns: list[str], summary: dict) -> None:
    """``<split>.csv`` (one row per case) and ``<split>.json`` (the summary, conventions stated beside it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{split}.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out_dir / f"{split}.csv")
    tmp = out_dir / f".{split}.json.tmp"
    tmp.write_text(json.dumps({**summary, "conventions": CONVENTIONS}, indent=2) + "\n")
    tmp.replace(out_dir / f"{split}.json")


def print_table(rows: list[dict], summary: dict, regions: list[str]) -> None:
    """Legacy Dice and HD95 per case and region, then the means, lesion-wise means where computed."""
    stats = summary["scores"]
    families = [(f, p) for f, p in (("legacy", ""), ("lesion-wise", "lw_")) if f"{p}dice_{regions[0].lower()}" in stats]
    for family, p in families:
        cols = [(f"{p}dice_{r.lower()}", f"Dice {r}", ".3f") for r in regions] + \
               [(f"{p}hd95_{r.lower()}", f"HD95 {r}", ".2f") for r in regions]
        cols = [c for c in cols if c[0] in stats]
        print(f"{family}: " + ("(BraTS 2017-2021, whole region)" if not p else
                              "(BraTS 2023+ ranking: matched lesions, 374 mm per missed or spurious lesion)"))
        print(f"{'case':<24} " + " ".join(f"{h:>8}" for _, h, _ in cols))
        for r in rows:
            print(f"{r['case']:<24} " + " ".join(f"{r[k]:8{fmt}}" for k, _, fmt in cols))
        print(f"{'mean':<24} " + " ".join(f"{stats[k]['mean']:8{fmt}}" for k, _, fmt in cols))
    print(f"HD95 in mm; {summary['cases']} {summary['split']} cases scored on the {summary['grid']} grid from the "
          f"final label maps; MONAI DiceMetric mean {summary['monai_dice_mean']:.3f}; model: {summary['models']}")
