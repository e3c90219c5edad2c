"""The brats2023 family against an independent implementation written here as the challenge's published scorer
works (cc3d components, scipy dilations over the whole volume, the surface-distance package's robust Hausdorff
distance on the whole volume), on the situations that make it differ from plain matching and on fuzzed
multi-lesion label maps, plus hand-counted expectations."""

import cc3d
import numpy as np
import pytest
import surface_distance
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
        h = float(surface_distance.compute_robust_hausdorff(surface_distance.compute_surface_distances(
            m, hp, spacing), 95))
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
    assert got["hd95"] == pytest.approx(h, abs=0.01)  # mm, on any grid


def _fuzzed_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A multi-lesion reference (2 to 5 blobs, some close enough to merge, some under the volume threshold) and a
    prediction made from it: blobs shifted, grown or shrunk, one dropped now and then, false specks added."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1).astype(float)

    def blob(centre, radii):
        return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0

    ref, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    for _ in range(int(rng.integers(2, 6))):
        centre = rng.uniform([6, 6, 5], [n - 6 for n in SHAPE])
        radii = rng.uniform(1.0, 6.0, 3)
        ref |= blob(centre, radii)
        if rng.random() < 0.85:  # found, somewhat off
            pred |= blob(centre + rng.normal(0, 1.2, 3), radii * rng.uniform(0.7, 1.3, 3))
    for _ in range(int(rng.integers(0, 3))):  # specks where there is no lesion
        pred |= blob(rng.uniform([3, 3, 3], [n - 3 for n in SHAPE]), rng.uniform(0.8, 2.0, 3))
    return pred, ref


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.1, 3.0)])
def test_fuzzed_multi_lesion_maps_equal_the_independent_implementation(seed, spacing):
    pred, ref = _fuzzed_pair(seed)
    for task in ("gli", "met"):
        got = region_scores(pred, ref, spacing, task)
        d, h, tp, fp, fn = _independent(pred, ref, spacing, *TASK_PARAMS[task])
        assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn)
        assert got["dice"] == pytest.approx(d, abs=1e-6)
        assert got["hd95"] == pytest.approx(h, abs=0.01)


def test_hd95_weighs_surface_elements_by_their_area():
    """A pair where weighing every surface voxel equally (the percentile of plain point distances) gives another
    HD95 than the area-weighted one the challenge's package computes, and the scorer gives the package's."""
    from evaluate.metrics import surface_distances

    pred, ref = _fuzzed_pair(3)
    p, g = np.isin(cc3d.connected_components(pred, connectivity=26), [1]), ref
    weighted = surface_distance.compute_robust_hausdorff(surface_distance.compute_surface_distances(g, p, (1, 1, 1)),
                                                         95)
    a, b = surface_distances(p, g, (1, 1, 1))
    plain = max(np.percentile(a, 95), np.percentile(b, 95))
    assert abs(weighted - plain) > 0.01
    from evaluate.brats2023 import robust_hd95

    assert robust_hd95(p, g, (1, 1, 1)) == pytest.approx(weighted, abs=1e-9)


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
