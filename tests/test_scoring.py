"""Scoring as the BraTS challenge scores: from the saved label maps, lesion-wise with panoptica, BraTS 2024 labels."""

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from medpy.metric.binary import hd95 as medpy_hd95
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from evaluate import brats2025
from evaluate.cli import main as eval_main
from evaluate.metrics import HD95_EMPTY_PENALTY_MM
from evaluate.scoring import ScoringError, brats2023_scores, brats2025_regions, score_case
from store import open_store
from store.conventions import (
    ConventionError,
    convention_for_labels,
    label_values,
    region_masks,
    regions_to_label,
    trainable_regions,
)
from train.cli import main as train_main

TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--workers", "0"]


def _independent_brats2025(pred, ref, spacing):
    """The 2024-25 scorer's lesion-wise fields without panoptica: scipy's 26-connected components, the one-to-one
    assignment maximising the summed Dice over overlapping pairs, medpy's HD95 per matched pair."""
    s = np.ones((3, 3, 3))
    lp, n_p = ndimage.label(pred, s)
    lr, n_r = ndimage.label(ref, s)
    dice = np.zeros((n_r, n_p))
    for i in range(n_r):
        for j in range(n_p):
            a, b = lr == i + 1, lp == j + 1
            dice[i, j] = 2 * (a & b).sum() / (a.sum() + b.sum())
    matched = []
    if n_r and n_p:
        rows, cols = linear_sum_assignment(-dice)
        matched = [(i, j) for i, j in zip(rows, cols) if dice[i, j] > 1e-6]
    tp = len(matched)
    fn, fp = n_r - tp, n_p - tp
    lw_dice = np.mean([dice[i, j] for i, j in matched]) if tp else 0.0
    lw_hd95 = (np.mean([medpy_hd95(lp == j + 1, lr == i + 1, voxelspacing=spacing) for i, j in matched]) if tp
               else HD95_EMPTY_PENALTY_MM)
    f1 = tp / (tp + 0.5 * (fp + fn)) if tp else 0.0
    glob = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    overlap = (pred & ref).any()
    return {"lw_dice": lw_dice, "lw_hd95": lw_hd95, "tp": tp, "fp": fp, "fn": fn, "f1": f1, "dice": glob,
            "lw_dice_std": float(np.std([dice[i, j] for i, j in matched])) if tp else float("nan"),
            "lw_nsd": float(np.mean([_nsd(lp == j + 1, lr == i + 1, spacing, min(spacing)) for i, j in matched]))
            if tp else 0.0,
            "nsd": _nsd(pred, ref, spacing, 0.5 * min(spacing)) if overlap else 0.0,
            "hd95": medpy_hd95(pred, ref, voxelspacing=spacing) if overlap else HD95_EMPTY_PENALTY_MM}


def _border_distances(a, b, spacing):
    """For each border voxel of ``a`` (voxels with a 6-neighbour outside), the distance in mm to the border of
    ``b``: scipy's Euclidean distance transform, as the surface-distance definitions take it."""
    cross = ndimage.generate_binary_structure(3, 1)
    a_border = a & ~ndimage.binary_erosion(a, cross)
    b_border = b & ~ndimage.binary_erosion(b, cross)
    return ndimage.distance_transform_edt(~b_border, sampling=spacing)[a_border]


def _nsd(pred, ref, spacing, tolerance):
    """Normalized surface Dice at ``tolerance`` mm: the share of both borders within it of the other border."""
    d_ref, d_pred = _border_distances(ref, pred, spacing), _border_distances(pred, ref, spacing)
    return float(((d_ref <= tolerance).sum() / d_ref.size + (d_pred <= tolerance).sum() / d_pred.size) / 2)


def _blob(shape, centre, radii):
    g = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (((g - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1


SHAPE = (48, 44, 30)


def _cases():
    a = _blob(SHAPE, (12, 12, 10), (6, 5, 4))
    b = _blob(SHAPE, (32, 30, 18), (5, 6, 4))
    c = _blob(SHAPE, (38, 10, 24), (3, 3, 2))
    shifted = np.roll(a, (1, 2, 0), (0, 1, 2))
    return {
        "several lesions": (shifted | np.roll(b, (0, -1, 1), (0, 1, 2)), a | b),
        "a missed lesion": (shifted, a | b | c),
        "a spurious lesion": (shifted | c | b, a | b),
        "one split in two": (a & (np.arange(SHAPE[0]) < 12)[:, None, None] | a & (np.arange(SHAPE[0]) > 13)[:, None,
                                                                                                             None], a),
        "only prediction": (a, np.zeros(SHAPE, bool)),
        "both empty": (np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)),
    }


@pytest.mark.parametrize("name", [n for n in _cases() if n != "both empty"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 2.5, 2.5), (0.9, 1.1, 3.0)])
def test_brats2025_matches_an_independent_computation(name, spacing):
    pred, ref = _cases()[name]
    got = brats2025.region_scores(pred, ref, spacing)
    want = _independent_brats2025(pred, ref, spacing)
    assert {k: got[k] for k in ("tp", "fp", "fn")} == {k: want[k] for k in ("tp", "fp", "fn")}
    for k in ("lw_dice", "f1", "dice"):
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert got["lw_hd95"] == pytest.approx(want["lw_hd95"], abs=0.01)  # mm on every grid, not voxels
    for k in ("lw_nsd", "nsd", "lw_dice_std"):  # the distance fields and the spread, beyond the 0/1 edge cases
        assert got[k] == pytest.approx(want[k], abs=1e-6, nan_ok=True), k
    assert got["hd95"] == pytest.approx(want["hd95"], abs=0.01)
    tp, fp, fn = want["tp"], want["fp"], want["fn"]
    assert got["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else float("nan"), nan_ok=True)
    assert got["recall"] == pytest.approx(tp / (tp + fn) if tp + fn else float("nan"), nan_ok=True)


def test_brats2025_edge_cases():
    c = _cases()
    both = brats2025.region_scores(*c["both empty"], 1)
    assert (both["tp"], both["fp"], both["fn"]) == (0, 0, 0)
    assert all(np.isnan(both[k]) for k in brats2025.FIELDS if k not in ("tp", "fp", "fn"))  # no instances: NaN
    only = brats2025.region_scores(*c["only prediction"], 1)  # zero matched: Dice and NSD 0, HD95 infinite
    assert (only["lw_dice"], only["lw_nsd"], only["lw_hd95"], only["dice"], only["hd95"]) == \
        (0.0, 0.0, HD95_EMPTY_PENALTY_MM, 0.0, HD95_EMPTY_PENALTY_MM)
    assert only["fp"] == 1 and only["f1"] == 0.0 and only["precision"] == 0.0 and np.isnan(only["recall"])
    same = brats2025.region_scores(c["several lesions"][1], c["several lesions"][1], (1, 1, 1))
    assert (same["lw_dice"], same["lw_nsd"], same["nsd"], same["hd95"], same["f1"]) == (1.0, 1.0, 1.0, 0.0, 1.0)


def test_brats2025_regions_per_convention():
    assert brats2025_regions("brats2021") == ("NCR", "ED", "ET", "TC", "WT")
    assert brats2025_regions("brats2023") == ("NETC", "SNFH", "ET", "TC", "WT")
    assert brats2025_regions("brats2024") == ("NETC", "SNFH", "ET", "RC", "TC", "WT")


def test_regions_come_from_the_label_map_by_one_rule():
    rng = np.random.default_rng(0)
    for conv, values in (("brats2021", (0, 1, 2, 4)), ("brats2023", (0, 1, 2, 3)), ("brats2024", (0, 1, 2, 3, 4))):
        label = rng.choice(values, size=(6, 7, 5)).astype(np.uint8)
        names = trainable_regions(conv)
        r = region_masks(label, conv, names)
        c = {"brats2021": (1, 2, 4), "brats2023": (1, 2, 3), "brats2024": (1, 2, 3)}[conv]
        np.testing.assert_array_equal(r[0], np.isin(label, (c[0], c[2])))  # TC
        np.testing.assert_array_equal(r[1], np.isin(label, c))  # WT: the cavity is not tumour
        np.testing.assert_array_equal(r[2], label == c[2])  # ET
        np.testing.assert_array_equal(regions_to_label(r, conv, names), label)  # and back, exactly
        import torch

        t = region_masks(torch.from_numpy(label)[None, None], conv, names)
        np.testing.assert_array_equal(t[0].numpy(), r)  # torch and numpy agree
    assert trainable_regions("brats2024") == ("TC", "WT", "ET", "RC")


def test_label_convention_detection_and_bad_labels():
    assert convention_for_labels("brats2023", {0, 1, 2, 3}) == "brats2023"
    assert convention_for_labels("brats2023", {0, 2, 4}) == "brats2024"
    assert convention_for_labels("brats2021", {0, 1, 2, 4}) == "brats2021"
    with pytest.raises(ConventionError, match=r"\[5\]"):
        convention_for_labels("brats2023", {0, 5})
    with pytest.raises(ConventionError, match=r"\[3\]"):
        convention_for_labels("brats2021", {0, 3})
    ok = np.zeros((4, 4, 4), np.uint8)
    bad = ok.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(ScoringError, match="case X: the prediction has label values \\[3\\]"):
        score_case(bad, ok, "brats2021", (1, 1, 1), case="X")
    with pytest.raises(ScoringError, match="case X: the reference"):
        score_case(ok, bad, "brats2021", (1, 1, 1), case="X")


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def scored_run(tiny_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), *TINY_NET, "--epochs", "2", "--lr", "0.01"]) == 0
    assert eval_main(["--run-dir", str(run), "--save-predictions"]) == 0
    return run


def test_scores_are_those_of_the_saved_files(scored_run, tiny_store):
    s = open_store(tiny_store)
    with open(scored_run / "eval" / "test.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows
    for row in rows:
        cid = row["case"]
        pred_img = nib.load(scored_run / "eval" / "pred" / f"{cid}.nii.gz")
        pred = np.asanyarray(pred_img.dataobj)
        ref = np.asanyarray(nib.load(Path(s.attrs["source"]) / cid / f"{cid}_seg.nii.gz").dataobj)
        spacing = pred_img.header.get_zooms()[:3]
        p, g = region_masks(pred, "brats2021"), region_masks(ref, "brats2021")
        for i, r in enumerate(("tc", "wt", "et")):
            inter = (p[i] & g[i]).sum()
            den = p[i].sum() + g[i].sum()
            d = 1.0 if den == 0 else 2 * inter / den
            assert float(row[f"dice_{r}"]) == pytest.approx(d, abs=1e-6)
            if p[i].any() and g[i].any():
                assert float(row[f"hd95_{r}"]) == pytest.approx(medpy_hd95(p[i], g[i], voxelspacing=spacing),
                                                                abs=0.01)
        assert int(row["voxels_pred_wt"]) == int(p[1].sum())  # the same WT the file holds
        b23 = brats2023_scores(pred, ref, "brats2021", spacing, "gli")
        for k in ("brats2023_dice_et", "brats2023_dice_wt", "brats2023_fp_tc"):
            assert float(row[k]) == pytest.approx(b23[k], abs=1e-9)
        b25 = brats2025.region_scores(p[1], g[1], spacing)
        assert float(row["brats2025_lw_dice_wt"]) == pytest.approx(b25["lw_dice"], nan_ok=True)


def test_metrics_flag_chooses_the_families(scored_run, capsys):
    assert eval_main(["--run-dir", str(scored_run), "--metrics", "legacy"]) == 0
    header = (scored_run / "eval" / "test.csv").read_text().splitlines()[0].split(",")
    assert "dice_wt" in header and not any(c.startswith("brats") for c in header)
    assert eval_main(["--run-dir", str(scored_run), "--metrics", "brats2023", "brats2025"]) == 0
    header = (scored_run / "eval" / "test.csv").read_text().splitlines()[0].split(",")
    assert {"brats2023_dice_wt", "brats2023_fn_et", "brats2025_lw_dice_wt", "brats2025_f1_et",
            "brats2025_nsd_ncr"} <= set(header) and "dice_wt" not in header
    summary = json.loads((scored_run / "eval" / "test.json").read_text())
    assert summary["tasks"] == {"gli": summary["cases"]}
    assert summary["conventions"]["brats2023_tasks"]["met"] == {"dilation": 1, "threshold_mm3": 2.0}
    assert "brats2023" in capsys.readouterr().out
    for bad in (["--metrics", "lesionwise"], ["--task", "lung"]):
        with pytest.raises(SystemExit) as e:
            eval_main(["--run-dir", str(scored_run), *bad])
        assert e.value.code == 2 and bad[0] in capsys.readouterr().err


def test_a_store_in_another_label_convention_is_refused(scored_run, tiny_cohort_2023, tmp_path, capsys):
    from prep.build import BuildConfig, build_store

    from .conftest import TINY
    from .helpers import synth_spacing

    store = tmp_path / "s2023.zarr"
    assert build_store(BuildConfig(source=str(tiny_cohort_2023), store=str(store), workers=0,
                                   spacing=synth_spacing(TINY)), progress=False).ok
    assert eval_main(["--run-dir", str(scored_run), "--store", str(store), "--split", "train"]) == 2
    assert "trained on brats2021 labels" in capsys.readouterr().err


def test_brats2024_cohort_stores_trains_with_rc_and_scores_it(tmp_path):
    from prep.build import BuildConfig, build_store
    from prep.synth import SynthConfig, synth_cohort

    from .conftest import TINY
    from .helpers import synth_spacing

    raw = tmp_path / "raw"
    synth_cohort(SynthConfig(out=raw, cases=6, seed=5, shape=TINY, layout="brats2024"), progress=False)
    assert next(raw.glob("*/*-t1n.nii.gz"))  # BraTS 2023 file names
    store = tmp_path / "s.zarr"
    rep = build_store(BuildConfig(source=str(raw), store=str(store), workers=0, spacing=synth_spacing(TINY)),
                      progress=False)
    assert rep.ok, rep.failed
    s = open_store(store)
    assert s.label_convention == "brats2024"
    assert any(s.case(c).meta["label_counts"].get("4", 0) > 0 for c in s.case_ids), "no cavity synthesized"
    run = tmp_path / "run"
    assert train_main(["--store", str(store), "--run-dir", str(run), *TINY_NET, "--epochs", "1",
                       "--regions", "TC", "WT", "ET", "RC"]) == 0
    assert set(json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["dice"]) == {"TC", "WT", "ET", "RC"}
    assert eval_main(["--run-dir", str(run), "--save-predictions", "--split", "train"]) == 0
    header = (run / "eval" / "train.csv").read_text().splitlines()[0].split(",")
    assert {"dice_rc", "hd95_rc", "brats2025_lw_dice_rc", "brats2025_lw_dice_netc", "brats2025_dice_snfh",
            "brats2023_dice_wt"} <= set(header)
    for f in (run / "eval" / "pred").glob("*.nii.gz"):
        assert set(np.unique(np.asanyarray(nib.load(f).dataobj)).tolist()) <= {0, 1, 2, 3, 4}
    # a 2021 store has no cavity to train
    rc = train_main(["--store", str(store), "--run-dir", str(tmp_path / "r2"), *TINY_NET, "--epochs", "1",
                     "--regions", "TC", "WT", "ET", "NETC"])
    assert rc == 2


def test_regions_flag_is_checked_against_the_store(tiny_store, tmp_path, capsys):
    rc = train_main(["--store", tiny_store, "--run-dir", str(tmp_path / "r"), *TINY_NET, "--epochs", "1",
                     "--regions", "TC", "WT", "ET", "RC"])
    assert rc == 2 and "brats2021 store trains TC, WT, ET" in capsys.readouterr().err
    rc = train_main(["--store", tiny_store, "--run-dir", str(tmp_path / "r"), *TINY_NET, "--epochs", "1",
                     "--regions", "WT", "TC", "ET"])
    assert rc == 2 and "--regions must start with TC WT ET" in capsys.readouterr().err


def test_a_2023_cohort_without_cavities_stays_2023(tiny_cohort_2023, tmp_path):
    from prep.build import BuildConfig, build_store

    from .conftest import TINY
    from .helpers import synth_spacing

    shutil.copytree(tiny_cohort_2023, tmp_path / "raw")
    rep = build_store(BuildConfig(source=str(tmp_path / "raw"), store=str(tmp_path / "s.zarr"), workers=0,
                                  spacing=synth_spacing(TINY)), progress=False)
    assert rep.ok and open_store(tmp_path / "s.zarr").label_convention == "brats2023"


def test_monai_dice_on_the_cropped_regions_equals_the_whole_grid():
    import torch
    from monai.metrics import DiceMetric

    from evaluate.metrics import monai_dice_inputs

    rng = np.random.default_rng(0)
    for _ in range(20):  # some regions empty on one side or both
        p, g = np.zeros((3, 30, 32, 20), bool), np.zeros((3, 30, 32, 20), bool)
        for r in range(3):
            for m, size in ((p, (8, 6, 5)), (g, (7, 9, 4))):
                if rng.random() < 0.75:
                    a = rng.integers(0, 20, 3)
                    m[r, a[0]:a[0] + size[0], a[1]:a[1] + size[1], a[2]:a[2] + size[2]] = True
        whole, cropped = (DiceMetric(include_background=True, reduction="mean") for _ in range(2))
        whole(torch.from_numpy(p[None].astype(np.float32)), torch.from_numpy(g[None].astype(np.float32)))
        cropped(*monai_dice_inputs(p, g))
        a, b = float(whole.aggregate()), float(cropped.aggregate())
        assert (np.isnan(a) and np.isnan(b)) or a == b
    assert monai_dice_inputs(p, g)[0].shape[2:] != p.shape[1:]  # it did crop


def test_present_values_counts_eight_bit_maps():
    from evaluate.scoring import present_values

    a = np.zeros((5, 4, 3), np.uint8)
    a[1, 1, 1], a[2, 2, 2] = 4, 255
    assert present_values(a) == {0, 4, 255} == present_values(a.astype(np.int16))


def test_bounding_box_is_the_box_of_every_voxel_widened_and_clipped():
    from evaluate.metrics import bounding_box

    rng = np.random.default_rng(1)
    for _ in range(100):
        m = rng.random(tuple(rng.integers(1, 12, 3))) < rng.uniform(0.01, 0.3)
        if m.any():
            idx, k = np.argwhere(m), int(rng.integers(0, 4))
            lo, hi = np.maximum(idx.min(0) - k, 0), np.minimum(idx.max(0) + k + 1, m.shape)
            assert bounding_box(m, k) == tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


@pytest.mark.parametrize("convention", ["brats2021", "brats2023", "brats2024"])
def test_the_family_registry_names_every_column_a_family_scores(convention):
    """One registry (evaluate.scoring.REGISTRY) behind score_case, score_columns and the reports' headline and
    distance columns: for every subset of families, the columns score_case fills are score_columns' exactly."""
    import itertools

    from evaluate.scoring import FAMILIES, REGISTRY, score_columns

    rng = np.random.default_rng(0)
    values = np.array(label_values(convention), np.uint8)
    ref = values[rng.integers(0, len(values), (12, 12, 10))]
    pred = np.roll(ref, 1, axis=0)
    for k in range(1, len(FAMILIES) + 1):
        for families in itertools.combinations(FAMILIES, k):
            scores = score_case(pred, ref, convention, (1.0, 1.0, 1.0), families)
            assert sorted(scores) == sorted(score_columns(convention, families)), families
    for family in REGISTRY.values():
        cols = family.columns(convention)
        for region in ("tc", "wt", "et"):
            assert family.headline.format(r=region) in cols and family.distance.format(r=region) in cols
