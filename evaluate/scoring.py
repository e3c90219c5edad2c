"""Scores of a predicted label map against the reference label map, each family equal to the scorer it is named
after (a number is only comparable with the scorer that made it).

Both maps are label maps in one convention (store.conventions); every region is derived from them by the one
rule there, so the scores are those of the very array a prediction file holds. The families:

- **legacy** (BraTS 2017-2021, region-wise): per region over the whole case, Dice and HD95 (evaluate.metrics).
- **brats2023** (the BraTS 2023 lesion-wise ranking): reference lesions merged by dilation, many-to-one hits
  through each lesion's dilation, lesions at or under a volume threshold left out, unmatched predicted
  components penalised; dilation and threshold per task (evaluate.brats2023).
- **brats2025** (the 2024-25 scorer on panoptica): one-to-one matching on Dice, lesion-wise Dice the mean over
  matched lesions, detection F1, global Dice/NSD/HD95 (evaluate.brats2025).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from store.conventions import LABEL_CONVENTIONS, label_values, region_masks, trainable_regions

from . import brats2023, brats2025
from .metrics import CONVENTIONS as LEGACY_CONVENTIONS
from .metrics import dice, hd95

FAMILIES = ("legacy", "brats2023", "brats2025")
CONVENTIONS = {
    **{f"legacy_{k}": v for k, v in LEGACY_CONVENTIONS.items()},
    "legacy_regions": "TC, WT, ET (and RC for BraTS 2024 labels), each over the whole case",
    "brats2023": "the BraTS 2023 lesion-wise scorer: 26-connected reference components merged when one "
                 "26-connected component of the reference dilated `dil` times (18-connected 3x3x3 element) holds "
                 "them; a predicted component hits every lesion whose own dilation it touches, and each lesion is "
                 "scored against the union of its hits (missed: Dice 0, HD95 374); lesions <= `thresh` mm^3 left "
                 "out, hit or missed; a predicted component touching no dilated lesion is a false positive (Dice "
                 "0, HD95 374); score = sum over kept lesions / (kept lesions + FP); nothing on either side: Dice "
                 "1, HD95 0. Regions ET, TC, WT. HD95: the surface-distance package's robust Hausdorff distance "
                 "(95th percentile, surface elements weighted by their area, the larger of the two directions), "
                 "in mm. Dilations count voxels, volumes are mm^3 of the grid's voxels",
    "brats2023_tasks": {t: {"dilation": d, "threshold_mm3": v} for t, (d, v) in brats2023.TASK_PARAMS.items()},
    "brats2025": "the BraTS 2024-25 scorer's fields from panoptica as its glioma configuration: 26-connected "
                 "instances, one-to-one MaxBipartiteMatching on Dice (threshold 1e-6); dice/nsd/hd95: the whole "
                 "region; lw_dice (sq_dsc, with its std over matched lesions), lw_nsd, lw_hd95: means over matched "
                 "lesions; tp/fp/fn, precision, recall, f1 (rq) of lesion detection; zero matched lesions: Dice and "
                 "NSD 0, HD95 infinite (reported as 373.13 mm); no lesion on either side: NaN (left out of means). "
                 "Distances in mm (panoptica is given the spacing; the scorer counts voxels, so the two agree on "
                 "1 mm grids); NSD tolerance one voxel per lesion, half a voxel for the whole region, in mm of the "
                 "smallest voxel side",
    "labels": "every score is computed from the label maps: the prediction as written to NIfTI, the reference seg",
}
BRATS2023_FIELDS = ("dice", "hd95", "tp", "fp", "fn")


class ScoringError(ValueError):
    """Inputs that cannot be scored; the message names the case."""


def parse_metrics(names) -> tuple[str, ...]:
    """--metrics (any of legacy, brats2023, brats2025) -> the families to compute, in their fixed order."""
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise ScoringError(f"--metrics takes any of {', '.join(FAMILIES)}, not {' '.join(bad) or 'nothing'}")
    return tuple(f for f in FAMILIES if f in names)


def brats2025_regions(convention: str) -> tuple[str, ...]:
    """The 2024-25 scorer's regions: each tumour label (NETC, SNFH, ET; NCR, ED in 2021 naming), RC where the
    convention has it, then TC and WT."""
    c = LABEL_CONVENTIONS[convention]
    singles = [c["labels"][str(c[k])] for k in ("necrosis", "edema", "enhancing")]
    return (*singles, *(("RC",) if "cavity" in c else ()), "TC", "WT")


def present_values(label: np.ndarray) -> set[int]:
    """The values a label map (any shape) holds: one counting pass for 8-bit maps (sorting a full-size volume, as
    ``np.unique`` does, costs several times more), ``np.unique`` otherwise."""
    a = np.asarray(label)
    if a.dtype in (np.uint8, np.bool_):
        return {int(v) for v in np.flatnonzero(np.bincount(a.view(np.uint8).ravel(), minlength=256))}
    return {int(v) for v in np.unique(a)}


def check_labels(label: np.ndarray, convention: str, what: str) -> None:
    """Refuse a label map (X, Y, Z) with values its convention does not have."""
    present = present_values(label)
    bad = present - set(label_values(convention))
    if bad:
        raise ScoringError(f"{what} has label values {sorted(bad)} outside the {convention} convention "
                           f"{list(label_values(convention))}")


def legacy_scores(pred: np.ndarray, ref: np.ndarray, convention: str, spacing) -> dict:
    """{"dice_tc": ..., "hd95_tc": ..., ...} per legacy region of two uint8 label maps (X, Y, Z) on one grid, HD95 in mm
    of voxels of ``spacing`` (mm per axis)."""
    names = trainable_regions(convention)
    p, g = region_masks(pred, convention, names), region_masks(ref, convention, names)
    out = {}
    for i, n in enumerate(names):
        out[f"dice_{n.lower()}"] = dice(p[i], g[i])
        out[f"hd95_{n.lower()}"] = hd95(p[i], g[i], spacing)
    return out


def brats2023_scores(pred: np.ndarray, ref: np.ndarray, convention: str, spacing, task: str = "gli",
                     lesions: list | None = None) -> dict:
    """{"brats2023_dice_et": ..., "brats2023_hd95_et": ..., "brats2023_tp_et": ..., ...} for ET, TC, WT of two uint8
    label maps (X, Y, Z) on one grid of voxel size ``spacing`` (mm per axis); ``lesions`` (a list) receives
    (region, Lesion) for every lesion."""
    names = brats2023.REGIONS
    p, g = region_masks(pred, convention, names), region_masks(ref, convention, names)
    out = {}
    for i, n in enumerate(names):
        found = [] if lesions is not None else None
        for k, v in brats2023.region_scores(p[i], g[i], spacing, task, lesions=found).items():
            out[f"brats2023_{k}_{n.lower()}"] = v
        if found is not None:
            lesions.extend((n, lesion) for lesion in found)
    return out


def brats2025_scores(pred: np.ndarray, ref: np.ndarray, convention: str, spacing) -> dict:
    """{"brats2025_dice_et": ..., "brats2025_lw_dice_et": ..., "brats2025_f1_et": ..., ...} per scorer region of two
    uint8 label maps (X, Y, Z) on one grid of voxel size ``spacing`` (mm per axis)."""
    names = brats2025_regions(convention)
    p, g = region_masks(pred, convention, names), region_masks(ref, convention, names)
    out = {}
    for i, n in enumerate(names):
        for k, v in brats2025.region_scores(p[i], g[i], spacing).items():
            out[f"brats2025_{k}_{n.lower()}"] = v
    return out


@dataclass(frozen=True)
class Family:
    """A scorer family: its name (``--metrics``), what it is (``--help``), its scores of one case (``score``:
    pred, ref, convention, spacing, task, lesions -> {column: value}), its columns for a convention, and the
    columns the reports lead with: its Dice and its distance per region (``{r}``: the region, lower case)."""

    name: str
    description: str
    score: Callable
    columns: Callable
    headline: str
    headline_name: str
    distance: str


def _legacy_columns(convention: str) -> list[str]:
    names = [n.lower() for n in trainable_regions(convention)]
    return [f"dice_{n}" for n in names] + [f"hd95_{n}" for n in names]


REGISTRY = {f.name: f for f in (
    Family("legacy", "BraTS 2017-2021: Dice and HD95 per region over the whole case",
           lambda pred, ref, conv, spacing, task, lesions: legacy_scores(pred, ref, conv, spacing),
           _legacy_columns, "dice_{r}", "legacy Dice", "hd95_{r}"),
    Family("brats2023", "the 2023 lesion-wise ranking: lesions merged by dilation, many-to-one hits, small lesions "
           "left out, false positives penalised; per-task parameters",
           brats2023_scores,
           lambda conv: [f"brats2023_{k}_{n.lower()}" for k in BRATS2023_FIELDS for n in brats2023.REGIONS],
           "brats2023_dice_{r}", "brats2023 lesion-wise Dice", "brats2023_hd95_{r}"),
    Family("brats2025", "the 2024-25 scorer on panoptica: one-to-one matching, lesion-wise Dice of matched lesions, "
           "detection F1, global Dice/NSD/HD95",
           lambda pred, ref, conv, spacing, task, lesions: brats2025_scores(pred, ref, conv, spacing),
           lambda conv: [f"brats2025_{k}_{n.lower()}" for k in brats2025.FIELDS for n in brats2025_regions(conv)],
           "brats2025_lw_dice_{r}", "brats2025 lesion-wise Dice (sq_dsc)", "brats2025_hd95_{r}"),
)}
assert tuple(REGISTRY) == FAMILIES


def score_case(pred: np.ndarray, ref: np.ndarray, convention: str, spacing, families=FAMILIES,
               case: str = "", task: str = "gli", lesions: list | None = None) -> dict:
    """Every requested family's scores of a predicted uint8 label map (X, Y, Z) against the reference on the same grid,
    distances in mm of voxels of ``spacing`` (mm per axis); ``task`` chooses the brats2023 parameters;
    ``lesions`` (a list) receives (region, Lesion) of the brats2023 family."""
    where = f"case {case}: " if case else ""
    if pred.shape != ref.shape:
        raise ScoringError(f"{where}prediction {pred.shape} and reference {ref.shape} are on different grids")
    check_labels(pred, convention, f"{where}the prediction")
    check_labels(ref, convention, f"{where}the reference")
    out = {}
    for name, family in REGISTRY.items():
        if name in families:
            out.update(family.score(pred, ref, convention, spacing, task, lesions))
    return out


def score_columns(convention: str, families=FAMILIES) -> list[str]:
    """The score columns of ``score_case`` for a convention, in a stable order."""
    return [c for name, family in REGISTRY.items() if name in families for c in family.columns(convention)]
