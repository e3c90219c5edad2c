"""Architectures compared at equal wall time: each with its recommended recipe (and the seed's UNet with the
seed's), several seeds, every run trained for the same ``--time-limit`` on one cohort (the modalities
experiment's generator and seed, all four modalities) and scored on its test cases.

Reported: test Dice and HD95 (legacy) and brats2023 lesion-wise Dice per region, mean and std over seeds, paired
per-case differences against the seed's UNet with bootstrap 95% intervals, samples/s and peak memory of each
training process, parameter counts, and validation mean Dice against wall seconds (PNG).

The cohort is at 2 mm (SwinUNETR needs patches of 64 voxels a side, and cases at least that large), so every
architecture trains on 64^3 patches. It is the synthetic generator's default, confounders on.

``python -m benchmarks augment-dice`` runs two arms of it: the seed's UNet with the seed's augmentation against the
same UNet and recipe with ``--augmentation nnunet`` (written as augment-dice.json, .md and .png).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from evaluate.report import bootstrap_ci
from store.conventions import REGIONS
from train.runfolder import eval_dir, read_metrics

from .report import save_png, write_result

ARMS = {
    "unet (seed recipe)": ["--model", "unet", "--channels", "16", "32", "64", "128", "--lr", "3e-3"],
    "segresnet": ["--model", "segresnet", "--channels", "16", "32", "64", "128", "--loss", "dice", "--schedule",
                  "cosine", "--lr", "3e-3"],
    "dynunet": ["--model", "dynunet", "--channels", "16", "32", "64", "128", "256", "--deep-supervision", "--loss",
                "dicece", "--optimizer", "sgd", "--schedule", "poly", "--lr", "1e-2"],
    "swinunetr": ["--model", "swinunetr", "--channels", "12", "--loss", "dicece", "--schedule", "cosine", "--lr",
                  "1e-3"],
}
NNUNET_AUG = "unet, nnU-Net augmentation"
ARMS[NNUNET_AUG] = [*ARMS["unet (seed recipe)"], "--augmentation", "nnunet"]
BASELINE = "unet (seed recipe)"
ARCHITECTURES = ("unet (seed recipe)", "segresnet", "dynunet", "swinunetr")  # python -m benchmarks models
AUGMENTATIONS = ("unet (seed recipe)", NNUNET_AUG)  # python -m benchmarks augment-dice
SCALES = {  # grid, cases, minutes per run, seeds
    "tiny": ((40, 40, 28), 6, 0.05, (0,)),  # the tests' (with 16^3 patches)
    "quick": ((120, 120, 78), 8, 0.15, (0,)),
    "full": ((120, 120, 78), 120, 3.0, (0, 1, 2)),
}


def make_cohort(work: Path, shape, n: int) -> tuple[Path, tuple]:
    """The benchmark cohort (the modalities experiment's generator and seed) under ``work/raw``, written once;
    returns the folder and the spacing that keeps the field of view."""
    from prep.synth import FOV_MM, SynthConfig, synth_cohort

    raw = work / "raw"
    if not raw.is_dir() or sum(1 for p in raw.iterdir() if p.is_dir()) < n:
        # the same bytes whatever the number of processes
        synth_cohort(SynthConfig(out=raw, cases=n, seed=2024, shape=shape, workers=min(8, os.cpu_count() or 1)),
                     progress=False)
    from .report import cohort_record

    cohort_record(raw)
    return raw, tuple(f / s for f, s in zip(FOV_MM, shape))


def _train(arm: str, args: list[str], store: Path, run_dir: Path, seed: int, minutes: float, log: Path,
           patch: int = 64) -> dict:
    """One training process; returns its peak resident memory (from the kernel's accounting of that child)."""
    cmd = [sys.executable, "-m", "train", "--store", str(store), "--run-dir", str(run_dir), "--modalities", "t1",
           "t1ce", "t2", "flair", "--patch-size", *[str(patch)] * 3, "--batch-size", "2", "--epochs", "100000",
           "--steps-per-epoch", "10", "--val-every", "3", "--max-val-cases", "4", "--patience", "100000",
           "--workers", "1", "--seed", str(seed), "--time-limit", f"{minutes:g}", "--overwrite", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"training {arm} seed {seed} failed (exit {proc.returncode}); see {log}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024}


def _summarize_arms(arms: dict) -> None:
    """Each arm's test means and std over its seeds' runs, mean Dice, median samples/s and peak memory, in place."""
    cols = [f"{m}_{r.lower()}" for m in ("dice", "hd95", "brats2023_dice") for r in REGIONS]
    for a in arms.values():
        per_seed = {c: [r["test"][c] for r in a["runs"]] for c in cols}
        a["mean"] = {c: float(np.mean(v)) for c, v in per_seed.items()}
        a["std_over_seeds"] = {c: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for c, v in per_seed.items()}
        a["mean_dice"] = float(np.mean([a["mean"][f"dice_{r.lower()}"] for r in REGIONS]))
        a["samples_per_s"] = float(np.median([r["samples_per_s"] for r in a["runs"]]))
        a["peak_rss_mb"] = float(max(r["peak_rss_mb"] for r in a["runs"]))


def _paired_vs_baseline(arms: dict, per_case: dict, seeds, test_ids, metric: str = "dice") -> dict:
    """Per arm other than the seed's UNet, per region and their mean: the mean per-case difference of the
    seed-averaged ``metric`` (legacy ``dice`` or ``brats2023_dice``) against the seed's UNet, with its 95% bootstrap
    interval."""

    def case_mean(arm, case, keys):
        return np.mean([np.mean([float(per_case[arm][s][case][k]) for k in keys]) for s in seeds])

    paired = {}
    for arm in arms:
        if arm == BASELINE:
            continue
        paired[arm] = {}
        for name, keys in [*((r, [f"{metric}_{r.lower()}"]) for r in REGIONS),
                           ("mean", [f"{metric}_{r.lower()}" for r in REGIONS])]:
            d = np.array([case_mean(arm, c, keys) - case_mean(BASELINE, c, keys) for c in test_ids])
            lo, hi = bootstrap_ci(d)
            paired[arm][name] = {"mean_difference": float(d.mean()), "ci95": [lo, hi],
                                 "excludes_zero": bool(lo > 0 or hi < 0)}
    return paired


def _store(work: Path, shape, n: int) -> tuple[Path, tuple, list[str]]:
    """The benchmark cohort built into ``work/store.zarr`` once; (store, spacing mm, test case ids)."""
    from prep.build import BuildConfig, build_store
    from store import open_store

    raw, spacing = make_cohort(work, shape, n)
    store = work / "store.zarr"
    if not (store / "zarr.json").exists():
        rep = build_store(BuildConfig(source=str(raw), store=str(store), workers=2, spacing=spacing), progress=False)
        if not rep.ok:
            raise RuntimeError(f"store build failed: {rep.failed}")
    return store, spacing, open_store(store).splits["test"]


def _one_run(arm: str, store: Path, work: Path, seed: int, minutes: float, patch: int):
    """One arm's run with one seed, trained and scored on the test split: (its record, its per-case rows, its
    validation curve)."""
    from evaluate.evaluation import evaluate_split

    run_dir = work / f"run-{arm.split()[0].strip(',')}{'-nnaug' if arm == NNUNET_AUG else ''}-seed{seed}"
    mem = _train(arm, ARMS[arm], store, run_dir, seed, minutes, work / f"{run_dir.name}.log", patch)
    records = read_metrics(run_dir)
    summary = evaluate_split(str(run_dir), str(store), "test", progress=False, metrics=("legacy", "brats2023"),
                             postprocessing=False)
    with open(eval_dir(run_dir) / "test.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    print(f"models: {arm} seed {seed}: {len(records)} epochs in {records[-1]['wall_s']:.0f} s, test Dice "
          + ", ".join(f"{r} {summary['scores'][f'dice_{r.lower()}']['mean']:.3f}" for r in REGIONS))
    record = {"seed": seed, **mem, "epochs": len(records), "wall_s": records[-1]["wall_s"],
              "samples_per_s": float(np.median([r["samples_per_s"] for r in records])),
              "test": {k: v["mean"] for k, v in summary["scores"].items()}}
    return record, rows, [(r["wall_s"], r["dice_mean"]) for r in records if "dice_mean" in r]


def run(out_dir: Path, work: Path, size: str = "full", seeds: tuple[int, ...] | None = None,
        minutes: float | None = None, arm_names=ARCHITECTURES, name: str = "models") -> dict:
    from train.models import build, parameter_count
    from train.options import build_parser, config_from_args

    scale = size
    patch = 16 if scale == "tiny" else 64
    shape, n, scale_minutes, scale_seeds = SCALES[scale]
    seeds, minutes = seeds or scale_seeds, minutes or scale_minutes
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store, spacing, test_ids = _store(work, shape, n)
    arms: dict[str, dict] = {}
    per_case: dict[str, dict[int, dict]] = {}
    curves: dict[str, list] = {}
    for arm in arm_names:
        args = ARMS[arm]
        cfg = config_from_args(build_parser().parse_args(["--modalities", "t1", "t1ce", "t2", "flair", *args]))
        arms[arm] = {"flags": " ".join(args), "parameters": parameter_count(build(cfg)), "runs": []}
        per_case[arm], curves[arm] = {}, []
        for seed in seeds:
            record, per_case[arm][seed], curve = _one_run(arm, store, work, seed, minutes, patch)
            arms[arm]["runs"].append(record)
            curves[arm].append(curve)
    _summarize_arms(arms)
    paired = _paired_vs_baseline(arms, per_case, seeds, test_ids)
    paired_2023 = _paired_vs_baseline(arms, per_case, seeds, test_ids, "brats2023_dice")
    command = f"python -m benchmarks {name}" + ("" if scale == "full" else f" --size {scale}") + (
        f" --seeds {' '.join(map(str, seeds))}" if tuple(seeds) != scale_seeds else "")
    table = _table(arms, paired, paired_2023, len(seeds), len(test_ids), minutes)
    payload = {"scale": scale, "command": command, "minutes_per_run": minutes,
               "cohort": {"cases": n, "shape": list(shape), "spacing_mm": list(spacing), "seed": 2024,
                          "test_cases": len(test_ids), "confounders": _confounders()},
               "training": f"{patch}^3 patches, batch 2, 10 steps per epoch, validation every 3 epochs on 4 cases, "
                           "all four modalities, one process with 1 loader thread",
               "arms": arms, "paired_dice_vs_seed_unet": paired, "paired_brats2023_dice_vs_seed_unet": paired_2023,
               "curves": curves, "table_markdown": table,
               "seconds": time.perf_counter() - t0,
               "conventions": "dice/hd95: legacy BraTS per region on the source grid; brats2023_dice: the BraTS "
                              "2023 lesion-wise scorer; no postprocessing; paired: per-case differences of the "
                              "seed-averaged Dice against the seed's UNet, 95% bootstrap interval over the test "
                              "cases; peak memory: the training process's maximum resident set"}
    write_result(out_dir, name, payload)
    (Path(out_dir) / f"{name}.md").write_text(
        f"`{command}`: {n} synthetic cases at {spacing[0]:.1f} mm, {len(test_ids)} test cases, every run trained "
        f"for {minutes:g} min of wall time (seeds {', '.join(map(str, seeds))}); mean +- std over seeds.\n\n"
        f"{table}\n")
    _figure(Path(out_dir) / f"{name}.png", curves, minutes)
    print(table)
    return payload


def _confounders() -> bool:
    from prep.synth import SynthConfig

    return SynthConfig(out=Path(".")).confounders


def _table(arms: dict, paired: dict, paired_2023: dict, n_seeds: int, n_cases: int, minutes: float) -> str:
    lines = ["| arm | parameters | samples/s | peak memory | " + " | ".join(f"Dice {r}" for r in REGIONS)
             + " | mean Dice | " + " | ".join(f"brats2023 Dice {r}" for r in REGIONS) + " |",
             "|---|" + "---|" * 10]
    for arm, a in arms.items():
        m, s = a["mean"], a["std_over_seeds"]
        lines.append(f"| {arm} | {a['parameters'] / 1e6:.2f} M | {a['samples_per_s']:.2f} | {a['peak_rss_mb']:.0f} MB"
                     " | " + " | ".join(f"{m[f'dice_{r.lower()}']:.3f} +- {s[f'dice_{r.lower()}']:.3f}"
                                        for r in REGIONS)
                     + f" | {a['mean_dice']:.3f} | "
                     + " | ".join(f"{m[f'brats2023_dice_{r.lower()}']:.3f}" for r in REGIONS) + " |")
    lines += ["", f"Paired Dice differences against the seed's UNet over the {n_cases} test cases (each case averaged "
                  f"over {n_seeds} seeds), {minutes:g} min of training each, mean [95% bootstrap interval]:", "",
              "| arm | Dice | TC | WT | ET | mean |", "|---|---|---|---|---|---|"]
    for family, table in (("legacy", paired), ("brats2023", paired_2023)):
        for arm, per in table.items():
            lines.append(f"| {arm} | {family} | " + " | ".join(
                f"{v['mean_difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for v in per.values())
                + " |")
    return "\n".join(lines)


def _figure(path: Path, curves: dict, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (arm, runs) in enumerate(curves.items()):
        for i, pts in enumerate(runs):
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "-o", ms=3, color=f"C{k}", alpha=0.8, label=arm if i == 0 else None)
    ax.set_xlabel("wall seconds since the start of training")
    ax.set_ylabel("validation mean Dice (TC, WT, ET)")
    ax.set_title(f"validation Dice against time, {minutes:g} min per run (one line per seed)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    save_png(fig, path)
