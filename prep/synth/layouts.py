"""The synthetic cohort's file layouts: case ids, folders and file names of BraTS 2018-2020 (HGG/ and LGG/),
2021, 2023 and 2024, and the Medical Segmentation Decathlon's Task01 (4D images, its own label values and
dataset.json), each written as real downloads are (``write_layout_case``). prep.synth makes the cases' anatomy."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

from store.conventions import relabel

from ..discover import LAYOUTS

LAYOUT_CHOICES = ("brats2021", "brats2023", "brats2024", "brats2019", "msd")


# the Medical Segmentation Decathlon's Task01_BrainTumour: one 4D image per case in this channel order, and labels
# 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour (BraTS 2021's 2, 1, 4)
MSD_ORDER = ("flair", "t1", "t1ce", "t2")


MSD_FROM_2021 = {0: 0, 2: 1, 1: 2, 4: 3}


MSD_DATASET = {
    "name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain images (synthetic)",
    "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
}


def case_id(layout: str, index: int) -> str:
    if layout == "msd":
        return f"BRATS_{index + 1:03d}"
    if layout == "brats2021":
        return f"BraTS2021_{index:05d}"
    if layout == "brats2019":
        return f"BraTS19_SYN_{index:05d}_1"
    return f"BraTS-GLI-{index:05d}-{'100' if layout == 'brats2024' else '000'}"  # 2024: a post-treatment timepoint


def convention_of(layout: str) -> str:
    """The label convention of a synthetic layout (BraTS 2018-2020 label as 2021 does: 1, 2, 4)."""
    return "brats2021" if layout in ("brats2019", "msd") else layout


def file_layout(layout: str) -> str:
    """The file naming of a layout's cohorts (BraTS 2024 names its files as 2023 does, 2018-2020 as 2021)."""
    return {"brats2024": "brats2023", "brats2019": "brats2021"}.get(layout, layout)


def grade_of(layout: str, index: int) -> str | None:
    """BraTS 2018-2020 cohorts come as HGG/ and LGG/ folders; one synthetic case in four is LGG (BraTS 2019: 76 of
    335)."""
    return ("LGG" if index % 4 == 3 else "HGG") if layout == "brats2019" else None


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    # NIfTI stores Fortran order: one transposing copy here is a third of what nibabel's slice-by-slice conversion
    # of a C-ordered array costs, for the same bytes
    img = nib.Nifti1Image(np.asfortranarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # gzip container (wbits 31) with mtime 0, so the same seed gives byte-identical files; run-length
    # deflate is both faster and smaller than level-1 deflate on skull-stripped volumes
    z = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    return z.compress(img.to_bytes()) + z.flush()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # never a half-written file under the final name


def _write_msd_case(out: Path, cid: str, images: dict, label: np.ndarray, affine, test: bool) -> str:
    """An MSD Task01 case: imagesTr/<id>.nii.gz (X, Y, Z, 4) float32 in ``MSD_ORDER``, labelsTr/<id>.nii.gz in
    MSD's values; a test case only imagesTs/<id>.nii.gz."""
    stack = np.stack([images[m] for m in MSD_ORDER], axis=-1).astype(np.float32)
    _write_atomic(out / ("imagesTs" if test else "imagesTr") / f"{cid}.nii.gz", _nifti_bytes(stack, affine))
    if not test:
        _write_atomic(out / "labelsTr" / f"{cid}.nii.gz", _nifti_bytes(relabel(label, MSD_FROM_2021), affine))
    return cid


def write_layout_case(out: Path, layout: str, index: int, images: dict, label: np.ndarray, affine) -> str:
    """Case ``index`` (``images``: modality -> (X, Y, Z) int16; ``label`` (X, Y, Z) uint8 in the layout's
    convention; ``affine`` (4, 4)) written under ``out`` as ``layout`` lays it out; returns the case id."""
    cid = case_id(layout, index)
    if layout == "msd":  # one case in five unlabelled, in imagesTs, as the MSD ships its test cases
        return _write_msd_case(out, cid, images, label, affine, test=index % 5 == 4)
    grade = grade_of(layout, index)
    folder = out / grade / cid if grade else out / cid
    folder.mkdir(parents=True, exist_ok=True)
    lay = LAYOUTS[file_layout(layout)]
    names = {v: k for k, v in lay["suffixes"].items()}
    files = {names[m]: (img, affine) for m, img in images.items()}
    files["seg"] = (label, affine)
    for suffix, (arr, aff) in files.items():
        _write_atomic(folder / f"{cid}{lay['sep']}{suffix}.nii.gz", _nifti_bytes(arr, aff))
    return cid


def write_msd_dataset(out: Path, cases: int) -> None:
    """The dataset.json of an MSD cohort of ``cases`` cases (every fifth a test case, in imagesTs)."""
    test = [case_id("msd", i) for i in range(cases) if i % 5 == 4]
    train = [case_id("msd", i) for i in range(cases) if i % 5 != 4]
    meta = {**MSD_DATASET, "numTraining": len(train), "numTest": len(test),
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
            "test": [f"./imagesTs/{c}.nii.gz" for c in test]}
    _write_atomic(out / "dataset.json", json.dumps(meta, indent=4).encode())
