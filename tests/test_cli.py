"""Every package answers --help without importing the heavy libraries (they load inside the commands)."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "monai", "dask", "distributed", "zarr", "nibabel", "nilearn", "matplotlib")


@pytest.mark.parametrize("pkg", ["prep", "store", "train", "evaluate", "benchmarks"])
def test_help_is_light(pkg):
    code = "\n".join([
        f"import sys, runpy; sys.argv = ['{pkg}', '--help']",
        "try:",
        f"    runpy.run_module('{pkg}', run_name='__main__')",
        "except SystemExit as e:",
        "    assert e.code == 0",
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])",
    ])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: python -m" in r.stdout
    assert "HEAVY []" in r.stdout, r.stdout.splitlines()[-1]


def test_predict_help():
    r = subprocess.run([sys.executable, "-m", "evaluate", "predict", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--case" in r.stdout and "source grid" in r.stdout
