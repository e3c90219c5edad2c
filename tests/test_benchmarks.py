"""Each benchmark runs in a tiny mode and writes well-formed JSON and a PNG (the numbers are not asserted)."""

import json
import os

import pytest

from benchmarks.cli import main as bench_main


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """Every benchmark of ``all`` run once in tiny mode; the tests below read what it wrote (on one process, so
    that they also hold when the tests are spread over several)."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    assert bench_main(["all", "--size", "tiny", "--out", str(out), "--work", str(root / "work")]) == 0
    return out


@pytest.mark.parametrize("name, keys", [
    ("synth", {"cpu_s_per_case", "wall_s_per_case"}),
    ("prep", {"workers", "store_over_source", "speedup_1_to_2_workers", "steps_s_per_case (1 worker)", "startup"}),
    ("loader", {"variants", "ratios"}),
    ("train", {"real_loader", "fixed_batch", "real_over_fixed_step_time", "scaling"}),
    ("infer", {"seconds_per_case", "ours_over_bare", "scoring_seconds_per_case", "exported"}),
])
def test_benchmark_tiny_writes_json_and_png(tiny_results, name, keys):
    data = json.loads((tiny_results / f"{name}.json").read_text())
    assert keys <= set(data) and data["machine"]["cores"] >= 1 and "torch" in data["machine"]["versions"]
    assert (tiny_results / f"{name}.png").stat().st_size > 2000
    if name == "prep":  # the command timed whole on the cohort, its cases' own time taken out
        st = data["startup"]
        assert st["cases"] == 3 and st["store_bytes"] > 0
        assert st["fixed_s"] == pytest.approx(st["command_wall_s"]["median"] - 3 * st["per_case_s"])
    if name == "infer":  # the exported network's path beside torch's
        assert data["exported"]["onnxruntime_s_per_case"] > 0 and data["exported"]["torch_s_per_case"] > 0
    if name == "loader":
        assert {"seed", "monai", "persistent", "ram", "ram+aug", "none", "none+aug"} <= set(data["variants"])
        assert all(v["samples_per_s"] > 0 for v in data["variants"].values())
        # the reader axis: every installed engine on the same patches
        assert set(data["readers"]) == {"project", "tensorstore", "zarrs"}
        assert all(r["none_2_threads"]["median"] > 0 and r["ram_fill_s"]["median"] > 0
                   for r in data["readers"].values())
        assert data["readers"]["project"]["vs_project"] == {"none_2_threads": 1.0, "ram_fill": 1.0}


def test_readers_benchmark_tiny(tmp_path):
    """The engines on the same patches locally and from a local S3 server (requests counted in its log), the
    writer compared byte for byte, and the read alone of every arm on the same regions."""
    assert bench_main(["readers", "--size", "tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "out" / "readers.json").read_text())
    assert set(data["local"]) == {"project", "tensorstore", "zarrs"}
    s3 = data["object_storage"]["readers"]
    assert set(s3) == {"project", "tensorstore"}
    assert all(r["s3_patches_per_s"]["median"] > 0 and r["s3_requests_per_patch"]["median"] >= 1 for r in s3.values())
    assert set(data["writer"]) == {"image", "label"}
    assert all("zarr.json" in w["identical_files"] and w["project_s"] > 0 for w in data["writer"].values())
    alone = data["read_alone"]
    assert set(alone["ms_per_patch"]) == {"project, float32", "project, float16", "tensorstore, int16 as stored",
                                          "tensorstore + numpy multiply to float32",
                                          "project, fresh arrays (Case.image, Case.label)",
                                          "tensorstore + numpy multiply into a fresh float32 array"}
    assert alone["patches"] == 40 and alone["cases"] == 3
    assert all(v["median"] > 0 for v in alone["ms_per_patch"].values())
    md = (tmp_path / "out" / "readers.md").read_text()
    assert "| tensorstore |" in md and "| project, float16 |" in md


def test_table_is_generated_from_json(tiny_results, tmp_path):
    out = tiny_results
    from benchmarks.table import END, START, update_page

    readme = tmp_path / "performance.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\nafter\n")
    update_page(out, readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n")
    for stage in ("synth", "prep", "loader", "train", "infer"):
        assert f"| {stage} |" in text


def test_gpu_table_is_generated_from_the_gpu_folder(tiny_results, tmp_path):
    """Results that benchmarks/gpu.sh brought back under <out>/gpu fill the performance page's second table."""
    import shutil

    from benchmarks.table import END, GPU_END, GPU_START, START, update_page

    out = tmp_path / "results"
    shutil.copytree(tiny_results, out)
    readme = tmp_path / "performance.md"
    readme.write_text(f"{START}\n{END}\nbetween\n{GPU_START}\nold gpu\n{GPU_END}\n")
    update_page(out, readme)
    assert readme.read_text().split(GPU_START)[1].startswith("\nold gpu\n")  # no gpu/ folder: left alone
    (out / "gpu").mkdir()
    shutil.copy(out / "train.json", out / "gpu" / "train.json")
    update_page(out, readme)
    main, gpu = readme.read_text().split(GPU_START)
    assert "| synth |" in main and "between" in main
    assert "old gpu" not in gpu and "| train |" in gpu and "| synth |" not in gpu


def test_scale_benchmark_tiny(tmp_path):
    out = tmp_path / "out"
    assert bench_main(["scale", "--size", "tiny", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    data = json.loads((out / "scale.json").read_text())
    assert set(data["per_n"]) == {"6", "12"}
    for v in data["per_n"].values():
        assert v["verify_faults"] == 0 and v["root_metadata_bytes"] > 0 and v["cases_per_s_last_tenth"] > 0
    assert data["object_storage"]["s3_patches_per_s"]["median"] > 0
    assert (out / "scale.png").stat().st_size > 2000


def test_a_stage_runs_in_a_scope_that_restores_process_settings(monkeypatch, tmp_path):
    import torch
    from threadpoolctl import threadpool_limits

    import benchmarks.cli as cli
    from benchmarks.scope import changed, isolated, settings

    before, rng = settings(), torch.get_rng_state()
    with isolated(threads=1, seed=3):
        assert torch.get_num_threads() == 1
        inside = torch.rand(3)
    assert not changed(before, settings()) and torch.equal(torch.get_rng_state(), rng)
    with isolated(seed=3):
        assert torch.equal(torch.rand(3), inside)  # the same seed, the same draws
    # a stage that leaves a limit behind is caught, as synth's plain calls were
    from threadpoolctl import threadpool_info

    other = threadpool_info()[0]["num_threads"] + 1  # a limit that differs from what is set now
    leaked = []
    monkeypatch.setattr(cli, "_stage", lambda *a, **k: leaked.append(threadpool_limits(other)))
    try:
        with pytest.raises(RuntimeError, match="changed process-wide settings"):
            cli.main(["synth", "--size", "tiny", "--out", str(tmp_path)])
    finally:
        for limit in leaked:
            limit.restore_original_limits()
    assert not changed(before, settings())


def test_cohort_in_nnunet_raw_format(tiny_cohort, tiny_cohort_2023, tmp_path):
    """nnU-Net wants consecutive labels: BraTS 2021's 4 becomes 3, 2023's labels stay; images are the sources."""
    import nibabel as nib
    import numpy as np

    from benchmarks.peers import DATASET_ID, to_nnunet_raw
    from prep.discover import discover

    for cohort, old, new in ((tiny_cohort, [0, 1, 2, 4], [0, 1, 2, 3]), (tiny_cohort_2023, [0, 1, 2, 3], [0, 1, 2, 3])):
        cases = discover(cohort).cases
        folder = to_nnunet_raw(cases, tmp_path / cohort.name)
        assert folder.name == f"Dataset{DATASET_ID:03d}_BraTSBench"
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["numTraining"] == len(cases) and meta["file_ending"] == ".nii.gz"
        assert meta["channel_names"] == {"0": "T1", "1": "T1CE", "2": "T2", "3": "FLAIR"}
        assert sorted(meta["labels"].values()) == new and meta["labels"]["background"] == 0
        for c in cases:
            assert (folder / "imagesTr" / f"{c.case_id}_0002.nii.gz").resolve() == c.images["t2"].resolve()
            src = np.asanyarray(nib.load(str(c.seg)).dataobj)
            lab = np.asanyarray(nib.load(str(folder / "labelsTr" / f"{c.case_id}.nii.gz")).dataobj)
            assert lab.dtype == np.uint8 and lab.shape == src.shape
            for o, n in zip(old, new):
                assert ((src == o) == (lab == n)).all()


def test_nnunet_conversion_refuses_labels_outside_the_convention(tmp_path):
    import nibabel as nib
    import numpy as np

    from benchmarks.peers import to_nnunet_raw
    from prep.discover import discover

    from .helpers import write_case

    write_case(tmp_path / "raw", "BraTS2021_00000")
    case = discover(tmp_path / "raw").cases[0]
    seg = nib.load(str(case.seg))
    lab = np.asanyarray(seg.dataobj).copy()
    lab[0, 0, 0] = 3  # not a BraTS 2021 label
    nib.save(nib.Nifti1Image(lab, seg.affine, seg.header), str(case.seg))
    with pytest.raises(ValueError, match=r"BraTS2021_00000: labels \[3\] are not brats2021 labels"):
        to_nnunet_raw([case], tmp_path / "nn")


def test_peers_without_nnunet_say_how_to_install_it(monkeypatch, capsys, tmp_path):
    from benchmarks import peers, prep_bench

    monkeypatch.setattr(peers, "available", lambda: False)
    res = prep_bench._peers([], {}, tmp_path, tmp_path)
    assert "pip install -e '.[peers]'" in res["skipped"] and "pip install -e '.[peers]'" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["modalities", "--epochs", "0"], "--epochs must be at least 1"),
    (["prep", "--seeds", "0"], "modalities, models, augment-dice and nnunet benchmarks only"),
    (["prep", "--time-limit", "2"], "models and augment-dice benchmarks only"),
    (["models", "--time-limit", "0"], "positive number of minutes"),
    (["models", "--budget", "30"], "nnunet benchmark only"),
    (["nnunet", "--budget", "-1"], "--budget must be a positive number of minutes"),
    (["nnunet", "--spacing", "-1"], "--spacing must be a positive number of millimetres"),
    (["models", "--spacing", "4"], "--spacing applies to the nnunet benchmark only"),
    (["models", "--systems", "ours"], "--systems applies to the nnunet benchmark only"),
])
def test_bad_benchmark_flags_are_refused(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench_main([*args, "--out", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_nnunet_labels_map_back_to_the_convention():
    import numpy as np

    from benchmarks.peers import from_nnunet

    lab = np.array([[0, 1], [2, 3]], np.uint8)
    assert from_nnunet(lab, "brats2021").tolist() == [[0, 1], [2, 4]]
    assert from_nnunet(lab, "brats2023").tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="nnU-Net label 4 has no brats2021 value"):
        from_nnunet(lab + 1, "brats2021")


def test_our_split_becomes_nnunets_fold_0(tiny_cohort, tmp_path):
    from benchmarks.peers import link_images, write_split
    from prep.discover import discover

    path = write_split(tmp_path / "pre", ["b", "a"], ["c"])
    assert json.loads(path.read_text()) == [{"train": ["a", "b"], "val": ["c"]}]
    with pytest.raises(ValueError, match="training and validation cases"):
        write_split(tmp_path / "pre", ["a"], [])
    cases = discover(tiny_cohort).cases[:2]
    folder = link_images(cases, tmp_path / "imagesTs")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c.case_id}_{k:04d}.nii.gz" for c in cases
                                                            for k in range(4))
    assert (folder / f"{cases[1].case_id}_0003.nii.gz").resolve() == cases[1].images["flair"].resolve()


def test_nnunet_commands_get_their_folders_and_the_torchvision_shim(tmp_path, monkeypatch):
    """The shim dir leads PYTHONPATH (a user's own entries kept after it); its sitecustomize starts an interpreter
    cleanly whether torchvision is installed or not."""
    import subprocess
    import sys

    from benchmarks.peers import _environment

    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = _environment(tmp_path)
    assert env["nnUNet_raw"] == str(tmp_path / "raw") and env["nnUNet_results"] == str(tmp_path / "results")
    first, second = env["PYTHONPATH"].split(":")
    assert first.endswith("benchmarks/nnunet_env") and second == "/somewhere/else"
    r = subprocess.run([sys.executable, "-c", "import sitecustomize, sys; print(sitecustomize.__file__)"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().startswith(first), r.stderr


def test_race_arithmetic():
    from benchmarks import race
    from prep.synth import FOV_MM

    assert race.grid_for(4, FOV_MM) == (60, 60, 39) and race.grid_for(2, FOV_MM) == (120, 120, 78)
    with pytest.raises(ValueError, match="--spacing"):
        race.grid_for(0, FOV_MM)
    assert [race.patch_for(s) for s in ((60, 60, 39), (120, 120, 78), (240, 240, 155), (40, 40, 28))] == \
        [32, 64, 64, 16]
    points = [(100.0, 0.4), (200.0, 0.6), (400.0, 0.8)]
    assert race.time_to_reach(points, 0.7) == {"seconds": pytest.approx(300.0), "how": "interpolated between our "
                                                                                       "points"}
    assert race.time_to_reach(points, 0.6)["seconds"] == pytest.approx(200.0)
    assert race.time_to_reach(points, 0.3) == {"seconds": 100.0, "how": "by our first point (an upper bound)"}
    assert race.time_to_reach(points, 0.9) == {"seconds": None, "how": "not reached"}
    # a curve that dips: the first crossing counts
    assert race.time_to_reach([(1.0, 0.2), (2.0, 0.7), (3.0, 0.5), (4.0, 0.9)], 0.6)["seconds"] == pytest.approx(1.8)


def test_nnunets_own_log_gives_its_epochs(tmp_path):
    from benchmarks import race

    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / "training_log_2026_1_1_00_00_00.txt").write_text("2026-01-01 00:00:00.1: Epoch 0\n")  # a probe's
    (fold / "training_log_2026_1_1_00_10_00.txt").write_text(
        "2026-01-01 00:10:00.1: Epoch 0\n2026-01-01 00:10:00.2: train_loss -0.1\n"
        "2026-01-01 00:30:00.3: Pseudo dice [np.float32(0.5), np.float32(0.25), np.float32(0.0)]\n"
        "2026-01-01 00:30:00.4: Epoch time: 1200.5 s\n2026-01-01 00:30:00.5: Epoch 1\n"
        "2026-01-01 00:50:00.6: Pseudo dice [0.75, 0.5, 1e-1]\n2026-01-01 00:50:00.7: Epoch time: 1199.25 s\n")
    epochs = race.nnunet_epochs(fold)
    assert [e["pseudo_dice"] for e in epochs] == [[0.5, 0.25, 0.0], [0.75, 0.5, 0.1]]
    assert [e["epoch_s"] for e in epochs] == [1200.5, 1199.25]
    assert epochs[0]["mean_pseudo_dice"] == pytest.approx(0.25)
    assert race.nnunet_epochs(tmp_path / "nowhere") == []


def test_gpu_script_runs_the_race_alone_with_nnunets_wheels(tmp_path):
    """RACE=1 bash benchmarks/gpu.sh, with stand-ins for the GPU (nvidia-smi) and for python3 that record what they
    are asked: the carried part of nnU-Net's wheels installed (RACE_INSTALL_ONLY=1 stops there, for wheels carried
    in parts), then the race's one side at 1 mm with W = 5 minutes, and none of the other benchmarks; without
    nnU-Net and nothing carried, one line and exit 1."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (tmp_path / "wheels" / "race").mkdir(parents=True)
    (tmp_path / "wheels" / "race" / "nnunetv2-2.8.1-py3-none-any.whl").write_bytes(b"")
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB, 570.00'\n")
    (bin_dir / "python3").write_text(f"""#!/bin/bash
echo "$*" >> {calls}
case "$*" in
  "-c import nnunetv2") [ -n "$HAS_NNUNET" ] || exit 1 ;;
  -) cat > /dev/null; echo "" ;;
esac
exit 0
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)

    def gpu_sh(wheels, **extra):
        calls.unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "RACE": "1", "OUT": str(tmp_path / "out"), **extra}
        r = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), str(wheels)], env=env, cwd=root,
                           capture_output=True, text=True, timeout=60)
        lines = calls.read_text().splitlines() if calls.exists() else []
        return r, [x for x in lines if x.startswith("-m pip install")], [x for x in lines if
                                                                         x.startswith("-m benchmarks")]

    r, install, race = gpu_sh(tmp_path / "wheels", HAS_NNUNET="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(install) == 1 and install[0].endswith(f"{tmp_path}/wheels/race/nnunetv2-2.8.1-py3-none-any.whl")
    assert race == [f"-m benchmarks nnunet --quick --spacing 1 --budget 5 --seeds 0 --systems nnunet --out "
                    f"{tmp_path}/out/gpu --work /tmp/brats-race"]
    assert "=== race: exit 0" in r.stdout and (tmp_path / "out" / "gpu" / "gpu.log").exists()
    r, install, race = gpu_sh(tmp_path / "wheels", RACE_INSTALL_ONLY="1")
    assert r.returncode == 0 and len(install) == 1 and race == []
    r, install, race = gpu_sh(tmp_path / "wheels", HAS_NNUNET="1", RACE_SYSTEMS="ours")
    assert race[0].split(" --out")[0].endswith("--systems ours")
    r, install, race = gpu_sh(tmp_path / "nothing")
    assert r.returncode == 1 and install == [] and race == [] and "nnU-Net v2 is not installed" in r.stdout


def test_a_stage_help_shows_its_own_options(capsys):
    """`python -m benchmarks STAGE --help` is that stage's: its description and only the options it takes."""
    helps = {}
    for stage in ("loader", "nnunet", "models", "demo"):
        with pytest.raises(SystemExit) as e:
            bench_main([stage, "--help"])
        assert e.value.code == 0
        helps[stage] = capsys.readouterr().out
    assert "--spacing" in helps["nnunet"] and "--spacing" not in helps["loader"]
    assert "--time-limit" in helps["models"] and "--time-limit" not in helps["nnunet"]
    assert "--run-dir" in helps["demo"] and "--run-dir" not in helps["loader"]
    assert len({h.split("\n\n")[1] for h in helps.values()}) == 4  # a description of each stage's own


def test_the_demo_record_and_its_table(tiny_store, tmp_path, capsys):
    """`python -m benchmarks demo --run-dir RUN` records the run's test means and cases as evaluate wrote them,
    with the fingerprint a refactor must keep; the README's demo table is made from it."""
    import csv

    from benchmarks.table import demo_table
    from evaluate.cli import main as eval_main
    from train.cli import main as train_main

    run = tmp_path / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), "--channels", "4", "8", "16", "--patch-size",
                       "16", "16", "16", "--workers", "0", "--epochs", "1", "--modalities", "t1", "t2", "flair"]) == 0
    assert eval_main(["--run-dir", str(run), "--save-predictions"]) == 0
    assert eval_main(["--run-dir", str(run), "--tta", "--metrics", "legacy"]) == 0
    with pytest.raises(SystemExit) as e:  # --run-dir is needed
        bench_main(["demo", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--run-dir" in capsys.readouterr().err
    assert bench_main(["demo", "--run-dir", str(run), "--out", str(tmp_path / "out")]) == 0
    d = json.loads((tmp_path / "out" / "demo.json").read_text())
    summary = json.loads((run / "eval" / "test.json").read_text())
    assert d["plain"]["means"]["dice_wt"] == summary["scores"]["dice_wt"]["mean"]
    with open(run / "eval" / "test.csv") as f:
        cases = [r["case"] for r in csv.DictReader(f)]
    assert [r["case"] for r in d["plain"]["per_case"]] == cases and "tta" in d
    assert set(d["fingerprint"]["eval"]) >= {"test.csv", "test-tta.csv"} and d["fingerprint"]["predictions"]
    table = demo_table(tmp_path / "out")
    assert all(f"case {c}" in table for c in cases) and f"{d['plain']['means']['dice_wt']:.3f}" in table


def test_the_augment_benchmark_tiny(tmp_path):
    """Every arm of nnU-Net's chain measured in one run: nnU-Net's own data path over its preprocessed cases,
    batchgeneratorsv2 in one process and on every core, MONAI, and ours per cache mode; the table row generated from
    its JSON."""
    from benchmarks.table import render

    cores = os.cpu_count()

    assert bench_main(["augment", "--size", "tiny", "--out", str(tmp_path), "--work", str(tmp_path / "w")]) == 0
    data = json.loads((tmp_path / "augment.json").read_text())
    arms = data["samples_per_s"]
    assert {f"nnU-Net's data path, {cores} processes", "batchgeneratorsv2, 1 process", "MONAI, 1 process",
            "ours, --cache ram", "ours, --cache none"} <= set(arms)
    assert all(v["median"] > 0 for v in arms.values()) and data["read"] == [25, 25, 25]
    assert set(data["ours_over_nnunet_data_path"]) == {"ram", "none"}
    # nnU-Net's cases as its own loader reads them: images, labels (-1 outside the brain) and foreground locations
    folder = tmp_path / "w" / "nnunet-preprocessed-16x16x16"
    assert len(list(folder.glob("*_seg.b2nd"))) == data["cases"] == len(list(folder.glob("*.pkl")))
    assert (tmp_path / "augment.png").stat().st_size > 2000
    assert "| augment | nnU-Net's chain" in render(tmp_path)


def test_the_augment_dice_benchmark_tiny(tmp_path):
    """The seed's augmentation against nnU-Net's at equal wall time: both arms trained with the same UNet and recipe
    and scored, paired intervals per region in legacy and brats2023 Dice, the cohort's confounders recorded."""
    work = tmp_path / "w"
    assert bench_main(["augment-dice", "--size", "tiny", "--out", str(tmp_path), "--work", str(work)]) == 0
    d = json.loads((tmp_path / "augment-dice.json").read_text())
    seed, nnaug = "unet (seed recipe)", "unet, nnU-Net augmentation"
    assert list(d["arms"]) == [seed, nnaug]
    assert d["arms"][nnaug]["flags"] == d["arms"][seed]["flags"] + " --augmentation nnunet"
    for key in ("paired_dice_vs_seed_unet", "paired_brats2023_dice_vs_seed_unet"):
        assert list(d[key]) == [nnaug] and set(d[key][nnaug]) == {"TC", "WT", "ET", "mean"}
    assert d["cohort"]["confounders"] is True and d["command"].startswith("python -m benchmarks augment-dice")
    configs = {p.parent.name: json.loads(p.read_text()) for p in work.glob("models/run-*/config.json")}
    assert {c["augmentation"] for c in configs.values()} == {"seed", "nnunet"}
    assert "| unet, nnU-Net augmentation | brats2023 |" in (tmp_path / "augment-dice.md").read_text()
