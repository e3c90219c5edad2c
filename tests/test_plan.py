"""The plan (train.plan): written by every run, trained with --plan, refused for another store, read by the
inference paths; and python -m train plan, which sizes it to a memory budget by measured training steps."""

import json
import math
import subprocess
import sys
from pathlib import Path

from train.cli import main as train_main
from train.config import TrainConfig
from train.plan import SECTIONS, make_plan
from train.runfolder import write_json

TINY = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--batch-size", "2", "--workers", "0",
        "--epochs", "1", "--steps-per-epoch", "1", "--max-val-cases", "1"]


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "train", "plan", *args], capture_output=True, text=True,
                          timeout=600)


def test_a_run_writes_its_plan_and_its_invocation(tiny_store, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), *TINY, "--modalities", "t1", "flair",
                       "--augmentation", "nnunet"]) == 0
    plan = json.loads((run / "plan.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    for section, names in SECTIONS.items():
        assert {k: plan[section][k] for k in names} == {k: cfg[k] for k in names}, section
    assert plan["data"]["label_convention"] == "brats2021" and len(plan["data"]["spacing_mm"]) == 3
    assert plan["inference"] == {"overlap": 0.5, "blending": "constant", "threshold": 0.5, "sw_batch_size": 2,
                                 "window": [16, 16, 16], "tta": False,
                                 "to_source_grid": {"interpolation": "bilinear", "padding_mode": "border"}}
    assert plan["training"]["augmentation"] == "nnunet" and plan["data"]["modalities"] == ["t1", "flair"]
    assert plan["postprocessing"] is None  # until tune-postprocessing records its rules (test_postprocess)
    inv = json.loads((run / "invocation.json").read_text())
    assert inv["store"] == tiny_store and inv["run_dir"] == str(run) and inv["workers"] == 0
    assert not set(inv) & {k for names in SECTIONS.values() for k in names}  # the recipe is not the invocation


def test_a_plan_trains_and_flags_beside_it_win(tiny_store, tmp_path):
    cfg = TrainConfig(modalities=("t2", "flair"), patch_size=(24, 24, 16), batch_size=3, channels=(4, 8, 16),
                      lr=2e-3, overlap=0.25, threshold=0.4, blending="gaussian", loss="dicece")
    plan_file = write_json(tmp_path / "plan.json", make_plan(cfg, "brats2021", _spacing(tiny_store)))
    run = tmp_path / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), "--plan", str(plan_file), "--batch-size", "2",
                       "--workers", "0", "--epochs", "1", "--steps-per-epoch", "1", "--max-val-cases", "1"]) == 0
    got = json.loads((run / "config.json").read_text())
    assert got["modalities"] == ["t2", "flair"] and got["patch_size"] == [24, 24, 16] and got["lr"] == 2e-3
    assert (got["overlap"], got["threshold"], got["blending"], got["loss"]) == (0.25, 0.4, "gaussian", "dicece")
    assert got["batch_size"] == 2 and got["channels"] == [4, 8, 16]  # the flag won over the plan's 3
    from train.runs import load_run

    loaded = load_run(run)
    assert loaded.plan["inference"]["threshold"] == 0.4 and loaded.folder == run
    assert loaded.config.threshold == 0.4


def _spacing(store):
    from store import open_store

    return open_store(store).params["spacing_mm"]


def test_a_plan_for_another_store_is_one_line(tiny_store, tmp_path, capsys):
    spacing = _spacing(tiny_store)
    cases = {
        "t1ce2": (make_plan(TrainConfig(modalities=("t1", "dwi")), "brats2021", spacing), "dwi missing"),
        "spacing": (make_plan(TrainConfig(), "brats2021", [1.0, 1.0, 1.0]), "mm voxels, the store holds"),
        "labels": (make_plan(TrainConfig(), "brats2023", spacing), "brats2023 labels, the store holds brats2021"),
    }
    for name, (plan, message) in cases.items():
        f = write_json(tmp_path / f"{name}.json", plan)
        assert train_main(["--store", tiny_store, "--run-dir", str(tmp_path / name), "--plan", str(f)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not (tmp_path / name).exists(), err
    (tmp_path / "bad.json").write_text("{not json")
    assert train_main(["--store", tiny_store, "--plan", str(tmp_path / "bad.json")]) == 2
    assert "not a plan file" in capsys.readouterr().err
    assert train_main(["--store", tiny_store, "--plan", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_planner_derives_patch_and_depth_as_nnunets_planner():
    from train.planner import channels_for, initial_patch, topology

    # sides rounded up to a multiple of 2^5 as nnU-Net pads them (its patch may pass the median shape)
    assert initial_patch([140, 170, 140], [1.0, 1.0, 1.0]) == ([160, 192, 160], 6)
    assert initial_patch([300, 300, 300], [1.0, 1.0, 1.0]) == ([256, 256, 256], 6)
    # 4 mm: the median case is the cap; 30 voxels give 3 levels (30 / 8 < 4), sides rounded up to multiples of 4
    assert initial_patch([50, 60, 30], [4.0, 4.0, 4.0]) == ([52, 60, 32], 3)
    assert topology([7, 7, 7]) == ([7, 7, 7], 1)
    assert channels_for(6) == [16, 32, 64, 128, 256, 256]


def test_train_plan_fits_each_budget_measured_and_each_plan_trains(tiny_store, tmp_path):
    """Three budgets: each plan's measured peak is within its budget, a smaller budget never gives a larger patch,
    and each plan trains; a budget below the smallest patch's peak is one line giving that peak."""
    big = _plan_cli("--store", tiny_store, "--memory", "64", "--out", str(tmp_path / "big.json"),
                    "--modalities", "t1", "t2")
    assert big.returncode == 0, big.stderr
    plan = json.loads((tmp_path / "big.json").read_text())
    first = plan["sizing"]["trials"][0]["peak_mb"]
    budgets = {"big": 64.0, "tight": (first - 1) / 1024, "tighter": (first - 40) / 1024}
    volumes = {}
    for name, gb in budgets.items():
        out = tmp_path / f"{name}.json"
        if name != "big":
            r = _plan_cli("--store", tiny_store, "--memory", f"{gb:.4f}", "--out", str(out), "--modalities", "t1",
                          "t2")
            if r.returncode != 0:  # the budget was below the smallest patch: the one-line refusal
                assert "is too small: the smallest patch" in r.stderr.strip().splitlines()[-1], r.stderr
                continue
        p = json.loads(out.read_text())
        assert p["sizing"]["peak_mb"] <= gb * 1024 and all(t["peak_mb"] > 0 for t in p["sizing"]["trials"])
        assert p["training"]["batch_size"] >= 2 and p["fingerprint"]["cases"] == 4  # the training split
        volumes[name] = math.prod(p["training"]["patch_size"])
        run = tmp_path / f"run-{name}"
        assert train_main(["--store", tiny_store, "--run-dir", str(run), "--plan", str(out), "--workers", "0",
                           "--epochs", "1", "--steps-per-epoch", "1", "--max-val-cases", "1"]) == 0
        assert json.loads((run / "config.json").read_text())["patch_size"] == p["training"]["patch_size"]
    assert volumes["big"] >= max(volumes.values())
    small = _plan_cli("--store", tiny_store, "--memory", "0.01", "--out", str(tmp_path / "none.json"))
    assert small.returncode == 2 and not (tmp_path / "none.json").exists()
    *trials, line = small.stderr.strip().splitlines()  # a line per trial step, then the refusal
    assert line.startswith("python -m train plan: error: --memory 0.01 GB is too small: the smallest patch")
    assert line.endswith("GB measured on cpu") and len(trials) == 2  # the fingerprint's patch, then the smallest
    again = _plan_cli("--store", tiny_store, "--out", str(tmp_path / "big.json"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_train_plan_help_imports_no_torch():
    code = ("import sys\nfrom train.cli import main\ntry:\n    main(['plan', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0 and "--memory" in r.stdout, r.stderr


def test_nnunets_planner_on_the_same_cases(tiny_store, tiny_cohort, tmp_path):
    """The plan benchmark's nnU-Net side: its ExperimentPlanner's 3d_fullres plan for the store's cases (its own
    pooling per axis, so no common multiple), its static estimate converted to GB at its batch."""
    from benchmarks.plan_bench import nnunet_plan

    plan = nnunet_plan(tiny_store, tiny_cohort, tmp_path, memory_gb=8.0)
    assert plan["batch_size"] >= 2 and plan["n_stages"] >= 2 and plan["estimate_gb"] > 0
    assert len(plan["patch_size"]) == 3 and all(p >= 4 for p in plan["patch_size"])
    assert len(plan["features_per_stage"]) == plan["n_stages"]
    fingerprint = json.loads(next((tmp_path / "preprocessed").glob("*/dataset_fingerprint.json")).read_text())
    assert len(fingerprint["shapes_after_crop"]) == 6


def test_bad_plan_values_and_planner_flags_are_one_line(tiny_store, tmp_path, capsys):
    """A plan whose inference values make no sense, or whose way back to the source grid is not the store's
    resampling inverted, is refused before work; --memory must be positive."""
    spacing = _spacing(tiny_store)
    for field, value in (("threshold", 1.5), ("overlap", 1.0), ("blending", "median")):
        plan = make_plan(TrainConfig(), "brats2021", spacing)
        plan["inference"][field] = value
        f = write_json(tmp_path / f"{field}.json", plan)
        assert train_main(["--store", tiny_store, "--run-dir", str(tmp_path / field), "--plan", str(f)]) == 2
        err = capsys.readouterr().err.strip()
        assert "the plan's inference needs an overlap in [0, 1), a threshold in (0, 1)" in err, err
        assert len(err.splitlines()) == 1 and not (tmp_path / field).exists()
    plan = make_plan(TrainConfig(), "brats2021", spacing)
    plan["inference"]["to_source_grid"]["padding_mode"] = "zeros"  # not the inverse of the store's resampling
    f = write_json(tmp_path / "back.json", plan)
    assert train_main(["--store", tiny_store, "--run-dir", str(tmp_path / "back"), "--plan", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the way back to the source grid is" in err and '"zeros"' in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "back").exists()
    assert train_main(["plan", "--store", tiny_store, "--memory", "0", "--out", str(tmp_path / "p.json")]) == 2
    assert "--memory must be a positive number of GB, not 0" in capsys.readouterr().err
