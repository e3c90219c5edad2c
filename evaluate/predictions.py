"""Predictions for raw case folders, written as label NIfTI files in each case's source geometry and label
convention (what a challenge submission holds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_label_nifti(label: np.ndarray, affine, path: Path, like: Path | None = None) -> None:
    """Write a uint8 label map with ``affine`` (qform/sform codes copied from ``like`` when given), atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(label.astype(np.uint8), np.asarray(affine, float))
    codes = (1, 1)
    if like is not None and like.exists():
        ref = nib.load(str(like))
        codes = (int(ref.header["qform_code"]) or 1, int(ref.header["sform_code"]) or 1)
    img.set_qform(np.asarray(affine, float), code=codes[0])
    img.set_sform(np.asarray(affine, float), code=codes[1])
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


def predict_case(run_dir: str, case_dir: str, out: str, ensemble: bool = False, device: str = "auto") -> Path:
    """Predict a raw case folder and write the labels in its source geometry and label convention."""
    from prep.discover import discover_case
    from prep.preprocess import preprocess
    from train.engine import resolve_device

    from .inference import label_map, load_run, predict_probabilities, regions_on_source

    dev = resolve_device(device)
    run = load_run(run_dir, ensemble, dev)
    mods = tuple(run.config.modalities)
    case = discover_case(case_dir, require_seg=False, required=mods)
    params = run.preprocessing.get("params", {})
    pre = preprocess(case, mods, with_label=False, margin=params.get("crop_margin", 2),
                     spacing=params.get("spacing_mm", (1.0, 1.0, 1.0)))
    prob = predict_probabilities(run, pre.image, dev)
    convention = _output_convention(run, case.label_convention)
    label = label_map(regions_on_source(prob, pre.geometry), convention, run.config.regions)
    path = Path(out)
    write_label_nifti(label, pre.geometry["source_affine"], path, case.images[mods[0]])
    counts = {int(v): int(c) for v, c in zip(*np.unique(label, return_counts=True)) if v}
    print(f"{case.case_id}: wrote {path} ({'x'.join(map(str, label.shape))}, {convention} labels, "
          f"voxels per label {counts})")
    return path


def _output_convention(run, case_convention: str) -> str:
    """The label convention to write a case's prediction in: the case's own file naming decides (2021 vs
    2023), the run's training labels decide between 2023 and its superset 2024 (a model that outputs RC)."""
    from store.conventions import SUPERSEDED_BY, compatible

    from .inference import RunError

    trained = run.preprocessing.get("label_convention") or case_convention
    if compatible(trained, case_convention):
        return trained
    if SUPERSEDED_BY.get(trained) == case_convention or trained == case_convention:
        return case_convention
    raise RunError(f"the run was trained on {trained} labels; this case is named as a {case_convention} case")
