"""Each benchmark runs in a tiny mode and writes well-formed JSON and a PNG (the numbers are not asserted)."""

import json

import pytest

from benchmarks.cli import main as bench_main


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return root / "out", root / "work"


@pytest.mark.parametrize("name, keys", [
    ("synth", {"cpu_s_per_case", "wall_s_per_case"}),
    ("prep", {"workers", "store_over_source", "speedup_1_to_2_workers"}),
    ("loader", {"variants", "ratios"}),
    ("train", {"real_loader", "fixed_batch", "real_over_fixed_step_time"}),
    ("infer", {"seconds_per_case", "ours_over_bare"}),
])
def test_benchmark_tiny_writes_json_and_png(bench_dirs, name, keys):
    out, work = bench_dirs
    assert bench_main([name, "--size", "tiny", "--out", str(out), "--work", str(work)]) == 0
    data = json.loads((out / f"{name}.json").read_text())
    assert keys <= set(data) and data["machine"]["cores"] >= 1 and "torch" in data["machine"]["versions"]
    assert (out / f"{name}.png").stat().st_size > 2000
    if name == "loader":
        assert {"seed", "monai", "persistent", "ram", "ram+aug", "none", "none+aug"} <= set(data["variants"])
        assert all(v["samples_per_s"] > 0 for v in data["variants"].values())


def test_table_is_generated_from_json(bench_dirs, tmp_path):
    out, _ = bench_dirs
    from benchmarks.table import END, START, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\nafter\n")
    update_readme(out, readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n")
    for stage in ("synth", "prep", "loader", "train", "infer"):
        assert f"| {stage} |" in text
