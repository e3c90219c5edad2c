"""Tiny NIfTI cases written by the tests themselves (no real data is needed)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import nibabel as nib
import numpy as np

SUFFIXES = {
    "brats2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, 4),
    "brats2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}, 3),
}


def lps_affine(spacing=(1.0, 1.0, 1.0), origin=(10.0, 20.0, -5.0)) -> np.ndarray:
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin
    return aff


def oblique_affine() -> np.ndarray:
    from scipy.spatial.transform import Rotation

    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", [10, -7, 15], degrees=True).as_matrix() @ np.diag([1.1, 0.95, 2.0])
    aff[:3, 3] = [3.0, -4.0, 8.0]
    return aff


def make_arrays(shape=(30, 34, 22), seed=0, layout="brats2021"):
    """Four int16 'modalities' with a brain box and a nested tumour label (ED around ET around NCR)."""
    rng = np.random.default_rng(seed)
    centre = np.asarray(shape) * 0.5
    brain = np.zeros(shape, bool)
    brain[3:-3, 4:-4, 2:-2] = True
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    r = np.linalg.norm((g - centre) / np.maximum(np.asarray(shape) / 5.0, 1.0), axis=-1)
    et = SUFFIXES[layout][2]
    label = np.zeros(shape, np.uint8)
    label[(r < 1.7) & brain] = 2
    label[(r < 1.1) & brain] = et
    label[(r < 0.5) & brain] = 1
    images = {}
    for i, m in enumerate(("t1", "t1ce", "t2", "flair")):
        # scanner-like range (a few thousand, std of a few hundred), as real BraTS intensities
        base = 4 * (rng.normal(400 + 120 * i, 40, shape) + 150 * (label > 0) * (i - 1))
        images[m] = (np.clip(base, 1, None) * brain).astype(np.int16)
    return images, label


def write_case(root, cid, affine=None, shape=(30, 34, 22), seed=0, layout="brats2021", images=None, label=None,
               skip=()):
    """Write one case folder in the given BraTS layout; returns its folder."""
    sep, names, _ = SUFFIXES[layout]
    affine = lps_affine() if affine is None else affine
    if images is None:
        images, label2 = make_arrays(shape, seed, layout)
        label = label2 if label is None else label
    d = Path(root) / cid
    d.mkdir(parents=True, exist_ok=True)
    for m, arr in images.items():
        if m in skip:
            continue
        nib.save(nib.Nifti1Image(arr, affine), d / f"{cid}{sep}{names[m]}.nii.gz")
    if "seg" not in skip:
        nib.save(nib.Nifti1Image(label, affine), d / f"{cid}{sep}seg.nii.gz")
    return d


def synth_spacing(shape) -> tuple[float, float, float]:
    """The voxel size of a synthetic cohort made with --shape (240 x 240 x 155 mm field of view)."""
    from prep.synth import FOV_MM

    return tuple(float(f / s) for f, s in zip(FOV_MM, shape))


def fake_kfold(run, kf, folds: int, best_fold: int = 0):
    """A k-fold run folder whose folds are copies of one trained run, its report written as before fold paths
    were relative (absolute paths to where the folds were made)."""
    import json
    import shutil

    for k in range(folds):
        (Path(kf) / f"fold-{k}").mkdir(parents=True)
        for f in ("best.pt", "config.json", "preprocessing.json"):
            shutil.copy(Path(run) / f, Path(kf) / f"fold-{k}" / f)
    (Path(kf) / "kfold.json").write_text(json.dumps({
        "folds": [{"fold": k, "run_dir": str(Path(kf) / f"fold-{k}"), "best_val_loss": 0.5} for k in range(folds)],
        "best_fold": best_fold}))
    return Path(kf)


# The classes of bad input a NIfTI file of a cohort or a prediction folder can fall into (docs/reliability.md).
BAD_FILES = ("truncated", "not gzip", "not NIfTI", "empty", "4D", "other grid", "float", "NaN", "stray labels")


def spoil(path: Path, kind: str) -> None:
    """Turn the NIfTI file at ``path`` into bad input of class ``kind`` (one of BAD_FILES), keeping its name."""
    import gzip

    img = nib.load(str(path))
    data, affine = np.asanyarray(img.dataobj), img.affine
    if kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "not gzip":
        path.write_bytes(gzip.decompress(path.read_bytes())[:200] + b"\0" * 100)
    elif kind == "not NIfTI":
        path.write_bytes(gzip.compress(b"case notes, not an image\n" * 20))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "4D":
        nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), str(path))
    elif kind == "other grid":
        nib.save(nib.Nifti1Image(np.asarray(data)[:-2], affine), str(path))
    elif kind in ("float", "NaN"):
        spoilt = np.where(np.asarray(data) > 0, 0.5, 0.0).astype(np.float32)
        if kind == "NaN":
            spoilt = np.asarray(data, np.float32)
            spoilt.flat[0] = np.nan
        nib.save(nib.Nifti1Image(spoilt, affine), str(path))
    elif kind == "stray labels":
        spoilt = np.asarray(data).astype(np.uint8)
        spoilt.flat[0] = 7
        nib.save(nib.Nifti1Image(spoilt, affine), str(path))
    else:
        raise ValueError(kind)


def tree_hashes(folder: Path) -> dict:
    """Every file under ``folder`` -> the sha256 of its bytes: what a command must leave unchanged."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a fixed port collides between test processes run side by side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_processes(workers: int = 2):
    """A Dask scheduler and ``workers`` one-thread worker processes (no nanny: a killed worker stays dead) on
    127.0.0.1, started with Dask's own command lines; yields (address, the worker processes, a list the test may
    add its own processes to). Every process is killed on the way out."""
    import os
    import subprocess
    import sys

    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        started = [subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                     "--name", f"w{k}", "--host", "127.0.0.1"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k in range(workers)]
        procs += started
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=60)
        yield address, started, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def regridded(cohort: Path, out: Path, affine: np.ndarray) -> Path:
    """The cohort's cases with every image and label on ``affine`` instead (the same voxels): sources the model's
    spacing does not match, which both predictors resample before cropping."""
    for case in sorted(p for p in cohort.iterdir() if p.is_dir()):
        (out / case.name).mkdir(parents=True)
        for f in case.glob("*.nii.gz"):
            img = nib.load(str(f))
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), str(out / case.name / f.name))
    return out
