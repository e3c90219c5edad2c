"""The seed's experiment with error bars: what the extra modalities buy, T1 vs T1+T2+FLAIR vs T1+T1ce+T2+FLAIR.

Every arm is trained under one budget with several seeds and evaluated on the same test split (at least 12
cases at the default scale). Reported: mean and standard deviation over seeds of the test Dice and HD95 per
region (legacy and the two lesion-wise families), and paired comparisons between arms per region: the per-case
differences (each case's score averaged over the seeds) with a bootstrap 95% interval over cases. Every run's
postprocessing is tuned on its validation cases (brats2023 objective) and applied; the brats2023 lesion-wise and
legacy Dice before and after it are reported, with the paired bootstrap interval of the gain.

Reduced scale by default (2.5 mm cases, 48^3 patches, the demo's recipe: 400 steps, lr 3e-3, a four-level UNet),
so that it fits 2 CPU cores in under an hour; ``--full``
is the same experiment at 1 mm with 128^3 patches, for a GPU.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from evaluate.report import bootstrap_ci
from train.runfolder import eval_dir

from .report import save_png, write_result

ARMS = {"T1": ("t1",), "T1+T2+FLAIR": ("t1", "t2", "flair"), "T1+T1ce+T2+FLAIR": ("t1", "t1ce", "t2", "flair")}
COMPARISONS = (("T1+T2+FLAIR", "T1"), ("T1+T1ce+T2+FLAIR", "T1+T2+FLAIR"), ("T1+T1ce+T2+FLAIR", "T1"))
SCALES = {
    # shape, cases, patch, epochs, steps per epoch, seeds, UNet channels
    "quick": ((48, 48, 31), 12, (16, 16, 16), 2, 2, (0, 1), (8, 16, 32)),
    "reduced": ((96, 96, 62), 120, (48, 48, 48), 40, 10, (0, 1, 2), (16, 32, 64, 128)),  # the demo's recipe
    "full": ((240, 240, 155), 120, (128, 128, 128), 60, 50, (0, 1, 2), (16, 32, 64, 128, 256)),
}


def _rows(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {r["case"]: {k: float(v) for k, v in r.items() if k not in ("case", "grid", "task")}
                for r in csv.DictReader(f)}


def _postprocessing_gains(before: dict, after: dict, test_ids, seeds, regions) -> dict:
    """Per arm: brats2023 lesion-wise and legacy Dice before and after postprocessing (each case averaged over the
    seeds; 'mean' = the mean over the regions), the mean gain and its bootstrap 95% interval over the cases."""
    out = {}
    for arm in after:
        out[arm] = {}
        for fam, col in (("brats2023", "brats2023_dice_{r}"), ("legacy", "dice_{r}")):
            def case_means(rows, keys):
                return np.array([np.mean([np.mean([rows[s][c][k] for k in keys]) for s in seeds]) for c in test_ids])

            for name, keys in [*((r, [col.format(r=r.lower())]) for r in regions),
                               ("mean", [col.format(r=r.lower()) for r in regions])]:
                b, a = case_means(before[arm], keys), case_means(after[arm], keys)
                lo, hi = bootstrap_ci(a - b)
                out[arm][f"{fam} {name}"] = {"before": float(b.mean()), "after": float(a.mean()),
                                             "mean_gain": float((a - b).mean()), "ci95": [lo, hi]}
    return out


def _false_positives(before: dict, test_ids, seeds) -> dict:
    """Per arm, before postprocessing: the brats2023 scorer's false-positive components (predicted lesions matching
    no reference lesion) per test case and region, mean over cases and seeds, and the share of test cases with one
    in ET or WT (in any seed's prediction)."""
    from evaluate import brats2023

    out = {}
    for arm, rows in before.items():
        fp = {r: float(np.mean([rows[s][c][f"brats2023_fp_{r.lower()}"] for s in seeds for c in test_ids]))
              for r in brats2023.REGIONS}
        with_one = [any(rows[s][c]["brats2023_fp_et"] + rows[s][c]["brats2023_fp_wt"] > 0 for s in seeds)
                    for c in test_ids]
        out[arm] = {"per_case": fp, "cases_with_one_in_et_or_wt": float(np.mean(with_one))}
    return out


def _cohort(work: Path, n: int, shape, spacing) -> tuple[Path, list[str]]:
    """The experiment's synthetic cohort (seed 2024) built into ``work/store.zarr``; (store, test case ids)."""
    from prep.build import BuildConfig, build_store
    from prep.synth import SynthConfig, synth_cohort
    from store import open_store

    work.mkdir(parents=True, exist_ok=True)
    synth_cohort(SynthConfig(out=work / "raw", cases=n, seed=2024, shape=shape, workers=2), progress=False)
    from .report import cohort_record

    cohort_record(work / "raw")
    store = work / "store.zarr"
    rep = build_store(BuildConfig(source=str(work / "raw"), store=str(store), workers=2, spacing=spacing),
                      progress=False)
    if not rep.ok:
        raise RuntimeError(f"store build failed: {rep.failed}")
    return store, open_store(store).splits["test"]


def _arm_summaries(per_case: dict, seconds: dict, rules: dict, seeds, test_ids) -> dict:
    """Per arm: each metric's mean over the test cases per seed, its mean and std over seeds, training seconds and
    the postprocessing each seed's run learned."""
    from store.conventions import REGIONS

    metrics = [f"{m}_{r.lower()}" for m in ("dice", "hd95", "brats2023_dice", "brats2023_hd95", "brats2025_lw_dice")
               for r in REGIONS]
    arms = {}
    for arm in ARMS:
        per_seed = {m: [float(np.nanmean([per_case[arm][s][c][m] for c in test_ids])) for s in seeds]
                    for m in metrics}
        arms[arm] = {"modalities": list(ARMS[arm]), "train_seconds": seconds[arm], "postprocessing": rules[arm],
                     "mean": {m: float(np.mean(v)) for m, v in per_seed.items()},
                     "std_over_seeds": {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                                        for m, v in per_seed.items()},
                     "per_seed": per_seed}
    return arms


def _paired_dice(per_case: dict, seeds, test_ids) -> dict:
    """Per comparison and region: the mean per-case difference of the seed-averaged legacy Dice, with its 95%
    bootstrap interval."""
    from store.conventions import REGIONS

    paired = {}
    for a, b in COMPARISONS:
        paired[f"{a} - {b}"] = {}
        for r in REGIONS:
            m = f"dice_{r.lower()}"
            d = np.array([np.mean([per_case[a][s][c][m] for s in seeds]) - np.mean([per_case[b][s][c][m]
                                                                                    for s in seeds])
                          for c in test_ids])
            lo, hi = bootstrap_ci(d)
            paired[f"{a} - {b}"][r] = {"mean_difference": float(d.mean()), "ci95": [lo, hi],
                                       "excludes_zero": bool(lo > 0 or hi < 0)}
    return paired


def _command(scale: str, amp: bool, seeds, epochs: int) -> str:
    """The ``python -m benchmarks modalities`` command that reproduces a run of this scale and these flags."""
    flags = [" --quick" if scale == "quick" else " --full" if scale == "full" else "", " --amp" if amp else "",
             f" --seeds {' '.join(map(str, seeds))}" if tuple(seeds) != SCALES[scale][5] else "",
             f" --epochs {epochs}" if epochs != SCALES[scale][3] else ""]
    return "python -m benchmarks modalities" + "".join(flags)


def run(out_dir: Path, work: Path, quick: bool = False, full: bool = False, epochs: int | None = None,
        cases: int | None = None, seeds: tuple[int, ...] | None = None, amp: bool = False) -> dict:
    from evaluate.evaluation import evaluate_split
    from prep.synth import FOV_MM
    from store.conventions import REGIONS
    from train.config import TrainConfig
    from train.experiment import run as train_run

    scale = "quick" if quick else "full" if full else "reduced"
    shape, n, patch, ep, steps, scale_seeds, channels = SCALES[scale]
    n, ep, seeds = cases or n, epochs or ep, seeds or scale_seeds
    spacing = tuple(f / s for f, s in zip(FOV_MM, shape))
    t0 = time.perf_counter()
    store, test_ids = _cohort(work, n, shape, spacing)
    base = TrainConfig(store=str(store), epochs=ep, patience=ep, val_every=ep, patch_size=patch, batch_size=2,
                       lr=3e-3, cache="ram", workers=1, channels=channels, amp=amp, device="auto",
                       steps_per_epoch=steps, max_val_cases=4)
    per_case: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}  # arm -> seed -> case -> scores
    unprocessed: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}  # the same before postprocessing
    rules: dict[str, dict[int, list]] = {arm: {} for arm in ARMS}
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for arm, mods in ARMS.items():
        for seed in seeds:
            run_dir = work / f"run-{arm.replace('+', '-')}-seed{seed}"
            cfg = replace(base, modalities=mods, seed=seed, run_dir=str(run_dir), overwrite=True)
            t = time.perf_counter()
            train_run(cfg)
            seconds[arm].append(time.perf_counter() - t)
            rules[arm][seed] = _tuned(run_dir, store)
            evaluate_split(str(run_dir), str(store), "test", progress=False)
            per_case[arm][seed] = _rows(eval_dir(run_dir) / "test.csv")
            raw = eval_dir(run_dir) / "test-before-postprocessing.csv"  # written only when a rule is in force
            unprocessed[arm][seed] = _rows(raw) if raw.exists() else per_case[arm][seed]
            print(f"modalities: {arm} seed {seed} done ({seconds[arm][-1]:.0f} s training)")
    arms = _arm_summaries(per_case, seconds, rules, seeds, test_ids)
    paired = _paired_dice(per_case, seeds, test_ids)
    gains = _postprocessing_gains(unprocessed, per_case, test_ids, seeds, REGIONS)
    false_positives = _false_positives(unprocessed, test_ids, seeds)
    table = _table(arms, paired, REGIONS, len(seeds), len(test_ids), gains, false_positives)
    payload = {"scale": scale, "cohort": {"cases": n, "shape": list(shape), "spacing_mm": list(spacing),
                                         "seed": 2024, "test_cases": len(test_ids)},
               "budget": {"epochs": ep, "steps_per_epoch": steps, "patch": list(patch), "batch_size": 2,
                          "lr": base.lr, "channels": list(channels), "seeds": list(seeds)},
               "arms": arms, "paired_dice": paired, "postprocessing_gains": gains,
               "false_positive_components_before_postprocessing": false_positives, "table_markdown": table,
               "seconds": time.perf_counter() - t0,
               "conventions": "dice/hd95: legacy BraTS per region on the source grid; brats2023_: the BraTS 2023 "
                              "lesion-wise scorer (gli: dilation 3, 50 mm^3); brats2025_lw_dice: the 2024-25 "
                              "scorer's mean Dice of matched lesions (sq_dsc); all after each run's postprocessing; "
                              "paired: per-case differences of the seed-averaged Dice, 95% percentile bootstrap "
                              "interval over the test cases (10,000 resamples)"}
    write_result(out_dir, "modalities", payload)
    command = _command(scale, amp, seeds, ep)  # what reproduces these figures
    (Path(out_dir) / "modalities.md").write_text(
        f"`{command}`: {n} synthetic cases at {spacing[0]:.1f} mm, "
        f"{len(test_ids)} test cases, each arm trained with seeds {', '.join(map(str, seeds))} for {ep} epochs x "
        f"{steps} steps (patch {patch[0]}^3, batch 2, lr {base.lr:g}); mean +- std over seeds.\n\n{table}\n")
    _figure(Path(out_dir) / "modalities.png", arms, REGIONS, seeds)
    print(table)
    print(json.dumps({"seconds": round(payload["seconds"])}))
    return payload


def _tuned(run_dir: Path, store: Path) -> list[str]:
    """The run's postprocessing tuned on its validation cases: the rules kept (none where too few cases)."""
    from evaluate.tuning import TooFewCases, tune_postprocessing

    try:
        return tune_postprocessing(str(run_dir), "brats2023", str(store), progress=False)["rules"]
    except TooFewCases as e:
        print(f"modalities: {run_dir.name}: {e}")
        return []


def _table(arms: dict, paired: dict, regions, n_seeds: int, n_cases: int, gains: dict, false_positives: dict) -> str:
    lines = ["| inputs | " + " | ".join(f"Dice {r}" for r in regions) + " | "
             + " | ".join(f"HD95 {r} mm" for r in regions) + " | " + " | ".join(f"brats2023 Dice {r}"
                                                                              for r in regions) + " |",
             "|---|" + "---|" * (3 * len(regions))]
    for arm, a in arms.items():
        def cell(key, fmt, m=a["mean"], s=a["std_over_seeds"]):
            return f"{m[key]:{fmt}} +- {s[key]:{fmt}}"

        lines.append(f"| {arm} | " + " | ".join(cell(f"dice_{r.lower()}", ".3f") for r in regions) + " | "
                     + " | ".join(cell(f"hd95_{r.lower()}", ".1f") for r in regions) + " | "
                     + " | ".join(cell(f"brats2023_dice_{r.lower()}", ".3f") for r in regions) + " |")
    lines += ["", f"Paired Dice differences over the {n_cases} test cases (each case averaged over {n_seeds} seeds), "
                  "mean [95% bootstrap interval]:", "",
              "| comparison | " + " | ".join(regions) + " |", "|---|" + "---|" * len(regions)]
    for name, per_region in paired.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{v['mean_difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for v in per_region.values())
            + " |")
    names = list(next(iter(gains.values())))
    lines += ["", f"Postprocessing tuned on each run's validation cases (brats2023 objective): Dice before -> after, "
                  f"gain [95% bootstrap interval] over the {n_cases} test cases:", "",
              "| inputs | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for arm, per in gains.items():
        lines.append(f"| {arm} | " + " | ".join(
            f"{g['before']:.3f} -> {g['after']:.3f}, {g['mean_gain']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]"
            for g in per.values()) + " |")
    fp_regions = list(next(iter(false_positives.values()))["per_case"])
    lines += ["", "False-positive components before postprocessing (brats2023 scorer: predicted lesions matching no "
                  "reference lesion), per test case, mean over cases and seeds:", "",
              "| inputs | " + " | ".join(fp_regions) + " | test cases with one in ET or WT |",
              "|---|" + "---|" * (len(fp_regions) + 1)]
    for arm, f in false_positives.items():
        lines.append(f"| {arm} | " + " | ".join(f"{f['per_case'][r]:.2f}" for r in fp_regions)
                     + f" | {f['cases_with_one_in_et_or_wt']:.0%} |")
    return "\n".join(lines)


def _figure(path: Path, arms: dict, regions, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(arms)
    for k, (arm, a) in enumerate(arms.items()):
        xs = np.arange(len(regions)) + k * width
        means = [a["mean"][f"dice_{r.lower()}"] for r in regions]
        stds = [a["std_over_seeds"][f"dice_{r.lower()}"] for r in regions]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=arm)
        for x, r in zip(xs, regions):
            ax.scatter([x] * len(seeds), a["per_seed"][f"dice_{r.lower()}"], color="black", s=8, zorder=3)
    ax.set_xticks(np.arange(len(regions)) + width * (len(arms) - 1) / 2, regions)
    ax.set_ylabel("test Dice (bars: mean over seeds, dots: each seed)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    save_png(fig, path)
