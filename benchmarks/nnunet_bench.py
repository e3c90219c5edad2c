"""The race: nnU-Net v2 trained as it trains BraTS beside our default recipe, each within one whole-pipeline wall
time W, several seeds per side, scored by the same scorer on the same test cases.

One cohort (the models cohort's generator and seed, confounders on, 400 cases so that the store's 10% test split
holds 40), at ``--spacing`` mm (4 on a CPU). Made once per work folder, and each step's result saved, so the race
can run in parts (``--seeds 0``, then ``--seeds 1``, ...), the report made from every part saved:

- setup (once): our ``build-store`` and nnU-Net's ``plan_and_preprocess`` (regions WT, TC, ET; fold 0: our
  training cases, and as its validation the 8 validation cases our trainer validates on), each timed and counted
  in every part's W; a probe that times each side's data workers (nnU-Net's ``nnUNet_n_proc_DA`` and our
  ``--workers``, 1 or 2) and keeps the faster.
- nnU-Net, per seed: its trainer with epochs and iterations that fill what W leaves after preprocessing,
  prediction and what its earlier parts measured around the training loop (``peers.write_trainer``), then
  ``nnUNetv2_predict`` of the test cases without mirroring (inside W) and with it (the second row, outside W).
- ours, per seed and arm (our default recipe, and ``--augmentation nnunet`` while that is not the default):
  ``train --time-limit`` to what W leaves, snapshots at W/4 and W/2 for the anytime curve, ``evaluate predict``
  without and with ``--tta``.

Every part records its time breakdown, the machine's load while it ran (``machine.Load``) and its per-case scores.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from train.runfolder import read_metrics

from . import peers, race
from .machine import Load

CASES = 400  # the store's 10% test split: 40 test cases
VAL_CASES = 8  # the validation cases both sides see: our --max-val-cases, nnU-Net's fold 0 validation
SYSTEMS = ("nnunet", "ours", "ours-nnunet-aug")
FIRST_RESERVE_S = {"nnunet": 150.0, "ours": 45.0}  # around the training loop, before a part has measured it


def _arm_flags(system: str, workers: int) -> list[str]:
    from .models_bench import ARMS, BASELINE, NNUNET_AUG

    arm = ARMS[NNUNET_AUG if system == "ours-nnunet-aug" else BASELINE]
    return [*arm, "--workers", str(workers), "--max-val-cases", str(VAL_CASES)]


def _timed(cmd: list[str], log: Path) -> float:
    """One of our commands timed whole, its output appended to ``log`` (as nnU-Net's are)."""
    return peers._run(cmd, dict(os.environ), log)


def score_folder(pred_dir: Path, cases, labels: str | None = None) -> dict[str, dict]:
    """Legacy and brats2023 scores of every case's ``<case>.nii.gz`` in ``pred_dir`` against its seg, on the source
    grid, by ``python -m evaluate score``'s own function; ``labels``: the predictions' numbering (``nnunet`` for
    nnU-Net's), None for the cases' own. A case that cannot be scored stops the benchmark."""
    from evaluate.folders import score_predictions

    scored = score_predictions(pred_dir, cases, cases[0].label_convention, ("legacy", "brats2023"), labels)
    if scored.problems:
        raise RuntimeError("benchmark scoring failed: " + "; ".join(scored.problems.values()))
    keep = [f"{m}_{r.lower()}" for m in ("dice", "hd95", "brats2023_dice") for r in ("TC", "WT", "ET")]
    return {row["case"]: {k: float(row[k]) for k in keep} for row in scored.rows}


def _cohort(work: Path, spacing: float, cases: int):
    """The race cohort at ``spacing`` mm (the field of view's grid), its spacing, grid and our patch."""
    from prep.synth import FOV_MM

    from .models_bench import make_cohort

    shape = race.grid_for(spacing, FOV_MM)
    raw, mm = make_cohort(work, shape, cases)
    return raw, mm, shape, race.patch_for(shape)


def _split(work: Path, raw: Path):
    from prep.discover import discover
    from store import open_store

    cases = {c.case_id: c for c in discover(raw).cases}
    splits = open_store(work / "store.zarr").splits
    part = {k: [cases[i] for i in splits[k]] for k in ("train", "val", "test")}
    part["val_seen"] = part["val"][:VAL_CASES]  # what our --max-val-cases validates on: the first, in order
    return part


def _probe_ours(work: Path, patch: int, log: Path) -> dict:
    """Our training's samples per second with 1 and 2 loader workers (3 epochs of 10 steps, the first left out)."""
    from .models_bench import _train

    rates = {}
    for w in (1, 2):
        run = work / f"probe-ours-{w}"
        _train("probe", [*_arm_flags("ours", w), "--epochs", "3", "--val-every", "1000"], work / "store.zarr", run,
               0, 60.0, log, patch)
        rates[w] = statistics.median(r["samples_per_s"] for r in read_metrics(run)[1:])
    return {"samples_per_s": rates, "workers": max(rates, key=rates.get)}


def _probe_nnunet(work: Path) -> dict:
    """nnU-Net's seconds per training iteration (and per validation iteration) with 1 and 2 augmentation
    processes, on its preprocessed data; the faster kept."""
    probes = {p: peers.training_estimate(work / "nnunet", "nnUNetTrainer", iterations=8, processes=p) for p in (1, 2)}
    best = min(probes, key=lambda p: probes[p]["seconds_per_iteration"])
    return {"by_processes": probes, "processes": best, **{k: probes[best][k] for k in
                                                        ("seconds_per_iteration", "seconds_per_val_iteration")}}


def setup(work: Path, spacing: float, cases: int) -> dict:
    """The cohort, our build, nnU-Net's plan and preprocess and both probes, once per work folder (setup.json)."""
    done = work / "setup.json"
    if done.exists():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    raw, mm, shape, patch = _cohort(work, spacing, cases)
    log = work / "ours.log"
    with Load() as load:
        build_s = _timed([sys.executable, "-m", "prep", "build-store", "--source", str(raw), "--store",
                          str(work / "store.zarr"), "--spacing", *(f"{s:g}" for s in mm), "--workers", "2",
                          "--overwrite"], log)
        part = _split(work, raw)
        prepared = peers.plan_and_preprocess(part["train"], part["val_seen"], work / "nnunet", 2)
    print(f"nnunet: build-store {build_s:.0f} s, nnU-Net plan and preprocess {prepared['plan_and_preprocess_s']:.0f} s")
    with Load() as probe_load:
        probes = {"nnunet": _probe_nnunet(work), "ours": _probe_ours(work, patch, log)}
    print(f"nnunet: probes chose nnUNet_n_proc_DA={probes['nnunet']['processes']}, our --workers "
          f"{probes['ours']['workers']}")
    from .report import cohort_record

    record = {"cohort": {**cohort_record(raw), "cases": cases, "spacing_mm": list(mm), "grid": list(shape),
                         "split": {k: len(v) for k, v in part.items()}, "our_patch": patch},
              "build_store_s": build_s, "nnunet_prepared": prepared, "probes": probes,
              "load": {"preparation": load.summary(), "probes": probe_load.summary()}}
    done.write_text(json.dumps(record, indent=1))
    return record


def _reserve(parts: list[dict], side: str) -> float:
    """Seconds the whole takes beyond its training loop, the median of earlier parts of ``side``."""
    seen = [p["outside_loop_s"] for p in parts if p["side"] == side]
    return statistics.median(seen) if seen else FIRST_RESERVE_S[side]


def measured_rates(parts: list[dict]) -> dict | None:
    """nnU-Net's seconds per training iteration, per validation iteration and per epoch end as its earlier parts
    measured them in their whole runs (medians over parts); None before any. The probe's few iterations run
    faster than a whole run's (its augmentation processes start with their queues full)."""
    done = [p["phases"] for p in parts if p["side"] == "nnunet"]
    if not done:
        return None
    per = lambda key, n: statistics.median(ph[key] / (ph["epochs"] * ph[n]) for ph in done)  # noqa: E731
    return {"iteration_s": per("training_iterations_s", "iterations_per_epoch"),
            "val_iteration_s": per("validation_s", "val_iterations_per_epoch"),
            "epoch_end_s": statistics.median(ph["epoch_end_s"] / ph["epochs"] for ph in done)}


def nnunet_part(work: Path, st: dict, seed: int, budget_s: float, earlier: list[dict]) -> dict:
    """One seed of nnU-Net: its schedule fitted to the budget, trained, predicted without and with mirroring."""
    part = _split(work, Path(st["cohort"]["folder"]))
    prep_s = st["nnunet_prepared"]["plan_and_preprocess_s"]
    probe = st["probes"]["nnunet"]
    rates = measured_rates(earlier) or {"iteration_s": probe["seconds_per_iteration"],
                                        "val_iteration_s": probe["seconds_per_val_iteration"], "epoch_end_s": 2.0}
    loop_s = budget_s - prep_s - _reserve(earlier, "nnunet")
    schedule = peers.fit_schedule(loop_s, rates["iteration_s"], rates["val_iteration_s"], rates["epoch_end_s"])
    peers.write_trainer(schedule["epochs"], schedule["iterations_per_epoch"], schedule["val_iterations_per_epoch"])
    print(f"nnunet: seed {seed}: {schedule['epochs']} epochs of {schedule['iterations_per_epoch']} iterations for "
          f"{loop_s:.0f} s of its training loop")
    results = work / f"nnunet-seed{seed}"
    with Load() as load:
        trained = peers.nnunet_train(work / "nnunet", results, seed, probe["processes"])
        predict_s = peers.nnunet_predict(work / "nnunet", results, part["test"], results / "pred", False,
                                         probe["processes"])
    tta_s = peers.nnunet_predict(work / "nnunet", results, part["test"], results / "pred-tta", True,
                                 probe["processes"])
    ph = trained["phases"]
    loop = ph["training_iterations_s"] + ph["validation_s"] + ph["epoch_end_s"]
    breakdown = {"preprocessing_s": prep_s, "training_iterations_s": ph["training_iterations_s"],
                 "validation_s": ph["validation_s"], "epoch_end_s": ph["epoch_end_s"],
                 "final_validation_s": ph["final_validation_s"], "start_s": trained["train_s"] - loop -
                 ph["final_validation_s"], "prediction_s": predict_s}
    whole = prep_s + trained["train_s"] + predict_s
    return {"side": "nnunet", "system": "nnunet", "seed": seed, "version": peers._version(),
            "trainer": peers.TRAINER, "schedule": schedule, "sized_from": rates, "phases": ph, "final_lr": ph["lr"][-1],
            "epochs_log": trained["epochs_log"], "log": trained["log"], "checkpoint": "final",
            "breakdown_s": breakdown, "whole_s": whole, "outside_loop_s": whole - prep_s - loop,
            "prediction_tta_s": tta_s, "load": load.summary(),
            "scores": {"none": score_folder(results / "pred", part["test"], "nnunet"),
                       "mirror": score_folder(results / "pred-tta", part["test"], "nnunet")}}


def _test_cases(work: Path, raw: Path, cases) -> Path:
    """The test cases alone, as a cohort folder of links, for ``evaluate predict --source``."""
    folder = work / "test-cases"
    folder.mkdir(exist_ok=True)
    for c in cases:
        if not (folder / c.case_id).exists():
            (folder / c.case_id).symlink_to(Path(raw / c.case_id).resolve())
    return folder


def ours_part(work: Path, st: dict, system: str, seed: int, budget_s: float, earlier: list[dict]) -> dict:
    """One seed of one of our arms: trained to the time limit that brings the whole to W, snapshots at W/4 and W/2
    (the anytime curve, each predicted as a whole command), the final model predicted without and with TTA."""
    from train import snapshots

    from .models_bench import _train

    raw = Path(st["cohort"]["folder"])
    part, build_s = _split(work, raw), st["build_store_s"]
    reserve = _reserve(earlier, "ours")
    minutes = {name: (share * budget_s - build_s - reserve) / 60 for name, share in race.SHARES.items()}
    if minutes["W"] <= 0:
        raise RuntimeError(f"W = {budget_s:.0f} s leaves our training no time after the build and prediction")
    at = {n: float(f"{m:.3g}") for n, m in minutes.items() if n != "W" and m > 0}
    run_dir, log, test = work / f"{system}-seed{seed}", work / f"{system}-seed{seed}.log", _test_cases(work, raw,
                                                                                                      part["test"])
    log.unlink(missing_ok=True)
    flags = [*_arm_flags(system, st["probes"]["ours"]["workers"]),
             *(["--snapshot-at", *(f"{m:g}" for m in at.values())] if at else [])]
    predict = [sys.executable, "-m", "evaluate", "predict", "--source", str(test), "--device", "auto"]
    with Load() as load:
        t0 = time.perf_counter()
        _train(system, flags, work / "store.zarr", run_dir, seed, minutes["W"], log, st["cohort"]["our_patch"])
        train_s = time.perf_counter() - t0
        predict_s = _timed([*predict, "--run-dir", str(run_dir), "--out", str(run_dir / "pred")], log)
    tta_s = _timed([*predict, "--run-dir", str(run_dir), "--out", str(run_dir / "pred-tta"), "--tta"], log)
    records = read_metrics(run_dir)
    outside = train_s - records[-1]["wall_s"]  # the process's start and end, outside the trainer's clock
    iters, val = sum(r["seconds"] for r in records), sum(r.get("val_s", 0.0) for r in records)
    curve = []
    for name, m in at.items():
        snap = snapshots.folder(run_dir, m)
        info = json.loads((snap / "snapshot.json").read_text())
        s = _timed([*predict, "--run-dir", str(snap), "--out", str(snap / "pred")], log)
        curve.append({"point": name, "epoch": info["epoch"], "whole_s": build_s + info["wall_s"] + outside + s,
                      "scores": score_folder(snap / "pred", part["test"])})
    whole = build_s + train_s + predict_s
    curve.append({"point": "W", "epoch": len(records), "whole_s": whole})
    return {"side": "ours", "system": system, "seed": seed, "flags": " ".join(flags), "epochs": len(records),
            "time_limit_min": minutes["W"], "checkpoint": "best (validation loss)", "final_lr": records[-1]["lr"],
            "breakdown_s": {"preprocessing_s": build_s, "training_iterations_s": iters, "validation_s": val,
                            "start_s": train_s - iters - val, "prediction_s": predict_s},
            "whole_s": whole, "outside_loop_s": whole - build_s - iters - val, "prediction_tta_s": tta_s,
            "load": load.summary(), "curve": curve, "validation_curve": [(r["wall_s"], r["dice_mean"])
                                                                         for r in records if "dice_mean" in r],
            "scores": {"none": score_folder(run_dir / "pred", part["test"]),
                       "mirror": score_folder(run_dir / "pred-tta", part["test"])}}


def _parts_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "nnunet-parts"


def load_parts(out_dir: Path, setup_record: dict | None = None) -> list[dict]:
    """Every part saved under ``out_dir/nnunet-parts``; with ``setup_record``, only parts of that same setup."""
    parts = [json.loads(p.read_text()) for p in sorted(_parts_dir(out_dir).glob("*-seed*.json"))]
    if setup_record is not None:
        parts = [p for p in parts if p.get("setup") == setup_record["cohort"]]
    return parts


def run(out_dir: Path, work: Path, budget_min: float = 15.0, spacing: float = 4.0, seeds=(0, 1, 2),
        systems=SYSTEMS, cases: int = CASES, command: str = "python -m benchmarks nnunet") -> dict | None:
    if not peers.available():
        print(f"nnunet: {peers.INSTALL_HINT}")
        return None
    t0 = time.perf_counter()
    budget_s = 60 * budget_min
    st = setup(work, spacing, cases)
    folder = _parts_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "setup.json").write_text(json.dumps(st, indent=1))
    for seed in seeds:
        for system in systems:
            path = folder / f"{system}-seed{seed}.json"
            earlier = [p for p in load_parts(out_dir, st) if p["budget_s"] == budget_s]
            if path.exists() and json.loads(path.read_text()).get("budget_s") == budget_s:
                continue
            print(f"nnunet: part {system} seed {seed}")
            rec = (nnunet_part(work, st, seed, budget_s, earlier) if system == "nnunet" else
                   ours_part(work, st, system, seed, budget_s, earlier))
            rec.update(budget_s=budget_s, setup=st["cohort"], command=command)
            path.write_text(json.dumps(rec, indent=1))
    parts = [p for p in load_parts(out_dir, st) if p["budget_s"] == budget_s]
    keep_logs(folder, parts)
    return race.report(out_dir, st, parts, budget_s, command, time.perf_counter() - t0, quick=cases != CASES)


def keep_logs(folder: Path, parts: list[dict]) -> None:
    """nnU-Net's training logs (its console output, epoch by epoch) copied beside the parts, as
    ``logs/nnunet-seed<k>.log``, while the work folder still holds them."""
    import shutil

    (folder / "logs").mkdir(exist_ok=True)
    for p in parts:
        if p["side"] == "nnunet" and p.get("log") and Path(p["log"]).exists():
            shutil.copyfile(p["log"], folder / "logs" / f"nnunet-seed{p['seed']}.log")
