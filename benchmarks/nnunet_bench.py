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
from train.runfolder import read_metrics

from . import peers, race
from .report import write_result

PREDICT_RESERVE_S = 60.0  # kept for our prediction when the time limit is set; the real figure is reported
EPOCH_TRAINERS = {e: f"nnUNetTrainer_{e}epoch" + ("s" if e > 1 else "") for e in (1, 5, 10, 20, 50, 100, 250)}


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
    return {row["case"]: row for row in scored.rows}


def _means(rows: dict[str, dict]) -> dict:
    cols = [f"{m}_{r.lower()}" for m in ("dice", "hd95", "brats2023_dice") for r in REGIONS]
    out = {c: float(np.nanmean([float(r[c]) for r in rows.values()])) for c in cols}
    out["mean_dice"] = float(np.mean([out[f"dice_{r.lower()}"] for r in REGIONS]))
    out["mean_brats2023_dice"] = float(np.mean([out[f"brats2023_dice_{r.lower()}"] for r in REGIONS]))
    return out


def _paired(ours: dict, theirs: dict) -> dict:
    """Per-case differences of the mean Dice (TC, WT, ET), ours minus nnU-Net's, with the 95% bootstrap interval:
    legacy at the top level, the brats2023 lesion-wise Dice under ``brats2023``."""

    def diff(prefix):
        d = np.array([np.mean([float(ours[c][f"{prefix}_{r.lower()}"]) - float(theirs[c][f"{prefix}_{r.lower()}"])
                               for r in REGIONS]) for c in sorted(theirs)])
        lo, hi = bootstrap_ci(d)
        return {"mean_difference": float(d.mean()), "ci95": [lo, hi]}

    return {**diff("dice"), "brats2023": diff("brats2023_dice")}


def training_minutes(wall: float, share: float, build_s: float) -> float:
    """Our time limit: what is left of ``share`` of nnU-Net's wall time after our build and prediction."""
    return (share * wall - build_s - PREDICT_RESERVE_S) / 60




def _pick_trainer(work: Path, trainer: str, budget_min: float) -> tuple[str, dict]:
    """``trainer`` timed on the preprocessed data; with ``auto``, the longest of nnU-Net's fixed-length trainers
    whose training fits ``budget_min`` at that rate (its shortest when none does, to be reported over budget)."""
    probe = peers.training_estimate(work, EPOCH_TRAINERS[1] if trainer == "auto" else trainer)
    if trainer == "auto":
        per_epoch = probe["seconds_per_iteration"] * probe["iterations_per_epoch"]
        epochs = max([e for e in EPOCH_TRAINERS if e * per_epoch <= 60 * budget_min], default=1)
        trainer = EPOCH_TRAINERS[epochs]
        probe.update(epochs=epochs, training_s_at_least=epochs * per_epoch)
    return trainer, probe


def _nnunet_side(work: Path, part: dict, trainer: str, budget_min: float, processes: int = 2):
    """nnU-Net's plan, preprocess, train and predict (on the GPU where there is one), timed: (its record, or None
    where its training would pass ``budget_min``; the plan's record; the training estimate). Kept in ``work``: a
    rerun on the same split (after a failure on our side, say) reuses it."""
    done = work / "nnunet-times.json"
    split = {k: [c.case_id for c in part[k]] for k in ("train", "val", "test")}
    theirs = json.loads(done.read_text()) if done.exists() else None
    if theirs and trainer in (theirs["trainer"], "auto") and theirs.get("split") == split and \
            Path(theirs["predictions"]).is_dir():
        return theirs, None, theirs.get("estimate")
    from train.device import resolve_device

    prepared = peers.plan_and_preprocess(part["train"], part["val"], work / "nnunet", processes)
    trainer, estimate = _pick_trainer(work / "nnunet", trainer, budget_min)
    print(f"nnunet: plan and preprocess {prepared['plan_and_preprocess_s']:.0f} s; {trainer}: "
          f"{estimate['seconds_per_iteration']:.1f} s per training iteration, so at least "
          f"{estimate['training_s_at_least'] / 60:.0f} min of training")
    if estimate["training_s_at_least"] > 60 * budget_min:
        return None, prepared, {**estimate, "trainer": trainer}
    theirs = peers.nnunet_train_predict(part["train"], part["val"], part["test"], work / "nnunet", trainer,
                                        processes, device=resolve_device("auto").type, prepared=prepared)
    theirs.update(estimate=estimate, split=split)
    done.write_text(json.dumps(theirs, indent=1))
    return theirs, prepared, estimate


def _test_cases(work: Path, raw: Path, cases) -> Path:
    """The test cases alone, as a cohort folder of links, for ``evaluate predict --source``."""
    folder = work / "test-cases"
    folder.mkdir(exist_ok=True)
    for c in cases:
        if not (folder / c.case_id).exists():
            (folder / c.case_id).symlink_to(Path(raw / c.case_id).resolve())
    return folder


def _our_run(work: Path, arm: str, store: Path, raw: Path, part: dict, wall: float, build_s: float, patch: int,
             log: Path, scores: dict) -> tuple[dict, list]:
    """Our arm trained once, to the time limit that brings the whole (build, train, predict) to nnU-Net's W, with
    snapshots where the whole reaches W/4 and W/2 (the seed recipe's schedule does not depend on the limit); each
    point then predicts the test cases as a whole command and is scored into ``scores``. Returns each point's
    times and the run's validation curve."""
    from train import snapshots

    from .models_bench import ARMS, _train

    minutes = {name: training_minutes(wall, share, build_s) for name, share in race.SHARES.items()}
    if minutes["W"] <= 0:
        raise RuntimeError(f"nnU-Net's wall time {wall:.0f} s leaves our training no time at W")
    at = {name: float(f"{m:g}") for name, m in minutes.items() if name != "W" and m > 0}
    run_dir = work / "ours"
    t1 = time.perf_counter()
    flags = [*ARMS[arm], *(["--snapshot-at", *(f"{m:g}" for m in at.values())] if at else [])]
    mem = _train(arm, flags, store, run_dir, 0, minutes["W"], work / "ours-train.log", patch)
    train_s = time.perf_counter() - t1
    records = read_metrics(run_dir)
    outside = train_s - records[-1]["wall_s"]  # the process's start (imports) and end, outside the trainer's clock
    test_dir, ours = _test_cases(work, raw, part["test"]), {}
    for name in race.SHARES:
        if name != "W" and name not in at:
            print(f"nnunet: no training time is left at {name} after our build and prediction; no point there")
            continue
        folder = run_dir if name == "W" else snapshots.folder(run_dir, at[name])
        snap = json.loads((folder / "snapshot.json").read_text()) if name != "W" else None
        point_train_s = train_s if snap is None else snap["wall_s"] + outside
        pred = work / f"pred-{name.replace('/', '-')}"
        predict_s = _timed([sys.executable, "-m", "evaluate", "predict", "--run-dir", str(folder), "--source",
                            str(test_dir), "--out", str(pred), "--device", "auto"], log)
        scores[f"ours at {name}"] = score_folder(pred, part["test"])
        ours[name] = {"time_limit_min": minutes["W"], "snapshot_at_min": at.get(name),
                      "epochs": len(records) if snap is None else snap["epoch"],
                      "wall_s": {"build_store_s": build_s, "train_s": point_train_s, "predict_s": predict_s,
                                 "total_s": build_s + point_train_s + predict_s}, **mem}
        print(f"nnunet: ours at {name}: {ours[name]['epochs']} epochs, whole {ours[name]['wall_s']['total_s']:.0f} s")
    curve = [(r["wall_s"], r["dice_mean"]) for r in records if "dice_mean" in r]
    return ours, curve


def _write_outputs(out_dir: Path, payload: dict, scores: dict) -> None:
    """nnunet.json, nnunet.md (the table with its command), nnunet.png (test mean Dice against wall minutes) and
    nnunet-cases.csv (every system's Dice per case)."""
    write_result(out_dir, "nnunet", payload)
    cohort, reach = payload["cohort"], payload["time_to_nnunet_dice"]
    wall = payload["nnunet"]["wall_s"]["total_s"]
    reached = (f"{reach['seconds']:.0f} s = {reach['seconds'] / wall:.2f} W ({reach['how']})"
               if reach["seconds"] is not None else "not reached")
    (Path(out_dir) / "nnunet.md").write_text(
        f"`{payload['command']}`: {cohort['cases']} synthetic cases at {cohort['spacing_mm'][0]:g} mm "
        f"({cohort['grid']} voxels), {cohort['test_cases']} test cases, one seed each; {payload['machine_words']}, "
        f"nothing else running; the whole benchmark took {payload['seconds'] / 60:.0f} min.\n\n"
        f"{payload['table_markdown']}\n\nOur time to nnU-Net's final mean legacy Dice "
        f"({payload['means']['nnU-Net']['mean_dice']:.3f}): {reached}.\n")
    ours = payload["ours"]
    race.plot(Path(out_dir) / "nnunet.png", (wall, payload["means"]["nnU-Net"]["mean_dice"]),
              [(o["wall_s"]["total_s"], payload["means"][f"ours at {n}"]["mean_dice"]) for n, o in ours.items()],
              f"{payload['command']} ({cohort['spacing_mm'][0]:g} mm, {cohort['test_cases']} test cases)", list(ours))
    with open(Path(out_dir) / "nnunet-cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "case", *(f"dice_{r.lower()}" for r in REGIONS)])
        for system, rows in scores.items():
            for case, r in sorted(rows.items()):
                w.writerow([system, case, *(f"{float(r[f'dice_{x.lower()}']):.4f}" for x in REGIONS)])


def _cohort(work: Path, size: str, spacing: float | None):
    """The models cohort (its grid, or the field of view at ``spacing`` mm), its spacing, its grid and our patch."""
    from prep.synth import FOV_MM

    from .models_bench import SCALES, make_cohort

    shape = race.grid_for(spacing, FOV_MM) if spacing else SCALES[size][0]
    raw, mm = make_cohort(work, shape, SCALES[size][1])
    return raw, mm, shape, race.patch_for(shape)


def run(out_dir: Path, work: Path, trainer: str = "nnUNetTrainer_1epoch", size: str = "full",
        budget_min: float = 60.0, spacing: float | None = None) -> dict | None:
    if not peers.available():
        print(f"nnunet: {peers.INSTALL_HINT}")
        return None
    from prep.discover import discover
    from store import open_store

    from .machine import machine_info
    from .models_bench import ARMS
    from .table import machine

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    workers = min(8, os.cpu_count() or 1)  # processes, the same on both sides
    raw, mm, shape, patch = _cohort(work, size, spacing)
    cases = {c.case_id: c for c in discover(raw).cases}
    log = work / "ours.log"
    log.unlink(missing_ok=True)
    store = work / "store.zarr"
    build_s = _timed([sys.executable, "-m", "prep", "build-store", "--source", str(raw), "--store", str(store),
                      "--spacing", *(f"{s:g}" for s in mm), "--workers", str(workers), "--overwrite"], log)
    splits = open_store(store).splits
    part = {k: [cases[i] for i in splits[k]] for k in ("train", "val", "test")}
    command = "python -m benchmarks nnunet" + ("" if size == "full" else f" --size {size}") + \
        (f" --spacing {spacing:g}" if spacing else "") + ("" if trainer == "nnUNetTrainer_1epoch" else
                                                        f" --trainer {trainer}") + \
        ("" if budget_min == 60.0 else f" --budget {budget_min:g}")
    cohort = {"cases": len(cases), "spacing_mm": list(mm), "grid": "x".join(map(str, shape)),
              "test_cases": len(part["test"]), "our_patch": patch, "processes": workers}
    theirs, prepared, estimate = _nnunet_side(work, part, trainer, budget_min, workers)
    if theirs is None:
        return _over_budget(out_dir, command, cohort, part, build_s, prepared, estimate, budget_min, t0)
    wall = theirs["wall_s"]["total_s"]
    print(f"nnunet: nnU-Net {theirs['trainer']}: " + ", ".join(f"{k} {v:.0f}" for k, v in theirs["wall_s"].items()))
    theirs["epochs"] = race.nnunet_epochs(work / "nnunet" / "results" / f"Dataset{peers.DATASET_ID:03d}_BraTSBench" /
                                          f"{theirs['trainer']}__nnUNetPlans__3d_fullres" / "fold_0")
    scores = {"nnU-Net": score_folder(Path(theirs["predictions"]), part["test"], "nnunet")}
    arm = best_arm(Path(out_dir))
    ours, curve = _our_run(work, arm, store, raw, part, wall, build_s, patch, log, scores)
    means = {k: _means(v) for k, v in scores.items()}
    paired = {k: _paired(v, scores["nnU-Net"]) for k, v in scores.items() if k != "nnU-Net"}
    target = means["nnU-Net"]["mean_dice"]
    reach = race.time_to_reach([(o["wall_s"]["total_s"], means[f"ours at {n}"]["mean_dice"])
                                for n, o in ours.items()], target)
    goals = {"ours at W >= nnU-Net (mean legacy Dice)": "W" in ours and means["ours at W"]["mean_dice"] >= target,
             "our time to nnU-Net's mean Dice <= 0.5 W": reach["seconds"] is not None and reach["seconds"] <= wall / 2}
    payload = {"scale": size, "command": command, "cohort": cohort, "nnunet": theirs, "ours_arm": arm,
               "ours_flags": " ".join(ARMS[arm]), "ours": ours, "ours_validation_curve": curve, "means": means,
               "paired_mean_dice_vs_nnunet": paired, "time_to_nnunet_dice": reach, "goals": goals,
               "table_markdown": race.table(means, theirs, ours, paired, arm), "per_case": scores,
               "machine_words": machine({"machine": machine_info()}),
               "seconds": time.perf_counter() - t0,
               "conventions": "legacy Dice/HD95 per region and the brats2023 lesion-wise Dice, no postprocessing on "
                              "either side; nnU-Net with its test-time mirroring (its default), ours without; paired: "
                              "per-case differences of the mean Dice (TC, WT, ET), 95% bootstrap interval; whole wall "
                              "time: nnU-Net plan_and_preprocess + train + predict, ours build-store + train (to the "
                              "point's snapshot) + predict, each a whole command"}
    _write_outputs(out_dir, payload, scores)
    print(payload["table_markdown"])
    return payload


def _over_budget(out_dir, command, cohort, part, build_s, prepared, estimate, budget_min, t0) -> dict:
    """nnU-Net's shortest run would not end within the budget: what was measured, and no comparison."""
    trainer = estimate["trainer"]
    note = (f"nnU-Net's {trainer} needs at least {estimate['training_s_at_least'] / 60:.0f} min of training here "
            f"({estimate['seconds_per_iteration']:.1f} s per iteration x {estimate['iterations_per_epoch']} x "
            f"{estimate['epochs']}), more than the budget of {budget_min:g} min: not run, and no comparison at its "
            f"wall time (--budget to allow it; a GPU runs it in minutes)")
    payload = {"command": command, "cohort": cohort, "status": "over budget", "note": note, "budget_min": budget_min,
               "nnunet": {"version": peers._version(), "trainer": trainer, **prepared, "estimate": estimate},
               "ours": {"build_store_s": build_s}, "seconds": time.perf_counter() - t0}
    write_result(out_dir, "nnunet", payload)
    (Path(out_dir) / "nnunet.md").write_text(
        f"`{command}`: {cohort['cases']} synthetic cases at {cohort['spacing_mm'][0]:g} mm ({len(part['train'])} "
        f"training, {len(part['val'])} validation). nnU-Net v2 plan and preprocess "
        f"{prepared['plan_and_preprocess_s']:.0f} s (ours: build-store of all {cohort['cases']} cases {build_s:.0f} "
        f"s). {note}.\n")
    print(f"nnunet: {note}")
    return payload
