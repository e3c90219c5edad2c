"""Each benchmark runs in a tiny mode and writes well-formed JSON and a PNG (the numbers are not asserted)."""

import json

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
    ("infer", {"seconds_per_case", "ours_over_bare", "scoring_seconds_per_case"}),
])
def test_benchmark_tiny_writes_json_and_png(tiny_results, name, keys):
    data = json.loads((tiny_results / f"{name}.json").read_text())
    assert keys <= set(data) and data["machine"]["cores"] >= 1 and "torch" in data["machine"]["versions"]
    assert (tiny_results / f"{name}.png").stat().st_size > 2000
    if name == "prep":  # the command timed whole on the cohort, its cases' own time taken out
        st = data["startup"]
        assert st["cases"] == 3 and st["store_bytes"] > 0
        assert st["fixed_s"] == pytest.approx(st["command_wall_s"]["median"] - 3 * st["per_case_s"])
    if name == "loader":
        assert {"seed", "monai", "persistent", "ram", "ram+aug", "none", "none+aug"} <= set(data["variants"])
        assert all(v["samples_per_s"] > 0 for v in data["variants"].values())
        # the reader axis: every installed engine on the same patches
        assert set(data["readers"]) == {"project", "tensorstore", "zarrs"}
        assert all(r["none_2_threads"]["median"] > 0 and r["ram_fill_s"]["median"] > 0
                   for r in data["readers"].values())
        assert data["readers"]["project"]["vs_project"] == {"none_2_threads": 1.0, "ram_fill": 1.0}


def test_readers_benchmark_tiny(tmp_path):
    """The engines on the same patches locally and from a local S3 server (requests counted in its log), and the
    writer compared byte for byte."""
    assert bench_main(["readers", "--size", "tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "out" / "readers.json").read_text())
    assert set(data["local"]) == {"project", "tensorstore", "zarrs"}
    s3 = data["object_storage"]["readers"]
    assert set(s3) == {"project", "tensorstore"}
    assert all(r["s3_patches_per_s"]["median"] > 0 and r["s3_requests_per_patch"]["median"] >= 1 for r in s3.values())
    assert set(data["writer"]) == {"image", "label"}
    assert all("zarr.json" in w["identical_files"] and w["project_s"] > 0 for w in data["writer"].values())
    assert "| tensorstore |" in (tmp_path / "out" / "readers.md").read_text()


def test_table_is_generated_from_json(tiny_results, tmp_path):
    out = tiny_results
    from benchmarks.table import END, START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\nafter\n")
    update_readme(out, readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n")
    for stage in ("synth", "prep", "loader", "train", "infer"):
        assert f"| {stage} |" in text


def test_gpu_table_is_generated_from_the_gpu_folder(tiny_results, tmp_path):
    """Results that benchmarks/gpu.sh brought back under <out>/gpu fill the README's second table."""
    import shutil

    from benchmarks.table import END, GPU_END, GPU_START, START, update_readme

    out = tmp_path / "results"
    shutil.copytree(tiny_results, out)
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\nbetween\n{GPU_START}\nold gpu\n{GPU_END}\n")
    update_readme(out, readme)
    assert readme.read_text().split(GPU_START)[1].startswith("\nold gpu\n")  # no gpu/ folder: left alone
    (out / "gpu").mkdir()
    shutil.copy(out / "train.json", out / "gpu" / "train.json")
    update_readme(out, readme)
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
    (["prep", "--seeds", "0"], "modalities and models benchmarks only"),
    (["prep", "--time-limit", "2"], "models benchmark only"),
    (["models", "--time-limit", "0"], "positive number of minutes"),
])
def test_bad_benchmark_flags_are_refused(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench_main([*args, "--out", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
