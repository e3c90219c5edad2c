"""The BraTS 2023 lesion-wise scorer, written from the challenge's published description (its own code is not a
dependency). For one region's boolean masks on one grid:

1. Reference lesions: the 26-connected components of the reference, merged when they lie in one 26-connected
   component of the reference dilated ``dil`` times with the 18-connected 3x3x3 element.
2. Each reference lesion is dilated the same way; every 26-connected predicted component touching that dilation
   is a hit for it (one component can hit several lesions, several can hit one). The lesion is scored, Dice and
   HD95 in mm, against the union of its hits; a lesion without hits scores Dice 0, HD95 374.
3. Lesions of volume <= ``thresh`` mm^3 are left out of the counts and the score, hit or missed.
4. A predicted component that touches no dilated reference lesion is a false positive (Dice 0, HD95 374),
   whatever its size.
5. Score = sum over the kept lesions / (kept lesions + false positives); with nothing on either side, Dice 1 and
   HD95 0.

Dilations count voxels, volumes are in mm^3 of the grid's own voxels (the challenge assumes 1 mm voxels). HD95 is
the surface-distance package's robust Hausdorff distance (Apache-2.0), as the challenge's scorer calls it: surface
elements weighted by their area, the larger of the two directed 95th percentiles, in mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .metrics import bounding_box, cropped_pair, voxel_mm3

HD95_PENALTY_MM = 374.0
# task -> (dilation iterations, lesion volume threshold in mm^3), as the challenge set them per task; GoAT (the
# generalisability challenge over the glioma-like tasks) is scored as glioma; one entry per store.conventions.TASKS
TASK_PARAMS = {"gli": (3, 50.0), "ssa": (3, 50.0), "ped": (3, 50.0), "men": (1, 50.0), "met": (1, 2.0),
               "goat": (3, 50.0)}
REGIONS = ("ET", "TC", "WT")  # the scorer's regions, in the order it reports them


@dataclass
class Lesion:
    """One reference or predicted lesion of a region: what ``eval/<split>-lesions.csv`` lists."""

    side: str  # "reference" or "predicted"
    index: int  # 1-based, in the scorer's order (reference: merged lesions; predicted: components)
    volume_mm3: float
    status: str  # reference: hit, missed, left out (<= threshold); predicted: hit or false positive
    matches: tuple[int, ...]  # the indices on the other side it hits or is hit by
    dice: float | None
    hd95: float | None


_STRUCT26 = np.ones((3, 3, 3), bool)


def robust_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """HD95 in mm of two non-empty boolean masks (X, Y, Z) on one grid of voxel size ``spacing`` (mm per axis, or one
    for all), as the BraTS 2023 scorer computes it: ``compute_robust_hausdorff(compute_surface_distances(ref, pred,
    spacing), 95)`` of the surface-distance package, on the masks cut to the box around both (the same surfaces)."""
    import surface_distance

    p, g = cropped_pair(pred, ref)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (p.ndim,)))
    distances = surface_distance.compute_surface_distances(g, p, spacing)
    return float(surface_distance.compute_robust_hausdorff(distances, 95))


def _struct18() -> np.ndarray:
    from scipy.ndimage import generate_binary_structure

    return generate_binary_structure(3, 2)


def region_scores(pred: np.ndarray, ref: np.ndarray, spacing, task: str = "gli", with_hd95: bool = True,
                  lesions: list | None = None) -> dict:
    """{"dice", "hd95", "tp", "fp", "fn"} of one region's boolean masks; ``lesions``, when a list, receives a
    ``Lesion`` for every reference and predicted lesion. ``with_hd95=False`` skips the distances (HD95 is NaN)."""
    from scipy.ndimage import binary_dilation, label

    dil, thresh = TASK_PARAMS[task]
    p, g = np.asarray(pred, bool), np.asarray(ref, bool)
    if not p.any() and not g.any():
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0}
    # the bounding box of both, wide enough for every dilation: the same components, hits and distances
    box = bounding_box(p | g, dil + 1)
    p, g = p[box], g[box]
    voxel = voxel_mm3(spacing)
    st18 = _struct18()
    plab, n_pred = label(p, _STRUCT26)
    merged = np.zeros(g.shape, np.int32)
    if g.any():
        dlab, _ = label(binary_dilation(g, st18, iterations=dil), _STRUCT26)
        merged[g] = dlab[g]  # each reference voxel takes the label of its dilated component
    ids = np.unique(merged[merged > 0])
    hit_by: dict[int, set] = {}
    kept_dice, kept_hd, tp, fn = [], [], 0, 0
    ref_records = []
    for k, lid in enumerate(ids, start=1):
        m = merged == lid
        b = bounding_box(m, dil + 1)
        grown = np.zeros_like(m)
        grown[b] = binary_dilation(m[b], st18, iterations=dil)
        hits = tuple(int(v) for v in np.unique(plab[grown]) if v)
        volume = float(m.sum()) * voxel
        if hits:
            pm = np.isin(plab, hits)
            dice = 2.0 * float((pm & m).sum()) / float(pm.sum() + m.sum())
            hd = robust_hd95(pm, m, spacing) if with_hd95 else float("nan")
        else:
            dice, hd = 0.0, HD95_PENALTY_MM if with_hd95 else float("nan")
        for h in hits:
            hit_by.setdefault(h, set()).add(k)
        kept = volume > thresh
        if kept:
            kept_dice.append(dice)
            kept_hd.append(hd)
            tp, fn = tp + bool(hits), fn + (not hits)
        ref_records.append(Lesion("reference", k, volume, ("hit" if hits else "missed") if kept else "left out",
                                  hits, dice, hd))
    fp = n_pred - len(hit_by)
    n = len(kept_dice) + fp
    out = {"dice": float(sum(kept_dice)) / n if n else 1.0,
           "hd95": (float(sum(kept_hd)) + HD95_PENALTY_MM * fp) / n if n else 0.0,
           "tp": tp, "fp": fp, "fn": fn}
    if lesions is not None:
        lesions.extend(ref_records)
        sizes = np.bincount(plab.ravel(), minlength=n_pred + 1)
        for j in range(1, n_pred + 1):
            hit = j in hit_by
            lesions.append(Lesion("predicted", j, float(sizes[j]) * voxel, "hit" if hit else "false positive",
                                  tuple(sorted(hit_by.get(j, ()))), None if hit else 0.0,
                                  None if hit else HD95_PENALTY_MM))
    return out
