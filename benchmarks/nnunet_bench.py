"""nnU-Net v2 trained beside our best recipe, on the models benchmark's cohort and our split, both timed end to
end on this machine, scored by the same scorer.

nnU-Net: ``plan_and_preprocess`` of the training and validation cases, ``train 3d_fullres`` fold 0 (our validation
cases, through ``splits_final.json``) with one of its own fixed-length trainer classes (``nnUNetTrainer_1epoch``
by default: 250 iterations, its shortest), ``predict`` of the test cases with its defaults (mirroring at test
time). Its wall time W is the sum of the three commands (the conversion to its raw format is not counted).

Ours, the best arm of ``benchmarks/results/models.json`` (the seed's UNet when there is none), same training
flags as the models benchmark: ``build-store`` of the whole cohort, ``train --time-limit`` and ``evaluate
predict`` of the test cases, each a whole command. Trained twice: with the time limit that brings the whole to W,
and to W / 2, the goals being our Dice at W >= nnU-Net's and our Dice at W / 2 >= nnU-Net's.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from evaluate.report import bootstrap_ci
from store.conventions import REGIONS

from . import peers
from .report import write_result

PREDICT_RESERVE_S = 60.0  # kept for our prediction when the time limit is set; the real figure is reported


def _timed(cmd: list[str], log: Path) -> float:
    """One of our commands timed whole, its output appended to ``log`` (as nnU-Net's are)."""
    return peers._run(cmd, dict(os.environ), log)


def best_arm(results: Path) -> str:
    """The models benchmark's best arm by mean legacy Dice; the seed's UNet without a result."""
    from .models_bench import BASELINE

    path = results / "models.json"
    if not path.exists():
        return BASELINE
    arms = json.loads(path.read_text())["arms"]
    return max(arms, key=lambda a: arms[a]["mean_dice"])


def score_folder(pred_dir: Path, cases, labels: str | None = None) -> dict[str, dict]:
    """Legacy and brats2023 scores of every case's ``<case>.nii.gz`` in ``pred_dir`` against its seg, on the source
    grid, by ``python -m evaluate score``'s own function; ``labels``: the predictions' numbering (``nnunet`` for
    nnU-Net's), None for the cases' own. A case that cannot be scored stops the benchmark."""
    from evaluate.folders import score_predictions

    scored = score_predictions(pred_dir, cases, cases[0].label_convention, ("legacy", "brats2023"), labels)
    if scored.problems:
        raise RuntimeError("benchmark scoring failed: " + "; ".join(scored.problems.values()))
    return scored.rows


def _means(rows: dict[str, dict]) -> dict:
    cols = [f"{m}_{r.lower()}" for m in ("dice", "hd95", "brats2023_dice") for r in REGIONS]
    out = {c: float(np.nanmean([float(r[c]) for r in rows.values()])) for c in cols}
    out["mean_dice"] = float(np.mean([out[f"dice_{r.lower()}"] for r in REGIONS]))
    out["mean_brats2023_dice"] = float(np.mean([out[f"brats2023_dice_{r.lower()}"] for r in REGIONS]))
    return out


def _paired(ours: dict, theirs: dict) -> dict:
    d = np.array([np.mean([ours[c][f"dice_{r.lower()}"] - theirs[c][f"dice_{r.lower()}"] for r in REGIONS])
                  for c in sorted(theirs)])
    lo, hi = bootstrap_ci(d)
    return {"mean_difference": float(d.mean()), "ci95": [lo, hi]}


def training_minutes(wall: float, share: float, build_s: float) -> float:
    """Our time limit: what is left of ``share`` of nnU-Net's wall time after our build and prediction."""
    return (share * wall - build_s - PREDICT_RESERVE_S) / 60


def _nnunet_side(work: Path, part: dict, trainer: str, budget_min: float):
    """nnU-Net's plan, preprocess, train and predict, timed: (its record, or None where its training would pass
    ``budget_min``; the plan's record; the training estimate). Kept in ``work``: a rerun after a failure on our
    side reuses it."""
    done = work / "nnunet-times.json"
    theirs = json.loads(done.read_text()) if done.exists() else None
    if theirs and theirs["trainer"] == trainer and Path(theirs["predictions"]).is_dir():
        return theirs, None, theirs.get("estimate")
    prepared = peers.plan_and_preprocess(part["train"], part["val"], work / "nnunet")
    estimate = peers.training_estimate(work / "nnunet", trainer)
    print(f"nnunet: plan and preprocess {prepared['plan_and_preprocess_s']:.0f} s; {trainer}: "
          f"{estimate['seconds_per_iteration']:.1f} s per training iteration, so at least "
          f"{estimate['training_s_at_least'] / 60:.0f} min of training")
    if estimate["training_s_at_least"] > 60 * budget_min:
        return None, prepared, estimate
    theirs = peers.nnunet_train_predict(part["train"], part["val"], part["test"], work / "nnunet", trainer,
                                        prepared=prepared)
    theirs["estimate"] = estimate
    done.write_text(json.dumps(theirs, indent=1))
    return theirs, prepared, estimate


def _our_runs(work: Path, arm: str, store: Path, raw: Path, part: dict, wall: float, build_s: float, patch: int,
              log: Path, scores: dict) -> dict:
    """Our arm trained to nnU-Net's whole wall time W and to W / 2 (build-store counted), each then predicting the
    test cases as a whole command; each point's scores go into ``scores``. Returns each point's times and curve."""
    from .models_bench import ARMS, _train

    ours = {}
    test_dir = work / "test-cases"
    test_dir.mkdir(exist_ok=True)
    for c in part["test"]:
        if not (test_dir / c.case_id).exists():
            (test_dir / c.case_id).symlink_to(Path(raw / c.case_id).resolve())
    for name, share in (("W", 1.0), ("W/2", 0.5)):
        minutes = training_minutes(wall, share, build_s)
        if minutes <= 0:
            raise RuntimeError(f"nnU-Net's wall time {wall:.0f} s leaves no training time at {name}")
        run_dir = work / f"ours-{share:g}"
        t1 = time.perf_counter()
        mem = _train(arm, ARMS[arm], store, run_dir, 0, minutes, work / f"{run_dir.name}.log", patch)
        train_s = time.perf_counter() - t1
        pred = work / f"pred-{share:g}"
        predict_s = _timed([sys.executable, "-m", "evaluate", "predict", "--run-dir", str(run_dir), "--source",
                            str(test_dir), "--out", str(pred), "--device", "cpu"], log)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        scores[f"ours at {name}"] = score_folder(pred, part["test"])
        ours[name] = {"time_limit_min": minutes, "wall_s": {"build_store_s": build_s, "train_s": train_s,
                                                             "predict_s": predict_s,
                                                             "total_s": build_s + train_s + predict_s},
                      "epochs": len(records), "curve": [(r["wall_s"], r["dice_mean"]) for r in records
                                                        if "dice_mean" in r], **mem}
        print(f"nnunet: ours at {name}: {minutes:.1f} min of training, whole {ours[name]['wall_s']['total_s']:.0f} s")
    return ours


def _write_outputs(out_dir: Path, payload: dict, scores: dict) -> None:
    """nnunet.json, nnunet.md (the table with its command) and nnunet-cases.csv (every system's Dice per case)."""
    write_result(out_dir, "nnunet", payload)
    cohort = payload["cohort"]
    (Path(out_dir) / "nnunet.md").write_text(f"`{payload['command']}`: {cohort['cases']} synthetic cases at "
                                             f"{cohort['spacing_mm'][0]:g} mm, {cohort['test_cases']} test cases, one "
                                             f"seed each.\n\n{payload['table_markdown']}\n")
    with open(Path(out_dir) / "nnunet-cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "case", *(f"dice_{r.lower()}" for r in REGIONS)])
        for system, rows in scores.items():
            for case, r in sorted(rows.items()):
                w.writerow([system, case, *(f"{float(r[f'dice_{x.lower()}']):.4f}" for x in REGIONS)])


def run(out_dir: Path, work: Path, trainer: str = "nnUNetTrainer_1epoch", size: str = "full",
        budget_min: float = 60.0) -> dict | None:
    if not peers.available():
        print(f"nnunet: {peers.INSTALL_HINT}")
        return None
    from prep.discover import discover
    from store import open_store

    from .models_bench import ARMS, SCALES, make_cohort

    scale = size
    shape, n = SCALES[scale][:2]
    patch = 16 if scale == "tiny" else 64
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    raw, spacing = make_cohort(work, shape, n)
    cases = {c.case_id: c for c in discover(raw).cases}
    log = work / "ours.log"
    log.unlink(missing_ok=True)
    store = work / "store.zarr"
    build_s = _timed([sys.executable, "-m", "prep", "build-store", "--source", str(raw), "--store", str(store),
                      "--spacing", *(f"{s:g}" for s in spacing), "--workers", "2", "--overwrite"], log)
    splits = open_store(store).splits
    part = {k: [cases[i] for i in splits[k]] for k in ("train", "val", "test")}
    theirs, prepared, estimate = _nnunet_side(work, part, trainer, budget_min)
    if theirs is None:
        return _over_budget(out_dir, scale, n, spacing, part, build_s, prepared, estimate, trainer, budget_min, t0)
    wall = theirs["wall_s"]["total_s"]
    print(f"nnunet: nnU-Net {trainer}: " + ", ".join(f"{k} {v:.0f}" for k, v in theirs["wall_s"].items()))
    scores = {"nnU-Net": score_folder(Path(theirs["predictions"]), part["test"], "nnunet")}
    arm = best_arm(Path(out_dir))
    ours = _our_runs(work, arm, store, raw, part, wall, build_s, patch, log, scores)
    means = {k: _means(v) for k, v in scores.items()}
    paired = {k: _paired(v, scores["nnU-Net"]) for k, v in scores.items() if k != "nnU-Net"}
    theirs_dice = means["nnU-Net"]["mean_dice"]
    goals = {"ours at W >= nnU-Net (mean legacy Dice)": means["ours at W"]["mean_dice"] >= theirs_dice,
             "ours at W/2 >= nnU-Net (time to its Dice <= 0.5x its wall time)":
                 means["ours at W/2"]["mean_dice"] >= theirs_dice}
    table = _table(means, theirs, ours, paired, arm)
    command = "python -m benchmarks nnunet" + ("" if scale == "full" else f" --size {scale}")
    payload = {"scale": scale, "command": command, "cohort": {"cases": n, "spacing_mm": list(spacing),
                                                             "test_cases": len(part["test"])},
               "nnunet": theirs, "ours_arm": arm, "ours_flags": " ".join(ARMS[arm]), "ours": ours,
               "means": means, "paired_mean_dice_vs_nnunet": paired, "goals": goals, "table_markdown": table,
               "per_case": scores, "seconds": time.perf_counter() - t0,
               "conventions": "legacy Dice/HD95 per region and the brats2023 lesion-wise Dice, no postprocessing on "
                              "either side; nnU-Net with its test-time mirroring (its default), ours without; paired: "
                              "per-case differences of the mean Dice (TC, WT, ET), 95% bootstrap interval"}
    _write_outputs(out_dir, payload, scores)
    print(table)
    return payload


def _over_budget(out_dir, scale, n, spacing, part, build_s, prepared, estimate, trainer, budget_min, t0) -> dict:
    """nnU-Net's shortest run would not end within the budget: what was measured, and no comparison."""
    note = (f"nnU-Net's {trainer} needs at least {estimate['training_s_at_least'] / 60:.0f} min of training here "
            f"({estimate['seconds_per_iteration']:.1f} s per iteration x {estimate['iterations_per_epoch']} x "
            f"{estimate['epochs']}), more than the budget of {budget_min:g} min: not run, and no comparison at its "
            f"wall time (--budget to allow it; a GPU runs it in minutes)")
    payload = {"scale": scale, "command": "python -m benchmarks nnunet" + ("" if scale == "full" else
                                                                        f" --size {scale}"),
               "cohort": {"cases": n, "spacing_mm": list(spacing), "test_cases": len(part["test"])},
               "status": "over budget", "note": note, "budget_min": budget_min,
               "nnunet": {"version": peers._version(), "trainer": trainer, **prepared, "estimate": estimate},
               "ours": {"build_store_s": build_s}, "seconds": time.perf_counter() - t0}
    write_result(out_dir, "nnunet", payload)
    (Path(out_dir) / "nnunet.md").write_text(
        f"`{payload['command']}`: {n} synthetic cases at {spacing[0]:g} mm ({len(part['train'])} training, "
        f"{len(part['val'])} validation). nnU-Net v2 plan and preprocess {prepared['plan_and_preprocess_s']:.0f} s "
        f"(ours: build-store of all {n} cases {build_s:.0f} s). {note}.\n")
    print(f"nnunet: {note}")
    return payload


def _table(means: dict, theirs: dict, ours: dict, paired: dict, arm: str) -> str:
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
