"""Reading cases and writing label maps, for evaluation, tuning and prediction alike: a store's case with its
source seg, the run checked against the store, probabilities on the stored grid taken back to the source grid
as the final label map (what is written and scored), and label maps written as NIfTI in a case's own values."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from store.conventions import compatible, regions_to_label, relabel
from store.location import remote_file
from store.records import SOURCE_GRID
from train.runs import RunError


def _load_label(path: Path, data: bytes) -> np.ndarray:
    """A label NIfTI from bytes already read (no second read of the file)."""
    import nibabel as nib

    raw = gzip.decompress(data) if path.name.endswith(".gz") else data
    return np.asanyarray(nib.Nifti1Image.from_bytes(raw).dataobj).astype(np.uint8)


def check_run_on_store(run, store) -> str:
    """The store's label convention, once the run's model can be evaluated on it (modalities, labels)."""
    missing = [m for m in run.config.modalities if m not in store.modalities]
    if missing:
        raise ValueError(f"the model reads {', '.join(missing)}, which the store lacks")
    conv = store.label_convention
    trained = run.preprocessing.get("label_convention")
    if trained and not (compatible(conv, trained) or compatible(trained, conv)):
        raise RunError(f"the run was trained on {trained} labels, the store {store.path} holds {conv} labels")
    return conv


def store_case_reader(store, source_dir: str | None = None):
    """``load(case_id) -> (case, image, seg)`` for ``run_pipeline``: the store's case once, the source seg once."""

    def load(cid):
        case = store.case(cid)
        return case, case.image(), case.read_source("seg", source_dir)

    return load


def label_maps_for_scoring(case, prob: np.ndarray, seg, conv: str, names, threshold: float) -> tuple:
    """(prediction, reference, spacing mm, grid): the final label map on the source grid (what is written) and
    the source seg, as BraTS scores; on the store's grid where the source files are gone or changed. A voxel is in
    a region where its probability is above ``threshold`` (the run's plan)."""
    if seg is not None:
        pred = regions_to_label(regions_on_source(prob, case.geometry, threshold), conv, names)
        ref = _load_label(*seg)
        if mapping := case.meta.get("source_labels"):  # MSD's values, as the build mapped them
            ref = relabel(ref, mapping)
        return pred, ref, spacing_of(case.geometry["source_affine"]), "source"
    return regions_to_label(prob > threshold, conv, names), case.label(), case.spacing, "store"


def regions_on_source(prob: np.ndarray, geometry: dict, threshold: float) -> np.ndarray:
    """Probabilities (R, X, Y, Z) on the stored grid -> boolean regions on the source grid.

    Resampled linearly, then thresholded (the run's plan: 0.5 by default): smoother than nearest-neighbour labels
    on anisotropic or oblique sources, and exact on 1 mm axis-aligned ones (prep.preprocess.to_source_grid).
    """
    from prep.preprocess import to_source_grid

    return to_source_grid(prob.astype(np.float32), geometry, mode=SOURCE_GRID["interpolation"]) > threshold


def spacing_of(affine) -> tuple[float, float, float]:
    """Voxel size in mm of each voxel axis (column norms of the affine)."""
    a = np.asarray(affine, float)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(a, axis=0))


def write_label_nifti(label: np.ndarray, affine, path, like: Path | None = None) -> None:
    """Write a uint8 label map (X, Y, Z, in the voxel axes of ``affine``, a (4, 4) voxel-to-world matrix in mm)
    atomically, qform/sform codes copied from ``like`` when given; ``path`` a local path or an object-storage
    URL (s3://...)."""
    import nibabel as nib

    img = nib.Nifti1Image(label.astype(np.uint8), np.asarray(affine, float))
    codes = (1, 1)
    if like is not None and like.exists():
        ref = nib.load(str(like))
        codes = (int(ref.header["qform_code"]) or 1, int(ref.header["sform_code"]) or 1)
    img.set_qform(np.asarray(affine, float), code=codes[0])
    img.set_sform(np.asarray(affine, float), code=codes[1])
    img.header.set_xyzt_units("mm", "sec")
    if remote := remote_file(path):  # object storage: the file made aside, then one PUT (atomic by itself)
        import tempfile

        folder, name = remote
        with tempfile.TemporaryDirectory() as d:
            nib.save(img, f"{d}/{name}")
            folder.write_atomic(name, Path(d, name).read_bytes())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    try:
        nib.save(img, str(tmp))
        tmp.replace(path)
    finally:  # on every exit path: a failed save or rename leaves no half-written file behind
        tmp.unlink(missing_ok=True)


def to_source_labels(label: np.ndarray, source_labels: dict | None) -> np.ndarray:
    """A label map (X, Y, Z) back in the case's own values, where its source labels differ from the convention's
    (``source_labels``: source value -> stored value, keys int or str, as discovery reads them and the store keeps
    them; an MSD case: BraTS 2021's 2 oedema is MSD's 1, 1 non-enhancing core its 2, 4 enhancing its 3)."""
    if not source_labels:
        return label
    return relabel(label, {stored: int(source) for source, stored in source_labels.items()})


def write_prediction(label: np.ndarray, affine, path, like: Path | None, source_labels: dict | None) -> None:
    """The final label map as its case's sources number it (MSD's values for an MSD case), written as NIfTI on
    ``affine``: what ``evaluate --save-predictions`` and ``evaluate predict`` both write."""
    write_label_nifti(to_source_labels(label, source_labels), affine, path, like)
