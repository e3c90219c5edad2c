"""Writing benchmark results: JSON beside a PNG bar chart (median bars, min-max whiskers)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from train.runfolder import write_json

from .machine import machine_info


def summarize(values: list[float]) -> dict:
    """Median, min, max and count of ``values`` (seconds or rates, as measured)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


INVOCATION: dict = {"command": None}  # the command line the results come from, set by ``python -m benchmarks``
COHORTS: dict[str, dict] = {}  # every synthetic cohort a benchmark used in this process, by folder


def cohort_record(folder: str | Path) -> dict:
    """The synthetic cohort in ``folder`` as its ``synth.json`` describes it (generator version, seed, cases,
    grid, confounders), remembered for every result this process writes; a folder without one says so."""
    from prep.synth.generator import MANIFEST

    path = Path(folder) / MANIFEST
    record = {"folder": str(folder), **(json.loads(path.read_text()) if path.exists() else
                                         {"manifest": f"no {MANIFEST}: made before cohorts recorded their settings"})}
    COHORTS[str(folder)] = record
    return record


def write_result(out_dir: str | Path, name: str, payload: dict) -> Path:
    """Write ``<out_dir>/<name>.json`` with the machine, the command and the synthetic cohorts used recorded
    beside the figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), "command": INVOCATION["command"],
               "synthetic_cohorts": [{k: v for k, v in c.items() if k != "folder"} for c in COHORTS.values()],
               **payload}
    return write_json(out_dir / f"{name}.json", payload)


def bar_chart(path: str | Path, title: str, unit: str, bars: dict[str, dict], log: bool | None = None) -> Path:
    """Bars of medians with min-max whiskers; log scale where the largest and smallest differ by >20x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bars)
    med = [bars[n]["median"] for n in names]
    # whiskers from the smallest to the largest repeat (a rate made from times arrives with min/max swapped)
    lo = [max(0.0, bars[n]["median"] - min(bars[n]["min"], bars[n]["max"])) for n in names]
    hi = [max(0.0, max(bars[n]["min"], bars[n]["max"]) - bars[n]["median"]) for n in names]
    positive = [m for m in med if m > 0]
    if log is None:
        log = bool(positive) and max(positive) / min(positive) > 20
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 2), 3.6))
    ax.bar(names, med, yerr=[lo, hi], capsize=4, color="#4c72b0")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    for i, m in enumerate(med):
        ax.annotate(f"{m:.3g}", (i, m), ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                    textcoords="offset points")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    return save_png(fig, path)


def save_png(fig, path) -> Path:
    """Lay out, write (folders made as needed) and free a benchmark figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
