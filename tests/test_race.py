"""The race against nnU-Net (python -m benchmarks nnunet): nnU-Net's regions, its fitted trainer, the load meter,
the report made from saved parts, and the run in parts. nnU-Net's own commands run in the benchmark, not here."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

REGION_COLS = ("tc", "wt", "et")


def test_regions_paint_back_to_the_labels_through_nnunets_own_code():
    """dataset.json's regions and regions_class_order, given to nnU-Net's LabelManager: its conversion of region
    outputs to a label map gives back the labels the regions were made from, for both conventions."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from benchmarks.peers import region_labels

    rng = np.random.default_rng(0)
    for convention in ("brats2021", "brats2023"):
        labels, order = region_labels(convention)
        assert list(labels) == ["background", "region WT", "region TC", "region ET"]
        lm = LabelManager(labels, regions_class_order=order)
        assert lm.has_regions
        lab = rng.integers(0, 4, (6, 5, 4))  # nnU-Net's numbering: 1 necrosis, 2 oedema, 3 enhancing
        regions = np.stack([np.isin(lab, m) for m in list(labels.values())[1:]]).astype(np.float32)
        assert (lm.convert_probabilities_to_segmentation(regions) == lab).all()
    assert region_labels("brats2021")[1] == [2, 1, 3]  # oedema, then the core's necrosis, then enhancing


def test_raw_dataset_declares_regions(tiny_cohort, tmp_path):
    from benchmarks.peers import to_nnunet_raw
    from prep.discover import discover

    folder = to_nnunet_raw(discover(tiny_cohort).cases, tmp_path, regions=True)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"]["region TC"] == [1, 3] and meta["regions_class_order"] == [2, 1, 3]


def test_schedule_fills_the_training_time():
    """nnU-Net's own epoch (250 + 50 iterations) where 10 of them fit; shorter epochs in the same ratio where they
    do not (its poly learning rate steps once an epoch); never less than one epoch of one iteration."""
    from benchmarks.peers import fit_schedule

    s = fit_schedule(20000.0, 0.5, 0.5, 10.0)  # 250 x 0.5 + 50 x 0.5 + 10 = 160 s an epoch: 125 epochs
    assert s == {"epochs": 125, "iterations_per_epoch": 250, "val_iterations_per_epoch": 50,
                 "epoch_s_estimate": pytest.approx(160.0)}
    s = fit_schedule(689.0, 14.34, 3.76, 2.0)  # nnU-Net at 4 mm on 2 cores: 14 s an iteration (batch 12)
    assert s["iterations_per_epoch"] == 4 and s["val_iterations_per_epoch"] == 1 and s["epochs"] == 10
    assert s["epochs"] * s["epoch_s_estimate"] <= 689.0
    assert fit_schedule(10.0, 2.0, 0.5, 3.0) == {"epochs": 1, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1,
                                                 "epoch_s_estimate": pytest.approx(5.5)}


def test_written_trainer_is_nnunets_with_the_fitted_schedule(monkeypatch, tmp_path):
    """The trainer module lands in nnU-Net's trainer folder (here a stand-in folder), subclasses nnU-Net's own
    trainer, and carries the schedule; a schedule of no epochs is refused."""
    pytest.importorskip("nnunetv2")
    import importlib.machinery
    import importlib.util

    from benchmarks import peers

    (tmp_path / "training" / "nnUNetTrainer").mkdir(parents=True)
    spec = importlib.machinery.ModuleSpec("nnunetv2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda n, *a: spec if n == "nnunetv2" else real(n, *a))
    path = peers.write_trainer(7, 25, 5)
    assert path == tmp_path / "training" / "nnUNetTrainer" / f"{peers.TRAINER}.py"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("race_trainer", path))
    module.__spec__.loader.exec_module(module)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cls = getattr(module, peers.TRAINER)
    assert issubclass(cls, nnUNetTrainer)
    assert "self.num_epochs = 7" in path.read_text() and "self.num_iterations_per_epoch = 25" in path.read_text()
    with pytest.raises(ValueError, match="at least one epoch"):
        peers.write_trainer(0, 25, 5)


def test_load_meter_counts_other_processes_not_ours():
    """A process we did not wait for burns CPU while the block runs: it counts as another process's time; a child
    run to its end inside the block counts as ours."""
    from benchmarks.machine import Load

    busy = "import time\nt = time.time()\nwhile time.time() - t < 30: pass"
    other = subprocess.Popen([sys.executable, "-c", busy])
    try:
        time.sleep(0.5)
        with Load(every=0.2) as load:
            spin = "import time\nwhile time.process_time() < 0.5: pass"  # half a CPU second, however fast the CPU
            subprocess.run([sys.executable, "-c", spin], check=True)
            time.sleep(1.5)
        s = load.summary()
    finally:
        other.kill()
        other.wait()
    assert s["our_cpu_s"] >= 0.5
    if s["machine_busy_cpu_s"] is not None:
        assert s["other_processes_cpu_s"] > 0.25 * s["wall_s"]  # the stranger, sharing the cores with whatever runs
        assert 0 < s["other_processes_share_of_machine"] <= 1
    assert s["samples"] >= 3 and s["loadavg_1min_max"] is not None


def _scores(rng, cases, level):
    return {c: {**{f"dice_{r}": float(np.clip(level + rng.normal(0, 0.05), 0, 1)) for r in REGION_COLS},
                **{f"brats2023_dice_{r}": float(np.clip(level - 0.02 + rng.normal(0, 0.05), 0, 1))
                   for r in REGION_COLS},
                **{f"hd95_{r}": 5.0 for r in REGION_COLS}} for c in cases}


def _part(system, seed, level, rng, cases, budget=600.0):
    side = "nnunet" if system == "nnunet" else "ours"
    scores = {"none": _scores(rng, cases, level), "mirror": _scores(rng, cases, level + 0.01)}
    breakdown = {"preprocessing_s": 30.0, "training_iterations_s": 400.0, "validation_s": 40.0,
                 "prediction_s": 30.0}
    rec = {"side": side, "system": system, "seed": seed, "breakdown_s": breakdown, "whole_s": 500.0 + seed,
           "outside_loop_s": 60.0, "prediction_tta_s": 90.0, "load": {"loadavg_1min_median": 2.0},
           "scores": scores, "budget_s": budget, "setup": {"cases": 10}}
    if side == "nnunet":
        rec.update(version="2.8.1", trainer="nnUNetTrainer_race", final_lr=1e-4,
                   schedule={"epochs": 8, "iterations_per_epoch": 25, "val_iterations_per_epoch": 5},
                   phases={"epoch_end_s": 16.0, "epochs": 8})
    else:
        rec["curve"] = [{"point": "W/4", "whole_s": 125.0, "scores": _scores(rng, cases, level - 0.3)},
                        {"point": "W/2", "whole_s": 250.0, "scores": _scores(rng, cases, level - 0.1)},
                        {"point": "W", "whole_s": 500.0}]
    return rec


def _setup():
    return {"cohort": {"cases": 10, "spacing_mm": [4.0, 4.0, 4.0], "grid": [60, 60, 39], "confounders": True,
                       "generator_sha256": "ab" * 32, "split": {"train": 6, "val": 2, "val_seen": 2, "test": 12}},
            "build_store_s": 5.0, "nnunet_prepared": {"plan_and_preprocess_s": 30.0},
            "probes": {"nnunet": {"processes": 1}, "ours": {"workers": 1}}, "load": {}}


def test_report_from_parts(tmp_path):
    """Ours above nnU-Net on every case by 0.2: the paired intervals lie above zero and say so; nnU-Net's three
    seeds against ours' three; an arm equal to nnU-Net shows no difference; the anytime curve reaches nnU-Net's
    Dice between W/4 and W/2 with an interval; every file written."""
    from benchmarks import race

    rng = np.random.default_rng(1)
    cases = [f"case{i:02d}" for i in range(12)]
    parts = [_part("nnunet", s, 0.5, rng, cases) for s in (0, 1, 2)]
    parts += [_part("ours", s, 0.7, rng, cases) for s in (0, 1, 2)]
    twins = [dict(p, system="ours-nnunet-aug", side="ours", curve=[{"point": "W", "whole_s": 500.0}],
                  command="python -m benchmarks nnunet --seeds 1 2 --systems ours-nnunet-aug") for p in parts[:3]]
    res = race.report(tmp_path, _setup(), parts + twins, 600.0, "python -m benchmarks nnunet --seeds 2", 1.0)
    # parts from several calls: the command recorded runs them all, each value spelled out; the calls are kept
    assert res["command"] == ("python -m benchmarks nnunet --seeds 0 1 2 --systems nnunet ours ours-nnunet-aug "
                              "--budget 10 --spacing 4")
    assert "python -m benchmarks nnunet --seeds 1 2 --systems ours-nnunet-aug" in res["calls"]
    one = race.reproducing(parts[:1] + parts[3:4], 900.0, 2.0, quick=True)
    assert one == "python -m benchmarks nnunet --quick --seeds 0 --systems nnunet ours --budget 15 --spacing 2"
    ours = res["paired_vs_nnunet"]["ours"]["none"]
    for key in ("legacy TC", "legacy WT", "legacy ET", "legacy mean", "brats2023 mean"):
        assert ours[key]["mean_difference"] == pytest.approx(0.2, abs=0.03)
        assert 0 < ours[key]["ci95"][0] < ours[key]["mean_difference"] < ours[key]["ci95"][1]
        assert ours[key]["seed_pairs"]["n"] == 3 and ours[key]["cases"] == 12
    assert res["verdict_at_W"]["ours"]["reading"] == "ours higher"
    same = res["paired_vs_nnunet"]["ours-nnunet-aug"]["none"]["legacy mean"]
    assert same["mean_difference"] == 0 and res["verdict_at_W"]["ours-nnunet-aug"]["reading"] == "no difference shown"
    arm = res["arms_vs_default"]["ours-nnunet-aug"]["none"]["legacy mean"]  # the arm minus our default, paired
    assert arm["mean_difference"] == pytest.approx(-0.2, abs=0.03) and arm["ci95"][1] < 0
    assert res["seeds"] == {"nnunet": [0, 1, 2], "ours": [0, 1, 2], "ours-nnunet-aug": [0, 1, 2]}
    assert res["test_cases"] == 12 and all(res["inside_budget"].values())
    spread = res["means"]["nnunet"]["none"]["mean_dice"]
    assert spread["min"] <= spread["mean"] <= spread["max"] and len(res["means"]["nnunet"]["none"]["per_seed"]) == 3
    reach = res["anytime"]["ours"]
    assert 125.0 < reach["time_to_nnunet_dice"]["seconds"] < 250.0
    lo, hi = reach["ci95_s"]
    assert lo is not None and hi is not None and lo <= reach["time_to_nnunet_dice"]["seconds"] <= hi
    assert [p["final_lr"] for p in res["nnunet"]["schedule"]] == [1e-4] * 3
    md = (tmp_path / "nnunet.md").read_text()
    assert "confounders on" in md and "W = 10 min" in md and "ours (default recipe) | 3 | none" in md
    assert "| nnU-Net v2 | 30 s (5%) | - | 400 s (67%) |" in md and "| 3 of 3 seeds |" in md  # where W went
    assert "ours, --augmentation nnunet minus ours (default recipe), mean legacy Dice paired" in md
    rows = (tmp_path / "nnunet-cases.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 9 * 2 * 12
    assert (tmp_path / "nnunet.png").stat().st_size > 0
    saved = json.loads((tmp_path / "nnunet.json").read_text())
    assert saved["budget_s"] == 600.0 and "load" in saved and saved["breakdown_s"]["nnunet seed 0"]


def test_report_waits_for_both_sides(tmp_path, capsys):
    from benchmarks import race

    rng = np.random.default_rng(0)
    res = race.report(tmp_path, _setup(), [_part("nnunet", 0, 0.5, rng, ["a", "b"])], 600.0, "c", 1.0)
    assert res == {"parts": ["nnunet seed 0"]} and "needs nnU-Net's parts and ours" in capsys.readouterr().out
    assert not (tmp_path / "nnunet.json").exists()


def test_race_runs_in_parts_and_keeps_what_is_saved(monkeypatch, tmp_path):
    """Each part saved as it ends; a second call with another seed runs only that seed's parts and reports from
    all of them; a part saved for another budget is run again; later parts are sized from earlier ones."""
    from benchmarks import nnunet_bench, peers

    rng = np.random.default_rng(2)
    cases = [f"c{i}" for i in range(6)]
    ran, seen_earlier = [], []

    def part(system):
        def run_part(work, st, *args):
            seed, budget, earlier = (args[-3], args[-2], args[-1])
            ran.append((system, seed, budget))
            seen_earlier.append(len(earlier))
            rec = _part(system, seed, 0.5 if system == "nnunet" else 0.6, rng, cases, budget)
            if system == "nnunet":
                rec["log"] = str(tmp_path / f"train-{seed}.log")
                (tmp_path / f"train-{seed}.log").write_text(f"Epoch 0 of seed {seed}\n")
            return rec
        return run_part

    monkeypatch.setattr(peers, "available", lambda: True)
    monkeypatch.setattr(nnunet_bench, "setup", lambda work, spacing, cases: _setup())
    monkeypatch.setattr(nnunet_bench, "nnunet_part", part("nnunet"))
    monkeypatch.setattr(nnunet_bench, "ours_part", lambda work, st, system, *a: part(system)(work, st, *a))
    out = tmp_path / "out"
    nnunet_bench.run(out, tmp_path / "w", budget_min=10, seeds=(0,), systems=("nnunet", "ours"))
    assert ran == [("nnunet", 0, 600.0), ("ours", 0, 600.0)] and seen_earlier == [0, 1]
    res = nnunet_bench.run(out, tmp_path / "w", budget_min=10, seeds=(0, 1), systems=("nnunet", "ours"))
    assert ran[2:] == [("nnunet", 1, 600.0), ("ours", 1, 600.0)]
    assert res["seeds"] == {"nnunet": [0, 1], "ours": [0, 1]}
    assert sorted(p.name for p in (out / "nnunet-parts").glob("*-seed*.json")) == [
        "nnunet-seed0.json", "nnunet-seed1.json", "ours-seed0.json", "ours-seed1.json"]
    assert (out / "nnunet-parts" / "logs" / "nnunet-seed1.log").read_text() == "Epoch 0 of seed 1\n"  # its log kept
    nnunet_bench.run(out, tmp_path / "w", budget_min=5, seeds=(0,), systems=("nnunet",))
    assert ran[4:] == [("nnunet", 0, 300.0)]


def test_reserve_comes_from_earlier_parts():
    from benchmarks.nnunet_bench import FIRST_RESERVE_S, _reserve

    assert _reserve([], "ours") == FIRST_RESERVE_S["ours"]
    parts = [{"side": "ours", "outside_loop_s": v} for v in (30.0, 50.0, 40.0)] + [
        {"side": "nnunet", "outside_loop_s": 500.0}]
    assert _reserve(parts, "ours") == 40.0 and _reserve(parts, "nnunet") == 500.0


def test_synthetic_cohorts_and_the_command_are_in_every_result(tmp_path, monkeypatch):
    """synth writes what made the cohort (confounders among it); a benchmark's result records that and the
    command line it came from."""
    from benchmarks import report
    from prep.synth import SynthConfig, synth_cohort

    synth_cohort(SynthConfig(out=tmp_path / "raw", cases=1, seed=5, shape=(16, 16, 12), confounders=False),
                 progress=False)
    made = json.loads((tmp_path / "raw" / "synth.json").read_text())
    assert made["confounders"] is False and made["seed"] == 5 and len(made["generator_sha256"]) == 64
    monkeypatch.setattr(report, "COHORTS", {})
    monkeypatch.setitem(report.INVOCATION, "command", "python -m benchmarks x --quick")
    report.cohort_record(tmp_path / "raw")
    report.cohort_record(tmp_path / "elsewhere")
    saved = json.loads(report.write_result(tmp_path / "out", "x", {"figure": 1}).read_text())
    assert saved["command"] == "python -m benchmarks x --quick" and saved["figure"] == 1
    assert saved["synthetic_cohorts"][0]["confounders"] is False
    assert "no synth.json" in saved["synthetic_cohorts"][1]["manifest"]
