"""The BraTS 2024-25 scorer's per-region fields, from panoptica configured as that scorer's glioma configuration
(the scorer's own wrapper package is not a dependency):

- instances: 26-connected components of each region (``ConnectedComponentsInstanceApproximator``);
- matching: one to one, ``MaxBipartiteMatching`` on Dice with threshold 1e-6 (any overlap can match);
- instance metrics Dice, NSD and HD95; lesion-wise Dice is their mean over matched lesions (``sq_dsc``, with its
  std), detection is the F1 of the counts (``rq``), with precision and recall;
- global metrics Dice, NSD and HD95 of the whole region;
- zero matched lesions: Dice and NSD 0, HD95 infinite; no instance on either side: NaN.

Distances are in mm: panoptica gets the voxel spacing. The scorer itself is given none and counts voxels, so the
two agree on 1 mm grids; its NSD tolerances (one voxel per lesion, half a voxel for the whole region) are taken
in mm of the smallest voxel side. Infinite HD95 is reported as 373.13 mm.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

from .metrics import HD95_EMPTY_PENALTY_MM, cropped_pair

FIELDS = ("dice", "nsd", "hd95", "lw_dice", "lw_dice_std", "lw_nsd", "lw_hd95", "tp", "fp", "fn", "precision",
          "recall", "f1")
MATCHING_THRESHOLD = 1e-6


@functools.lru_cache(maxsize=1)
def _evaluator():
    from panoptica import ConnectedComponentsInstanceApproximator, InputType, Metric, Panoptica_Evaluator
    from panoptica.instance_matcher import MaxBipartiteMatching
    from panoptica.utils.citation_reminder import disable_citation_reminder
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling

    disable_citation_reminder()  # once per case would flood the console; the README cites panoptica

    def zero_tp(result):
        return MetricZeroTPEdgeCaseHandling(no_instances_result=EdgeCaseResult.NAN, default_result=result)

    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=MATCHING_THRESHOLD),
        instance_metrics=[Metric.DSC, Metric.NSD, Metric.HD95],
        global_metrics=[Metric.DSC],  # NSD and HD95 of the whole region are taken below, in mm
        edge_case_handler=EdgeCaseHandler({Metric.DSC: zero_tp(EdgeCaseResult.ZERO),
                                           Metric.NSD: zero_tp(EdgeCaseResult.ZERO),
                                           Metric.HD95: zero_tp(EdgeCaseResult.INF)},
                                          empty_list_std=EdgeCaseResult.NAN),
        log_times=False,
        verbose=False,
    )


def _finite(v: float) -> float:
    v = float(v)
    return HD95_EMPTY_PENALTY_MM if math.isinf(v) else v


def _global_surface(p: np.ndarray, g: np.ndarray, spacing: tuple) -> tuple[float, float]:
    """(NSD, HD95) of the whole region in mm, with panoptica's zero-overlap edge cases."""
    from panoptica.metrics._surface_distances import _hd95_from_pair, _nsd_from_pair, _surface_distance_pair

    if not (p & g).any():
        return 0.0, HD95_EMPTY_PENALTY_MM
    sd_ref, sd_pred = _surface_distance_pair(g, p, voxelspacing=spacing)
    with warnings.catch_warnings():  # panoptica warns whenever the tolerance is 0.5, its default: here it is chosen
        warnings.simplefilter("ignore")
        nsd = float(_nsd_from_pair(sd_ref, sd_pred, threshold=0.5 * min(spacing)))
    return nsd, _finite(_hd95_from_pair(sd_ref, sd_pred))


def region_scores(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """Every field of ``FIELDS`` for one region's boolean masks (X, Y, Z) on one grid of voxel size ``spacing`` (mm per
    axis); distances in mm."""
    p, g = np.asarray(pred, bool), np.asarray(ref, bool)
    if not p.any() and not g.any():
        return {f: (0 if f in ("tp", "fp", "fn") else float("nan")) for f in FIELDS}
    pb, gb = cropped_pair(p, g)  # the same components and distances, less work
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (p.ndim,)))
    (res,) = _evaluator().evaluate(pb.astype(np.uint8), gb.astype(np.uint8), voxelspacing=spacing,
                                   verbose=False).values()
    tp, fp, fn = int(res.tp), int(res.fp), int(res.fn)
    nsd, hd = _global_surface(pb, gb, spacing)
    return {
        "dice": float(res.global_bin_dsc), "nsd": nsd, "hd95": hd,
        "lw_dice": float(res.sq_dsc), "lw_dice_std": float(res.sq_dsc_std), "lw_nsd": float(res.sq_nsd),
        "lw_hd95": _finite(res.sq_hd95), "tp": tp, "fp": fp, "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "f1": float(res.rq),
    }
