"""Scores of a predicted label map against the reference label map, as the BraTS challenge scores them.

Both maps are label maps in one convention (store.conventions); every region is derived from them by the one
rule there, so the scores are those of the very array a prediction file holds. Two families:

- **legacy** (BraTS 2017-2021, region-wise): per region over the whole case, Dice and HD95 (evaluate.metrics).
- **lesionwise** (BraTS 2023+ ranking): each region's connected components (26-connectivity) in prediction and
  reference are matched one to one by maximum bipartite matching on Dice (any overlap can match), computed by
  ``panoptica`` (its ConnectedComponentsInstanceApproximator and MaxBipartiteMatching). Then, with TP matched
  lesions, FN missed reference lesions and FP spurious predicted ones:
  lesion-wise Dice = sum of the TP lesions' Dice / (TP + FN + FP);
  lesion-wise HD95 = (sum of the TP lesions' HD95 + 374 mm x (FN + FP)) / (TP + FN + FP).
  Both empty: Dice 1, HD95 0. HD95 is in mm: panoptica gets the voxel spacing (``voxelspacing``), without which
  it measures in voxels.
"""

from __future__ import annotations

import functools

import numpy as np

from store.conventions import LESIONWISE_REGIONS, label_values, region_masks, trainable_regions

from .metrics import CONVENTIONS as LEGACY_CONVENTIONS
from .metrics import dice, hd95

LESION_HD95_PENALTY_MM = 374.0
FAMILIES = ("legacy", "lesionwise")
CONVENTIONS = {
    **{f"legacy_{k}": v for k, v in LEGACY_CONVENTIONS.items()},
    "legacy_regions": "TC, WT, ET (and RC for BraTS 2024 labels), each over the whole case",
    "lesionwise": "connected components (26-connectivity) of each region, matched one to one by maximum bipartite "
                  "matching on Dice (any overlap can match; panoptica MaxBipartiteMatching); lesion-wise Dice = sum "
                  "of matched lesions' Dice / (TP + FN + FP); lesion-wise HD95 = (sum of matched lesions' HD95 + "
                  "374 mm per missed or spurious lesion) / (TP + FN + FP); both empty -> Dice 1, HD95 0; HD95 in mm "
                  "(the voxel spacing passed to panoptica)",
    "labels": "every score is computed from the label maps: the prediction as written to NIfTI, the reference seg",
}


class ScoringError(ValueError):
    """Inputs that cannot be scored; the message names the case."""


def parse_metrics(name: str) -> tuple[str, ...]:
    """--metrics legacy|lesionwise|both -> the families to compute."""
    if name == "both":
        return FAMILIES
    if name in FAMILIES:
        return (name,)
    raise ScoringError(f"--metrics must be legacy, lesionwise or both, not {name!r}")


def check_labels(label: np.ndarray, convention: str, what: str) -> None:
    """Refuse a label map with values its convention does not have."""
    present = {int(v) for v in np.unique(label)}
    bad = present - set(label_values(convention))
    if bad:
        raise ScoringError(f"{what} has label values {sorted(bad)} outside the {convention} convention "
                           f"{list(label_values(convention))}")


def legacy_regions(convention: str) -> tuple[str, ...]:
    return trainable_regions(convention)


def legacy_scores(pred: np.ndarray, ref: np.ndarray, convention: str, spacing) -> dict:
    """{"dice_tc": ..., "hd95_tc": ..., ...} per legacy region of two label maps."""
    names = legacy_regions(convention)
    p, g = region_masks(pred, convention, names), region_masks(ref, convention, names)
    out = {}
    for i, n in enumerate(names):
        out[f"dice_{n.lower()}"] = dice(p[i], g[i])
        out[f"hd95_{n.lower()}"] = hd95(p[i], g[i], spacing)
    return out


@functools.lru_cache(maxsize=1)
def _evaluator():
    from panoptica import ConnectedComponentsInstanceApproximator, InputType, Metric, Panoptica_Evaluator
    from panoptica.instance_matcher import MaxBipartiteMatching
    from panoptica.utils.citation_reminder import disable_citation_reminder
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling

    disable_citation_reminder()  # once per case would flood the console; the README cites panoptica
    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=0.0),
        instance_metrics=[Metric.DSC, Metric.HD95],
        global_metrics=[Metric.DSC],
        # no matched lesion: the per-lesion lists are empty and unused; the counts carry the penalties
        edge_case_handler=EdgeCaseHandler({m: MetricZeroTPEdgeCaseHandling(no_instances_result=EdgeCaseResult.NAN,
                                                                           default_result=EdgeCaseResult.NAN)
                                           for m in (Metric.DSC, Metric.HD95)}),
        log_times=False,
        verbose=False,
    )


def lesions(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """Lesion-wise Dice and HD95 of one region's boolean masks, with the TP, FP and FN lesion counts."""
    from panoptica import Metric
    from panoptica.metrics import MetricMode

    p, g = np.asarray(pred, bool), np.asarray(ref, bool)
    if not p.any() and not g.any():
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0}
    # the bounding box of both plus a voxel of background: the same components and distances, less work
    idx = np.argwhere(p | g)
    lo, hi = np.maximum(idx.min(0) - 1, 0), np.minimum(idx.max(0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    pad = [(1, 1)] * p.ndim
    pb, gb = np.pad(p[box], pad).astype(np.uint8), np.pad(g[box], pad).astype(np.uint8)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (p.ndim,)))
    (res,) = _evaluator().evaluate(pb, gb, voxelspacing=spacing, verbose=False).values()
    tp, fp, fn = int(res.tp), int(res.fp), int(res.fn)
    tp_dice = res.get_list_metric(Metric.DSC, MetricMode.ALL) if tp else []
    tp_hd95 = res.get_list_metric(Metric.HD95, MetricMode.ALL) if tp else []
    n = tp + fp + fn
    return {"dice": float(np.sum(tp_dice)) / n,
            "hd95": (float(np.sum(tp_hd95)) + LESION_HD95_PENALTY_MM * (fp + fn)) / n,
            "tp": tp, "fp": fp, "fn": fn}


def lesionwise_scores(pred: np.ndarray, ref: np.ndarray, convention: str, spacing) -> dict:
    """{"lw_dice_et": ..., "lw_hd95_et": ..., "lw_tp_et": ..., "lw_fp_et": ..., "lw_fn_et": ...} per region the
    challenge scores lesion-wise for this convention."""
    names = LESIONWISE_REGIONS[convention]
    p, g = region_masks(pred, convention, names), region_masks(ref, convention, names)
    out = {}
    for i, n in enumerate(names):
        for k, v in lesions(p[i], g[i], spacing).items():
            out[f"lw_{k}_{n.lower()}"] = v
    return out


def score_case(pred: np.ndarray, ref: np.ndarray, convention: str, spacing, families=FAMILIES,
               case: str = "") -> dict:
    """Every requested family's scores of a predicted label map against the reference, same grid."""
    where = f"case {case}: " if case else ""
    if pred.shape != ref.shape:
        raise ScoringError(f"{where}prediction {pred.shape} and reference {ref.shape} are on different grids")
    check_labels(pred, convention, f"{where}the prediction")
    check_labels(ref, convention, f"{where}the reference")
    out = {}
    if "legacy" in families:
        out.update(legacy_scores(pred, ref, convention, spacing))
    if "lesionwise" in families:
        out.update(lesionwise_scores(pred, ref, convention, spacing))
    return out


def score_columns(convention: str, families=FAMILIES) -> list[str]:
    """The score columns of ``score_case`` for a convention, in a stable order."""
    cols = []
    if "legacy" in families:
        names = [n.lower() for n in legacy_regions(convention)]
        cols += [f"dice_{n}" for n in names] + [f"hd95_{n}" for n in names]
    if "lesionwise" in families:
        for k in ("dice", "hd95", "tp", "fp", "fn"):
            cols += [f"lw_{k}_{n.lower()}" for n in LESIONWISE_REGIONS[convention]]
    return cols
