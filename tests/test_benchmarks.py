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
    ("prep", {"workers", "store_over_source", "speedup_1_to_2_workers", "steps_s_per_case (1 worker)"}),
    ("loader", {"variants", "ratios"}),
    ("train", {"real_loader", "fixed_batch", "real_over_fixed_step_time", "scaling"}),
    ("infer", {"seconds_per_case", "ours_over_bare", "scoring_seconds_per_case"}),
])
def test_benchmark_tiny_writes_json_and_png(tiny_results, name, keys):
    data = json.loads((tiny_results / f"{name}.json").read_text())
    assert keys <= set(data) and data["machine"]["cores"] >= 1 and "torch" in data["machine"]["versions"]
    assert (tiny_results / f"{name}.png").stat().st_size > 2000
    if name == "loader":
        assert {"seed", "monai", "persistent", "ram", "ram+aug", "none", "none+aug"} <= set(data["variants"])
        assert all(v["samples_per_s"] > 0 for v in data["variants"].values())


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
