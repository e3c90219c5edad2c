"""``verify``: check every case of a store against the contract in FORMAT.md."""

from __future__ import annotations

import numpy as np

from .conventions import REGIONS, label_values
from .encoding import content_checksum
from .format import CURRENT
from .reader import Store


def verify_case(store: Store, case_id: str) -> list[str]:
    """Faults of one case (empty when it follows the contract)."""
    faults = []
    try:
        case = store.case(case_id)
    except Exception as e:
        return [f"{case_id}: cannot open ({type(e).__name__}: {e})"]
    missing = [k for k in CURRENT.case_keys if k not in case.meta]
    if missing:
        faults.append(f"{case_id}: missing attributes {missing}")
    arrays = case.arrays
    img = arrays.get("image")
    if img is None:
        return [*faults, f"{case_id}: no image array"]
    if img.ndim != 4 or tuple(img.shape[1:]) != case.shape or img.shape[0] != len(case.meta.get("modalities", [])):
        faults.append(f"{case_id}: image shape {img.shape} does not match shape {case.shape} and modalities")
    if str(img.dtype) != CURRENT.image_dtype:
        faults.append(f"{case_id}: image dtype {img.dtype}, expected {CURRENT.image_dtype}")
    try:
        data = [np.asarray(img[...])]
        if "label" in arrays:
            lab = np.asarray(arrays["label"][...])
            data.append(lab)
            if lab.shape != case.shape:
                faults.append(f"{case_id}: label shape {lab.shape} != image shape {case.shape}")
            legal = set(label_values(case.meta["label_convention"]))
            bad = set(np.unique(lab).tolist()) - legal
            if bad:
                faults.append(f"{case_id}: label values {sorted(bad)} outside {case.meta['label_convention']}")
        if not np.isfinite(case.scale).all() or (case.scale <= 0).any():
            faults.append(f"{case_id}: image_scale {case.scale.tolist()} is not positive and finite")
        if content_checksum(*data) != case.meta.get("content_crc32"):
            faults.append(f"{case_id}: content does not match its checksum (damaged or missing chunk)")
        fg = case.foreground()
        if len(fg) and ((fg[:, 1:] < 0).any() or (fg[:, 1:] >= np.array(case.shape)).any()
                        or (fg[:, 0] >= len(REGIONS)).any()):
            faults.append(f"{case_id}: foreground coordinates outside the case")
    except Exception as e:  # a chunk that does not decode
        faults.append(f"{case_id}: unreadable data ({type(e).__name__}: {e})")
    return faults


def verify_store(store: Store, progress: bool = False) -> list[str]:
    from .progress import progress_bar

    faults = []
    missing = [k for k in CURRENT.root_keys if k not in store.attrs]
    if missing:
        faults.append(f"root: missing attributes {missing}")
    bar = progress_bar(len(store.case_ids), "verify", "case", enabled=progress)
    for cid in store.case_ids:
        faults.extend(verify_case(store, cid))
        bar.update()
    bar.close()
    split_ids = {c for k in ("train", "val", "test") for c in store.splits.get(k, [])}
    if store.case_ids and split_ids != set(store.case_ids):
        faults.append(f"root: splits cover {len(split_ids)} cases, the index {len(store.case_ids)}")
    return faults
