"""Data conventions shared by every stage: modality vocabulary, label conventions, regions.

Regions are always in the channel order TC, WT, ET (MONAI's ConvertToMultiChannelBasedOnBratsClasses):
TC = tumour core (necrosis + enhancing), WT = whole tumour (every label), ET = enhancing tumour.
"""

from __future__ import annotations

import numpy as np

# The one vocabulary, in the fixed order the store keeps channels in.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")

LABEL_CONVENTIONS: dict[str, dict] = {
    # BraTS 2018-2021: 1 NCR/NET, 2 ED, 4 ET.
    "brats2021": {
        "labels": {"1": "NCR", "2": "ED", "4": "ET"},
        "necrosis": 1,
        "edema": 2,
        "enhancing": 4,
    },
    # BraTS 2023+: 1 NETC, 2 SNFH, 3 ET.
    "brats2023": {
        "labels": {"1": "NETC", "2": "SNFH", "3": "ET"},
        "necrosis": 1,
        "edema": 2,
        "enhancing": 3,
    },
}


def label_values(convention: str) -> tuple[int, ...]:
    """All legal label values of a convention, background included."""
    return (0, *sorted(int(k) for k in LABEL_CONVENTIONS[convention]["labels"]))


def region_masks(label: np.ndarray, convention: str) -> np.ndarray:
    """Label map (X, Y, Z) -> boolean regions (3, X, Y, Z) in the order TC, WT, ET."""
    conv = LABEL_CONVENTIONS[convention]
    ncr, ed, et = conv["necrosis"], conv["edema"], conv["enhancing"]
    enh = label == et
    tc = (label == ncr) | enh
    wt = tc | (label == ed)
    return np.stack([tc, wt, enh])


def regions_to_label(regions: np.ndarray, convention: str) -> np.ndarray:
    """Boolean regions (3, X, Y, Z) in order TC, WT, ET -> label map (uint8) in the given convention.

    Nested as BraTS defines them: ET inside TC inside WT; WT outside TC is oedema, TC outside ET necrosis.
    """
    conv = LABEL_CONVENTIONS[convention]
    tc, wt, et = (np.asarray(r, bool) for r in regions)
    out = np.zeros(tc.shape, np.uint8)
    out[wt] = conv["edema"]
    out[tc] = conv["necrosis"]
    out[et] = conv["enhancing"]
    return out
