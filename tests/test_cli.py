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


def test_the_training_flags_take_their_defaults_from_the_config():
    """One source of defaults: every flag of python -m train that fills a TrainConfig field defaults to that
    field's value, and no flags at all give the dataclass's own config."""
    from dataclasses import fields

    from train.config import TrainConfig
    from train.options import build_parser, config_from_args

    parser, names = build_parser(), {f.name for f in fields(TrainConfig)}
    covered = 0
    for action in parser._actions:
        if action.dest in names and action.default is not None and action.dest not in ("fold", "folds"):
            want = getattr(TrainConfig, action.dest)
            got = tuple(action.default) if isinstance(action.default, list) else action.default
            assert got == want, action.dest
            covered += 1
    assert covered >= 20
    assert config_from_args(parser.parse_args([])) == TrainConfig()
    cfg = config_from_args(parser.parse_args(["--patch-size", "64", "65", "33", "--snapshot-at", "2", "1",
                                              "--model", "segresnet", "--time-limit", "1.5"]))
    assert (cfg.patch_size, cfg.snapshot_at, cfg.time_limit) == ((64, 65, 33), (1.0, 2.0), 1.5)
    from train.models import MODELS

    assert cfg.channels == MODELS["segresnet"].default_channels != TrainConfig.channels
