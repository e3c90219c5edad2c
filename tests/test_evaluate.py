import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from medpy.metric.binary import hd95 as medpy_hd95

from evaluate.cases import regions_on_source
from evaluate.cli import main as eval_main
from evaluate.inference import predict_probabilities
from evaluate.metrics import HD95_EMPTY_PENALTY_MM, dice, hd95
from prep.discover import discover
from prep.preprocess import preprocess
from store import open_store
from store.conventions import region_masks
from train.cli import main as train_main
from train.runs import load_run

from .helpers import fake_kfold, lps_affine, oblique_affine, write_case


def _hand_dice(a, b):
    inter = sum(1 for x, y in zip(a.ravel(), b.ravel()) if x and y)
    return 2 * inter / (a.sum() + b.sum())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 0.9, 3.0), (0.5, 1.7, 2.2)])
def test_dice_and_hd95_against_references(spacing):
    rng = np.random.default_rng(1)
    for _ in range(4):
        a = np.zeros((24, 26, 18), bool)
        b = np.zeros_like(a)
        lo = rng.integers(2, 8, 3)
        a[lo[0]:lo[0] + 10, lo[1]:lo[1] + 12, lo[2]:lo[2] + 6] = True
        lo = rng.integers(2, 8, 3)
        b[lo[0]:lo[0] + 11, lo[1]:lo[1] + 9, lo[2]:lo[2] + 7] = True
        a ^= rng.random(a.shape) > 0.97  # ragged, with scattered islands
        assert dice(a, b) == pytest.approx(_hand_dice(a, b))
        assert hd95(a, b, spacing) == pytest.approx(medpy_hd95(a, b, voxelspacing=spacing))


def test_empty_conventions():
    e = np.zeros((5, 5, 5), bool)
    f = e.copy()
    f[2, 2, 2] = True
    assert dice(e, e) == 1.0 and hd95(e, e) == 0.0
    assert dice(f, e) == 0.0 and dice(e, f) == 0.0
    assert hd95(f, e) == HD95_EMPTY_PENALTY_MM == hd95(e, f) == 373.13
    assert dice(f, f) == 1.0 and hd95(f, f) == 0.0


def _round_trip(tmp_path, affine, shape):
    write_case(tmp_path, "BraTS2021_00000", affine, shape=shape)
    case = discover(tmp_path).cases[0]
    pre = preprocess(case)
    src = np.asanyarray(nib.load(case.seg).dataobj)
    # a perfect "prediction" on the stored grid, as probabilities, sent back with predict's geometry code
    prob = region_masks(pre.label, "brats2021").astype(np.float32)
    back = regions_on_source(prob, pre.geometry, 0.5)
    return back, region_masks(src, "brats2021")


def test_round_trip_exact_on_1mm(tmp_path):
    back, src = _round_trip(tmp_path, lps_affine(), (30, 34, 22))
    assert back.shape == src.shape
    np.testing.assert_array_equal(back, src)


@pytest.mark.parametrize("name", ["anisotropic", "oblique"])
def test_round_trip_dice_on_resampled_inputs(tmp_path, name):
    affine = lps_affine((0.9, 0.9, 3.0)) if name == "anisotropic" else oblique_affine()
    back, src = _round_trip(tmp_path, affine, (60, 64, 40))
    for r in range(3):
        assert src[r].sum() > 100
        assert dice(back[r], src[r]) >= 0.95, (name, r, dice(back[r], src[r]))


@pytest.fixture(scope="module")
def tiny_run(tiny_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    rc = train_main(["--store", tiny_store, "--run-dir", str(run), "--channels", "4", "8", "16", "--patch-size",
                     "16", "16", "16", "--workers", "0", "--epochs", "2", "--modalities", "t1", "t2", "flair"])
    assert rc == 0
    return run


def test_evaluate_writes_table_json_predictions_pictures(tiny_run, tiny_store, capsys):
    assert eval_main(["--run-dir", str(tiny_run), "--save-predictions"]) == 0
    out = capsys.readouterr().out
    assert "Dice TC" in out and "HD95" in out
    s = open_store(tiny_store)
    ev = tiny_run / "eval"
    with open(ev / "test.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == s.splits["test"]
    assert {"case", "dice_tc", "dice_wt", "dice_et", "hd95_tc", "hd95_wt", "hd95_et"} <= set(rows[0])
    summary = json.loads((ev / "test.json").read_text())
    assert summary["grid"] == "source" and "373.13" in summary["conventions"]["legacy_hd95"]
    assert "374" in summary["conventions"]["brats2023"]
    assert set(summary["scores"]["dice_wt"]) == {"mean", "std", "median", "n"}
    assert set(summary["scores"]["brats2023_dice_wt"]) == {"mean", "std", "median", "n"}
    assert 0 <= summary["monai_dice_mean"] <= 1
    for cid in s.splits["test"]:
        pred = nib.load(ev / "pred" / f"{cid}.nii.gz")
        src = nib.load(Path(s.attrs["source"]) / cid / f"{cid}_seg.nii.gz")
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
        assert set(np.unique(np.asanyarray(pred.dataobj)).tolist()) <= {0, 1, 2, 4}
        assert (ev / "png" / f"{cid}.png").stat().st_size > 5000


def test_save_predictions_replaces_its_own_files_and_keeps_others(tiny_run, tiny_store, capsys):
    """A second evaluate replaces the predictions the first wrote (its files and scores agree); a file in
    RUN/eval/pred that evaluate did not write is kept and named, and replaced only with --overwrite."""
    ids = open_store(tiny_store).splits["train"]  # the test split has one case
    pred = tiny_run / "eval" / "pred"
    assert eval_main(["--run-dir", str(tiny_run), "--save-predictions", "--split", "train", "--metrics", "legacy"]) == 0
    own = pred / f"{ids[0]}.nii.gz"
    first = own.read_bytes()
    own.write_bytes(b"stale, written by evaluate")  # evaluate's own file: replaced
    foreign = pred / f"{ids[1]}.nii.gz"
    # as if that one file had come from elsewhere
    (pred / ".written-by-evaluate").write_text("".join(f"{c}.nii.gz\n" for c in ids if c != ids[1]))
    foreign.write_bytes(b"someone else's")
    capsys.readouterr()
    assert eval_main(["--run-dir", str(tiny_run), "--save-predictions", "--split", "train", "--metrics", "legacy"]) == 0
    out = capsys.readouterr().out
    assert own.read_bytes() == first and foreign.read_bytes() == b"someone else's"
    assert "kept 1 file(s)" in out and foreign.name in out
    assert eval_main(["--run-dir", str(tiny_run), "--save-predictions", "--split", "train", "--metrics", "legacy",
                      "--overwrite"]) == 0
    assert foreign.read_bytes() != b"someone else's" and nib.load(foreign).shape == nib.load(own).shape


def test_evaluate_on_store_grid_when_source_is_gone(tiny_run, tiny_store, tmp_path):
    assert eval_main(["--run-dir", str(tiny_run), "--source", str(tmp_path / "nowhere")]) == 0
    assert json.loads((tiny_run / "eval" / "test.json").read_text())["grid"] == "store"


def test_ensemble_of_identical_models_equals_one(tiny_run, tiny_store, tmp_path):
    kf = fake_kfold(tiny_run, tmp_path / "kf", 3, best_fold=1)
    image = open_store(tiny_store).case(open_store(tiny_store).case_ids[0]).image(("t1", "t2", "flair"))
    one = predict_probabilities(load_run(tiny_run), image, "cpu")
    ens_run = load_run(kf, ensemble=True)
    assert len(ens_run.models) == 3 and "ensemble" in ens_run.kind
    np.testing.assert_allclose(predict_probabilities(ens_run, image, "cpu"), one, rtol=1e-5, atol=1e-6)
    assert load_run(kf).kind == "best fold 1"


def test_an_ensemble_averages_its_members_probabilities(tiny_run, tiny_store, tmp_path):
    """Members made to differ (each one's weights perturbed its own way): the ensemble's probabilities are the
    hand average of each member's alone, and differ from any one member's (a loop that used one member every
    time would fail)."""
    import dataclasses

    kf = fake_kfold(tiny_run, tmp_path / "kf", 3, best_fold=1)
    image = open_store(tiny_store).case(open_store(tiny_store).case_ids[0]).image(("t1", "t2", "flair"))
    ens = load_run(kf, ensemble=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for k, model in enumerate(ens.models):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * (k + 1))
    alone = [predict_probabilities(dataclasses.replace(ens, models=[m], configs=[c]), image, "cpu")
             for m, c in zip(ens.models, ens.configs)]
    assert all(np.abs(alone[0] - a).max() > 1e-3 for a in alone[1:])  # the members differ
    together = predict_probabilities(ens, image, "cpu")
    np.testing.assert_allclose(together, (alone[0] + alone[1] + alone[2]) / 3, rtol=1e-5, atol=1e-6)
    assert all(np.abs(together - a).max() > 1e-4 for a in alone)


def test_predict_raw_case_in_source_geometry(tiny_run, tiny_cohort, tmp_path):
    case_dir = tiny_cohort / "BraTS2021_00001"
    out = tmp_path / "pred.nii.gz"
    assert eval_main(["predict", "--run-dir", str(tiny_run), "--case", str(case_dir), "--out", str(out)]) == 0
    src = nib.load(case_dir / "BraTS2021_00001_t1.nii.gz")
    pred = nib.load(out)
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert pred.get_data_dtype() == np.uint8
    # t1ce is not read by this model: a case without it is still predicted
    d = tmp_path / "BraTS2021_00001"
    shutil.copytree(case_dir, d)
    (d / "BraTS2021_00001_t1ce.nii.gz").unlink()
    (d / "BraTS2021_00001_seg.nii.gz").unlink()
    out2 = str(tmp_path / "p2.nii.gz")
    assert eval_main(["predict", "--run-dir", str(tiny_run), "--case", str(d), "--out", out2]) == 0


def test_bad_input_clear_errors(tiny_run, tiny_cohort, tmp_path, capsys):
    empty = tmp_path / "norun"
    empty.mkdir()
    assert eval_main(["--run-dir", str(empty)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    d = tmp_path / "BraTS2021_00002"
    shutil.copytree(tiny_cohort / "BraTS2021_00002", d)
    (d / "BraTS2021_00002_flair.nii.gz").unlink()
    rc = eval_main(["predict", "--run-dir", str(tiny_run), "--case", str(d), "--out", str(tmp_path / "x.nii.gz")])
    assert rc == 2 and "missing modality flair" in capsys.readouterr().err
    assert eval_main(["--run-dir", str(tiny_run), "--ensemble"]) == 2
    assert "k-fold" in capsys.readouterr().err
