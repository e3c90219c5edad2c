"""nnU-Net v2 beside ``build-store``: the same cases, the same number of processes, timed the same way.

nnU-Net's preprocessing is three commands: a dataset fingerprint (``nnUNetv2_extract_fingerprint``), planning
(``nnUNetv2_plan_experiment``) and preprocessing (``nnUNetv2_preprocess -c 3d_fullres``). The benchmark cohort
is converted to nnU-Net's raw format (images linked, not copied; labels made consecutive, as nnU-Net requires:
BraTS 2021's 4 becomes 3) and each command is timed as a whole. Per case, once started:

- preprocessing: the spacing of the per-case files it writes (the last minus the first, over n - 1 cases);
- fingerprint: its wall time over the cases. It writes nothing per case, and most of its time is not per case
  anyway: it draws 10^8 foreground intensities in all, shared out over the cohort, and takes percentiles of
  them (about 45 s on one process here for 4 cases as for 8).

nnU-Net v2 is an optional peer (``pip install -e '.[peers]'``), never needed by the project itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

INSTALL_HINT = ("nnU-Net v2 is not installed, so it is not measured: pip install -e '.[peers]' installs it "
                "(an optional extra, never needed by the project itself)")
DATASET_ID = 501


def available() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def to_nnunet_raw(cases, raw_root: Path, dataset_id: int = DATASET_ID) -> Path:
    """``cases`` (prep.discover.CaseFiles, one label convention) as nnU-Net's raw dataset under ``raw_root``:
    imagesTr/{case}_{channel:04d}.nii.gz linked to the sources, labelsTr/{case}.nii.gz with the labels renumbered
    0, 1, 2, ... in the convention's order, dataset.json. Returns the dataset folder."""
    import nibabel as nib
    import numpy as np

    from store.conventions import LABEL_CONVENTIONS, MODALITIES, label_values

    conventions = {c.label_convention for c in cases}
    if len(conventions) != 1:
        raise ValueError(f"one label convention per nnU-Net dataset, got {sorted(conventions)}")
    convention = conventions.pop()
    values = label_values(convention)
    lut = np.zeros(256, np.uint8)
    lut[list(values)] = np.arange(len(values), dtype=np.uint8)
    names = LABEL_CONVENTIONS[convention]["labels"]
    folder = raw_root / f"Dataset{dataset_id:03d}_BraTSBench"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for c in cases:
        for k, m in enumerate(MODALITIES):
            link = folder / "imagesTr" / f"{c.case_id}_{k:04d}.nii.gz"
            link.unlink(missing_ok=True)
            link.symlink_to(Path(c.images[m]).resolve())
        seg = nib.load(str(c.seg))
        src = np.asanyarray(seg.dataobj)
        if stray := sorted(set(np.unique(src).tolist()) - set(values)):
            raise ValueError(f"case {c.case_id}: labels {stray} are not {convention} labels {list(values)}")
        lab = lut[src.astype(np.uint8)]
        out = nib.Nifti1Image(lab, seg.affine, seg.header)
        out.set_data_dtype(np.uint8)
        nib.save(out, str(folder / "labelsTr" / f"{c.case_id}.nii.gz"))
    meta = {
        "channel_names": {str(k): m.upper() for k, m in enumerate(MODALITIES)},
        "labels": {"background": 0, **{names[str(v)]: i for i, v in enumerate(values) if v}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


def _command(name: str) -> str:
    """nnU-Net's console script beside this interpreter (its extra installs them there), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH; {INSTALL_HINT}")
    return found


def _run(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({r.returncode}): {r.stderr[-3000:]}")
    return time.perf_counter() - t0


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def nnunet_times(cases, work: Path, processes: int) -> dict:
    """Fingerprint, planning and 3d_fullres preprocessing of ``cases`` with ``processes`` processes: wall time of
    each command, seconds per case once started, bytes written."""
    if len(cases) < 2:
        raise ValueError("the nnU-Net comparison needs at least 2 cases")
    shutil.rmtree(work, ignore_errors=True)
    raw = to_nnunet_raw(cases, work / "raw")
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results")}
    d, npr = str(DATASET_ID), str(processes)
    walls = {"fingerprint_s": _run([_command("nnUNetv2_extract_fingerprint"), "-d", d, "-np", npr], env),
             "plan_s": _run([_command("nnUNetv2_plan_experiment"), "-d", d], env),
             "preprocess_s": _run([_command("nnUNetv2_preprocess"), "-d", d, "-c", "3d_fullres", "-np", npr], env)}
    out = work / "preprocessed" / raw.name
    done = sorted(p.stat().st_mtime for p in out.glob("nnUNetPlans_3d_fullres/*.pkl"))
    if len(done) != len(cases):
        raise RuntimeError(f"nnU-Net wrote {len(done)} preprocessed cases for {len(cases)}")
    return {
        "version": _version(),
        "processes": processes,
        "cases": len(cases),
        "wall_s": {**walls, "total_s": sum(walls.values())},
        "per_case_s": {"preprocess": (done[-1] - done[0]) / (len(cases) - 1),
                       "fingerprint": walls["fingerprint_s"] / len(cases)},
        "bytes_written": _bytes_under(out),
    }


def _version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


def compare(ours: dict, peer: dict) -> dict:
    """Ratios of nnU-Net's figures to build-store's (above 1: build-store is faster or smaller).

    ``ours``: {"per_case_s", "wall_s", "bytes_written"} for the same cases and processes."""
    pc = peer["per_case_s"]
    return {
        "per_case_preprocess_over_build": pc["preprocess"] / ours["per_case_s"],
        "per_case_fingerprint_plus_preprocess_over_build": (pc["fingerprint"] + pc["preprocess"])
        / ours["per_case_s"],
        "wall_fingerprint_plan_preprocess_over_build": peer["wall_s"]["total_s"] / ours["wall_s"],
        "bytes_over_build": peer["bytes_written"] / ours["bytes_written"],
        "goals": {"per_case_preprocess_over_build": ">= 3", "per_case_fingerprint_plus_preprocess_over_build": ">= 10",
                  "wall_fingerprint_plan_preprocess_over_build": ">= 8"},
    }
