"""Dice and HD95 per region with the BraTS conventions.

- Dice = 2 |P & G| / (|P| + |G|). Both empty: 1. Exactly one empty: 0.
- HD95: the 95th percentile of the pooled symmetric surface distances in mm (medpy.metric.binary.hd95's
  definition: surface = mask minus its erosion (connectivity 1), distances by the Euclidean distance transform
  with the voxel spacing). Both empty: 0. Exactly one empty: 373.13 mm (the BraTS penalty).
"""

from __future__ import annotations

import numpy as np

HD95_EMPTY_PENALTY_MM = 373.13
CONVENTIONS = {
    "dice": "2|P&G|/(|P|+|G|); both empty -> 1, one empty -> 0",
    "hd95": "95th percentile of pooled symmetric surface distances in mm (medpy.metric.binary.hd95); "
            "both empty -> 0, one empty -> 373.13 mm",
    "regions": "TC = NCR/NETC + ET, WT = all tumour labels, ET = enhancing; prediction = sigmoid > 0.5",
}


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two masks of one grid (any axes, usually X, Y, Z): 2|P and G| / (|P| + |G|); both empty: 1, one empty:
    0."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    sp, sg = int(p.sum()), int(g.sum())
    if sp == 0 and sg == 0:
        return 1.0
    return 2.0 * int((p & g).sum()) / (sp + sg)


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from the surface voxels of ``a`` to the nearest surface voxel of ``b``."""
    from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

    fp = generate_binary_structure(a.ndim, 1)
    a_border = a ^ binary_erosion(a, structure=fp, iterations=1)
    b_border = b ^ binary_erosion(b, structure=fp, iterations=1)
    dt = distance_transform_edt(~b_border, sampling=spacing)
    return dt[a_border]


def voxel_mm3(spacing) -> float:
    """The volume of one voxel of a 3D grid, in mm^3 (``spacing``: one size or three)."""
    return float(np.prod(np.broadcast_to(np.asarray(spacing, float), (3,))))


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask (any axes) widened by ``margin`` voxels, clipped to the array."""
    m = np.asarray(mask, bool)
    out = []
    for axis in range(m.ndim):  # one projection per axis: a fraction of listing every voxel (np.argwhere)
        nz = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
        out.append(slice(max(int(nz[0]) - margin, 0), min(int(nz[-1]) + margin + 1, m.shape[axis])))
    return tuple(out)


def cropped_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks (not both empty) cut to the bounding box of both plus one voxel and padded by one more
    voxel of background: the same components, surfaces and distances as the whole volume, a fraction of it (the
    padding keeps erosion at the box edge what it is in the whole volume)."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    box = bounding_box(p | g, 1)
    pad = [(1, 1)] * p.ndim
    return np.pad(p[box], pad), np.pad(g[box], pad)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """(pred surface -> gt surface, gt surface -> pred surface) distances in mm of two non-empty masks."""
    pb, gb = cropped_pair(pred, gt)
    spacing = np.broadcast_to(np.asarray(spacing, float), (pb.ndim,))
    return _surface_distances(pb, gb, spacing), _surface_distances(gb, pb, spacing)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """HD95 in mm of two masks (X, Y, Z) on one grid of voxel size ``spacing`` (mm per axis): the 95th percentile of the
    pooled symmetric surface distances (medpy's hd95); both empty: 0, one empty: the BraTS penalty of 373.13 mm."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    ep, eg = not p.any(), not g.any()
    if ep and eg:
        return 0.0
    if ep or eg:
        return HD95_EMPTY_PENALTY_MM
    return float(np.percentile(np.concatenate(surface_distances(p, g, spacing)), 95))


def monai_dice_inputs(pred_regions: np.ndarray, ref_regions: np.ndarray):
    """(prediction, reference) float32 tensors (1, R, ...) for MONAI's DiceMetric from boolean region masks
    (R, X, Y, Z), cut to the box around every region of both: the same figures as on the whole grid (nothing lies
    outside it), at a fraction of the cost on full-size cases."""
    import torch

    anywhere = (pred_regions | ref_regions).any(0)
    box = bounding_box(anywhere, 0) if anywhere.any() else (slice(0, 1),) * anywhere.ndim
    p, g = pred_regions[(slice(None), *box)], ref_regions[(slice(None), *box)]
    return (torch.from_numpy(np.ascontiguousarray(p[None], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(g[None], dtype=np.float32)))
