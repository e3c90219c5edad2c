"""The brats2023 family against an independent implementation written here from the challenge's published
description (cc3d components, scipy dilations over the whole volume, MONAI's percentile Hausdorff distance), on
the situations that make it differ from plain matching, plus hand-counted expectations."""

import cc3d
import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from evaluate.brats2023 import HD95_PENALTY_MM, TASK_PARAMS, region_scores
from evaluate.scoring import brats2023_scores
from store.conventions import region_masks, task_of

SHAPE = (56, 48, 32)


def _independent(pred, ref, spacing, dil, thresh):
    """(dice, hd95, tp, fp, fn) of one region, step by step as the description states, on the whole volume."""
    pred, ref = pred.astype(np.uint8), ref.astype(np.uint8)
    element = ndimage.generate_binary_structure(3, 2)  # 18-connected 3x3x3
    ref_cc = cc3d.connected_components(ref, connectivity=26)
    dilated_cc = cc3d.connected_components(ndimage.binary_dilation(ref, element, iterations=dil).astype(np.uint8),
                                           connectivity=26)
    lesions = {}
    for comp in range(1, int(ref_cc.max()) + 1):  # a reference component joins the dilated component it lies in
        lab = int(np.unique(dilated_cc[ref_cc == comp])[0])
        lesions[lab] = lesions.get(lab, np.zeros(ref.shape, bool)) | (ref_cc == comp)
    pred_cc = cc3d.connected_components(pred, connectivity=26)
    voxel = float(np.prod(spacing))
    touched, kept = set(), []
    for m in lesions.values():
        zone = ndimage.binary_dilation(m, element, iterations=dil)
        hits = set(np.unique(pred_cc[zone]).tolist()) - {0}
        touched |= hits
        if m.sum() * voxel <= thresh:
            continue
        if not hits:
            kept.append((0.0, HD95_PENALTY_MM, False))
            continue
        hp = np.isin(pred_cc, list(hits))
        d = 2 * (hp & m).sum() / (hp.sum() + m.sum())
        h = float(compute_hausdorff_distance(torch.from_numpy(hp[None, None]), torch.from_numpy(m[None, None]),
                                             include_background=True, percentile=95, spacing=spacing))
        kept.append((d, h, True))
    fp = int(pred_cc.max()) - len(touched)
    n = len(kept) + fp
    if n == 0:
        return 1.0, 0.0, 0, 0, 0
    tp = sum(1 for k in kept if k[2])
    return (sum(k[0] for k in kept) / n, (sum(k[1] for k in kept) + HD95_PENALTY_MM * fp) / n, tp, fp,
            len(kept) - tp)


def _box(lo, hi):
    m = np.zeros(SHAPE, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# Reference lesions: A and B three voxels apart (one lesion once dilated 3 times, two once dilated once), C a
# 27 mm^3 speck (under the 50 mm^3 threshold, over MET's 2), D and E far apart from each other and the rest.
A, B = _box((4, 4, 4), (12, 12, 10)), _box((15, 4, 4), (19, 12, 10))
C = _box((30, 30, 22), (33, 33, 25))
D, E = _box((40, 4, 4), (48, 10, 10)), _box((40, 30, 4), (48, 40, 10))
REF = A | B | C | D | E


def _scenarios():
    return {
        # A and B predicted as one shifted blob; C hit; one bar across D and E (touching both: one component, two
        # hits); a speck inside E's dilation but outside E (a hit, not a false positive); a speck far from all (FP)
        "merged, spanning, specks": (np.roll(A | B, 1, 0) | _box((30, 30, 21), (32, 32, 23))
                                     | _box((43, 6, 6), (45, 36, 8)) | _box((40, 41, 5), (41, 42, 6))
                                     | _box((26, 44, 28), (28, 46, 30)), REF),
        "C missed, D missed": (A | B | E, REF),
        "only C, hit": (C, C),
        "only C, missed": (np.zeros(SHAPE, bool), C),
        "only C, with a false positive": (_box((2, 40, 2), (4, 42, 4)), C),
        "prediction only": (D, np.zeros(SHAPE, bool)),
        "both empty": (np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)),
    }


@pytest.mark.parametrize("name", list(_scenarios()))
@pytest.mark.parametrize("task", list(TASK_PARAMS))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.1, 3.0)])
def test_equals_the_independent_implementation(name, task, spacing):
    pred, ref = _scenarios()[name]
    got = region_scores(pred, ref, spacing, task)
    d, h, tp, fp, fn = _independent(pred, ref, spacing, *TASK_PARAMS[task])
    assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn)
    assert got["dice"] == pytest.approx(d, abs=1e-6)
    # HD95 to 0.5 mm on 1 mm grids (surface-distance details differ between implementations), in mm on any grid
    assert got["hd95"] == pytest.approx(h, abs=0.5 if spacing == (1.0, 1.0, 1.0) else 1.5)


def test_hand_counted_expectations():
    pred, ref = _scenarios()["merged, spanning, specks"]
    gli = region_scores(pred, ref, 1, "gli")
    # A+B merged (dil 3) and D, E kept; C (27 mm^3) left out although hit; the far speck is the one FP
    assert (gli["tp"], gli["fp"], gli["fn"]) == (3, 1, 0)
    men = region_scores(pred, ref, 1, "men")
    # dil 1: A and B are two lesions (one shifted blob hits both), and the speck two voxels from E lies outside E's
    # single dilation: a second false positive
    assert (men["tp"], men["fp"], men["fn"]) == (4, 2, 0)
    met = region_scores(pred, ref, 1, "met")
    assert (met["tp"], met["fp"], met["fn"]) == (5, 2, 0)  # MET keeps C (27 > 2 mm^3)
    missed = region_scores(*_scenarios()["C missed, D missed"], 1, "gli")
    assert (missed["tp"], missed["fp"], missed["fn"]) == (2, 0, 1)  # C's miss is not counted, D's is
    assert region_scores(*_scenarios()["only C, missed"], 1, "gli") == {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0,
                                                                         "fn": 0}
    fp_only = region_scores(*_scenarios()["only C, with a false positive"], 1, "gli")
    assert fp_only["dice"] == 0.0 and fp_only["hd95"] == HD95_PENALTY_MM and fp_only["fp"] == 1
    # "at or under" the threshold: 50 mm^3 is left out, 51 mm^3 counts
    fifty, fifty_one = _box((5, 5, 5), (10, 10, 7)), _box((5, 5, 5), (10, 10, 7)) | _box((10, 5, 5), (11, 6, 6))
    empty = np.zeros(SHAPE, bool)
    assert fifty.sum() == 50 and region_scores(empty, fifty, 1, "gli")["fn"] == 0
    assert fifty_one.sum() == 51 and region_scores(empty, fifty_one, 1, "gli")["fn"] == 1
    # the threshold is in mm^3: C is 27 voxels, at 2 mm voxels 216 mm^3, so kept (and missed)
    assert region_scores(*_scenarios()["only C, missed"], (2.0, 2.0, 2.0), "gli")["fn"] == 1


def test_lesion_records_list_every_lesion():
    pred, ref = _scenarios()["merged, spanning, specks"]
    found = []
    region_scores(pred, ref, 1, "gli", lesions=found)
    ref_status = sorted(r.status for r in found if r.side == "reference")
    assert ref_status == ["hit", "hit", "hit", "left out"]
    pred_status = sorted(r.status for r in found if r.side == "predicted")
    assert pred_status.count("false positive") == 1 and len(pred_status) == 6  # A and B shifted: two components
    bar = [r for r in found if r.side == "predicted" and len(r.matches) == 2]
    assert len(bar) == 1  # the bar across D and E hits both


@pytest.mark.parametrize("convention,labels", [("brats2021", (1, 2, 4)), ("brats2024", (1, 2, 3))])
def test_regions_of_each_label_convention(convention, labels):
    ncr, ed, et = labels
    ref = np.zeros(SHAPE, np.uint8)
    ref[A | B] = ed
    ref[_box((6, 6, 6), (10, 10, 8))] = et
    ref[D] = ncr
    pred = np.roll(ref, 1, 1)
    if convention == "brats2024":
        ref[_box((30, 30, 20), (36, 36, 26))] = 4  # the cavity is not tumour: never a WT lesion
    got = brats2023_scores(pred, ref, convention, (1, 1, 1), "gli")
    for region in ("ET", "TC", "WT"):
        p, g = region_masks(pred, convention, (region,))[0], region_masks(ref, convention, (region,))[0]
        assert got[f"brats2023_dice_{region.lower()}"] == pytest.approx(_independent(p, g, (1, 1, 1), 3, 50)[0])
    assert got["brats2023_tp_wt"] == 2 and got["brats2023_fn_wt"] == 0


def test_every_task_the_store_records_has_the_scorers_parameters():
    from store.conventions import TASKS

    assert set(TASK_PARAMS) == set(TASKS)


def test_task_from_the_case_id():
    assert task_of("BraTS-MEN-00004-000") == "men"
    assert task_of("BraTS-MET-00001-000") == "met"
    assert task_of("BraTS-PED-00010-000") == "ped"
    assert task_of("BraTS-SSA-00002-000") == "ssa"
    assert task_of("BraTS-GLI-00000-000") == "gli"
    assert task_of("BraTS2021_00000") == "gli"
    assert task_of("patient7") == "gli"
