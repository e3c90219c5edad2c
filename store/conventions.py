"""The one home of the data conventions every stage shares: modality vocabulary, label conventions, regions.

Label conventions (``LABEL_CONVENTIONS``):
- ``brats2021`` (BraTS 2018-2021): 1 NCR/NET, 2 ED, 4 ET.
- ``brats2023`` (BraTS 2023 glioma, pre-treatment): 1 NETC, 2 SNFH, 3 ET.
- ``brats2024`` (BraTS 2024+ glioma, post-treatment): 1 NETC, 2 SNFH, 3 ET, 4 RC (resection cavity). Same
  file names as 2023: the labels present decide, and a 2023 label map is a valid 2024 one.

Regions are derived from a label map by one rule (``region_masks``), for numpy and torch alike:
TC = tumour core (necrosis + enhancing), WT = whole tumour (necrosis + oedema + enhancing; the resection
cavity is not tumour), ET = enhancing tumour, RC = resection cavity, and NETC / SNFH the single labels.
Trained outputs are ``REGIONS`` (TC, WT, ET, in MONAI's ConvertToMultiChannelBasedOnBratsClasses order), plus
RC with ``--regions TC WT ET RC`` on a brats2024 store.
"""

from __future__ import annotations

import numpy as np

# The one vocabulary, in the fixed order the store keeps channels in.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
# The default trained regions, in this channel order everywhere.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")

LABEL_CONVENTIONS: dict[str, dict] = {
    "brats2021": {"labels": {"1": "NCR", "2": "ED", "4": "ET"}, "necrosis": 1, "edema": 2, "enhancing": 4},
    "brats2023": {"labels": {"1": "NETC", "2": "SNFH", "3": "ET"}, "necrosis": 1, "edema": 2, "enhancing": 3},
    "brats2024": {"labels": {"1": "NETC", "2": "SNFH", "3": "ET", "4": "RC"}, "necrosis": 1, "edema": 2,
                  "enhancing": 3, "cavity": 4},
}
# A label map valid in the key's convention is valid in the value's too (same meaning of every shared label).
SUPERSEDED_BY = {"brats2023": "brats2024"}

# The numberings a prediction file may come in (``python -m evaluate score --labels``), each a label value -> its
# meaning: BraTS 2021's (1 NCR, 2 ED, 4 ET), BraTS 2023+'s (1 NETC, 2 SNFH, 3 ET, 4 RC), nnU-Net's consecutive
# labels (k -> the convention's k-th label value) and the Medical Segmentation Decathlon Task01's.
NUMBERINGS = ("brats2021", "brats2023", "brats2024", "nnunet", "msd")
MEANINGS = ("necrosis", "edema", "enhancing", "cavity")
MSD_NUMBERING = {1: "edema", 2: "necrosis", 3: "enhancing"}  # 1 oedema, 2 non-enhancing tumour, 3 enhancing


class ConventionError(ValueError):
    """A label or region that the convention does not have; the message names it."""


def label_values(convention: str) -> tuple[int, ...]:
    """All legal label values of a convention, background included."""
    return (0, *sorted(int(k) for k in LABEL_CONVENTIONS[convention]["labels"]))



def numbering_to(convention: str, numbering: str) -> dict[int, int]:
    """Label value in ``numbering`` (one of NUMBERINGS) -> the value of the same meaning in ``convention``, for
    ``relabel``; background 0 -> 0. A value the mapping lacks has no meaning in ``convention``."""
    c = LABEL_CONVENTIONS[convention]
    if numbering == "nnunet":
        return dict(enumerate(label_values(convention)))
    if numbering == "msd":
        meanings = MSD_NUMBERING
    elif numbering in ("brats2021", "brats2023", "brats2024"):  # 2023's values are 2024's without RC
        source = LABEL_CONVENTIONS["brats2021" if numbering == "brats2021" else "brats2024"]
        meanings = {source[m]: m for m in MEANINGS if m in source}
    else:
        raise ConventionError(f"--labels {numbering!r}: choose one of {', '.join(NUMBERINGS)}")
    return {0: 0, **{int(v): c[m] for v, m in meanings.items() if m in c}}

def region_labels(convention: str, region: str) -> tuple[int, ...]:
    """The label values that make up ``region`` in ``convention``."""
    c = LABEL_CONVENTIONS[convention]
    table = {"TC": (c["necrosis"], c["enhancing"]), "WT": (c["necrosis"], c["edema"], c["enhancing"]),
             "ET": (c["enhancing"],)}
    for value, name in c["labels"].items():
        table.setdefault(name, (int(value),))
    if region not in table:
        raise ConventionError(f"region {region} is not defined for {convention} labels "
                              f"(it has {', '.join(available_regions(convention))})")
    return tuple(sorted(table[region]))


def available_regions(convention: str) -> tuple[str, ...]:
    """Every region name ``region_labels`` knows for a convention."""
    names = [*REGIONS, *LABEL_CONVENTIONS[convention]["labels"].values()]
    return tuple(dict.fromkeys(names))


def trainable_regions(convention: str) -> tuple[str, ...]:
    """Regions a model may output: TC, WT, ET, and RC where the convention labels the resection cavity."""
    return REGIONS + (("RC",) if "cavity" in LABEL_CONVENTIONS[convention] else ())


def region_masks(label, convention: str, regions=REGIONS):
    """Label map -> boolean region masks, one per name in ``regions``.

    numpy (X, Y, Z) -> (R, X, Y, Z); torch (B, 1, X, Y, Z) -> (B, R, X, Y, Z) (the channel axis replaced)."""
    masks = []
    for r in regions:
        values = region_labels(convention, r)
        m = label == values[0]
        for v in values[1:]:
            m = m | (label == v)
        masks.append(m)
    if isinstance(label, np.ndarray):
        return np.stack(masks)
    import torch

    return torch.cat(masks, dim=1)


def regions_to_label(regions: np.ndarray, convention: str, names=REGIONS) -> np.ndarray:
    """Boolean regions (R, X, Y, Z) named ``names`` -> label map (uint8) in the given convention.

    Nested as BraTS defines them: ET inside TC inside WT; WT outside TC is oedema, TC outside ET necrosis. A
    voxel any tumour region claims is tumour; RC (where given) labels the cavity only outside the tumour."""
    conv = LABEL_CONVENTIONS[convention]
    r = {n: np.asarray(m, bool) for n, m in zip(names, regions)}
    out = np.zeros(r["WT"].shape, np.uint8)
    if "RC" in r:
        if "cavity" not in conv:
            raise ConventionError(f"{convention} labels have no resection cavity (RC)")
        out[r["RC"]] = conv["cavity"]
    out[r["WT"]] = conv["edema"]
    out[r["TC"]] = conv["necrosis"]
    out[r["ET"]] = conv["enhancing"]
    return out


def convention_for_labels(convention: str, values) -> str:
    """The convention a case's label values belong to: ``convention``, or the one that supersedes it when the
    values need it (a BraTS 2023-named case holding label 4 is BraTS 2024). Raises for values neither has."""
    values = {int(v) for v in values}
    for conv in (convention, SUPERSEDED_BY.get(convention)):
        if conv and values <= set(label_values(conv)):
            return conv
    legal = set(label_values(SUPERSEDED_BY.get(convention, convention)))
    raise ConventionError(f"label values {sorted(values - legal)} outside the {convention} convention "
                          f"{sorted(label_values(convention))}")


def compatible(store_convention: str, other: str) -> bool:
    """True when label maps of ``other`` can be read in ``store_convention`` (the same, or superseded by it)."""
    return other == store_convention or SUPERSEDED_BY.get(other) == store_convention


def relabel(label: np.ndarray, mapping: dict) -> np.ndarray:
    """``label`` (uint8 values, any shape) with each value ``k`` of ``mapping`` (keys int or str) replaced by
    ``mapping[k]``; values it does not name become 0."""
    lut = np.zeros(256, np.uint8)
    for k, v in mapping.items():
        lut[int(k)] = int(v)
    return lut[np.asarray(label, np.uint8)]


# BraTS 2023+ tasks, as their case ids name them (BraTS-MEN-00004-000): adult glioma, meningioma, metastases,
# paediatric tumours, sub-Saharan Africa glioma, and the generalisability challenge across them. Ids of no task
# (BraTS2021_00000, BraTS19_..., a cohort of one's own) are glioma.
TASKS = ("gli", "men", "met", "ped", "ssa", "goat")


def task_of(case_id: str) -> str:
    """The BraTS task a case id names: BraTS-MEN-... -> men, BraTS-GoAT-... -> goat; anything else gli."""
    parts = case_id.split("-")
    if len(parts) > 1 and parts[0].lower() == "brats" and parts[1].lower() in TASKS:
        return parts[1].lower()
    return "gli"
