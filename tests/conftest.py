"""Shared fixtures: tiny synthetic cohorts written to temporary folders, once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = (40, 40, 28)  # 6 x 6 x 5.5 mm voxels over the BraTS field of view


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# a test (or a parameter) that only means something on a CUDA device: reported as skipped, with this reason, where
# none is present, never passed by comparing the CPU with itself
needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device; benchmarks/gpu.sh runs it on one")
no_cuda = pytest.mark.skipif(_has_cuda(), reason="checks the refusal on a machine without a CUDA device")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """Six BraTS 2021 cases of 40 x 40 x 28 voxels."""
    from prep.synth import SynthConfig, synth_cohort

    out = tmp_path_factory.mktemp("cohort2021")
    synth_cohort(SynthConfig(out=out, cases=6, seed=7, shape=TINY), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_cohort_2023(tmp_path_factory):
    from prep.synth import SynthConfig, synth_cohort

    out = tmp_path_factory.mktemp("cohort2023")
    synth_cohort(SynthConfig(out=out, cases=2, seed=3, shape=TINY, layout="brats2023"), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_store(tiny_cohort, tmp_path_factory):
    """The six tiny cases built into a store at their own voxel size (no resampling, ~30^3 voxels a case)."""
    return _tiny_store_of(tiny_cohort, tmp_path_factory.mktemp("stores") / "tiny.zarr")


def _tiny_store_of(cohort, path) -> str:
    """A tiny cohort built into a store at its own voxel size, in-process."""
    from prep.build import BuildConfig, build_store

    from .helpers import synth_spacing

    rep = build_store(BuildConfig(source=str(cohort), store=str(path), workers=0, spacing=synth_spacing(TINY)),
                      progress=False)
    assert rep.ok, rep.failed
    return str(path)


@pytest.fixture(scope="session")
def store12(tmp_path_factory):
    """Twelve tiny BraTS 2021 cases in a store: 9 train, an uneven share for 2 or 4 processes."""
    from prep.synth import SynthConfig, synth_cohort

    raw = tmp_path_factory.mktemp("cohort12")
    synth_cohort(SynthConfig(out=raw, cases=12, seed=11, shape=TINY), progress=False)
    return _tiny_store_of(raw, tmp_path_factory.mktemp("stores") / "twelve.zarr")


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto's standalone server) on 127.0.0.1, the process environment pointed at it
    (the standard AWS variables, as a user's would be); yields a function making a fresh bucket."""
    import uuid

    from benchmarks.s3server import local_s3_server

    with local_s3_server(secret_key=S3_SECRET):
        import s3fs

        def bucket() -> str:
            name = f"b{uuid.uuid4().hex[:12]}"
            s3fs.S3FileSystem().mkdir(name)
            return name

        yield bucket


S3_SECRET = "s3cr3t-value-never-written-anywhere"
