"""``python -m evaluate score``: a folder of predictions scored against a cohort's segs by the same scorers as
``evaluate``, in any numbering ``--labels`` names; every bad input one line naming the file, the other cases scored."""

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from evaluate.cli import main as eval_main
from evaluate.scoring import score_case
from prep.discover import discover
from store.conventions import label_values, numbering_to, relabel

from .conftest import TINY


def _write(path: Path, data: np.ndarray, affine) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), affine), str(path))


def _predictions(cohort: Path, out: Path, change=lambda lab, i: lab) -> Path:
    """Each case's seg (through ``change``) as ``out/<case-id>.nii.gz``."""
    for i, c in enumerate(discover(cohort).cases):
        img = nib.load(str(c.seg))
        _write(out / f"{c.case_id}.nii.gz", change(np.asarray(img.dataobj).astype(np.uint8), i), img.affine)
    return out


def _rows(path: Path) -> dict:
    with open(path) as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def test_a_folder_is_scored_as_the_scorers_score_each_case(tiny_cohort, tmp_path, capsys):
    def moved(lab, i):  # a different error per case: shifted, and an ET speck in one
        out = np.roll(lab, i % 3, axis=i % 3)
        if i == 2:
            out[1:3, 1:3, 1:3] = 4
        return out

    pred = _predictions(tiny_cohort, tmp_path / "pred", moved)
    assert eval_main(["score", "--pred", str(pred), "--ref", str(tiny_cohort)]) == 0
    out = tmp_path / "pred-scores"
    rows = _rows(out / "predictions.csv")
    cases = discover(tiny_cohort).cases
    assert sorted(rows) == sorted(c.case_id for c in cases)
    assert any(float(r["dice_wt"]) < 0.99 for r in rows.values())  # the predictions differ from the references
    for c in cases:
        ref_img = nib.load(str(c.seg))
        ref = np.asarray(ref_img.dataobj).astype(np.uint8)
        p = np.asarray(nib.load(str(pred / f"{c.case_id}.nii.gz")).dataobj).astype(np.uint8)
        want = score_case(p, ref, "brats2021", tuple(np.abs(np.diag(ref_img.affine)[:3])), case=c.case_id)
        for k, v in want.items():
            got = float(rows[c.case_id][k])
            assert got == pytest.approx(v, abs=1e-6) or (np.isnan(v) and np.isnan(got)), (c.case_id, k)
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["cases"] == len(cases) and summary["problems"] == {} and "conventions" in summary
    assert (out / "predictions-lesions.csv").exists() and (out / "predictions-scores.png").exists()
    assert "legacy: (BraTS 2017-2021" in capsys.readouterr().out


@pytest.mark.parametrize("numbering", ["nnunet", "msd", "brats2023", "brats2021"])
def test_each_numbering_is_mapped_to_the_cohorts(tiny_cohort, tmp_path, numbering):
    back = {v: k for k, v in numbering_to("brats2021", numbering).items()}  # brats2021 value -> numbering's

    pred = _predictions(tiny_cohort, tmp_path / "pred", lambda lab, i: relabel(lab, back))
    assert eval_main(["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--labels", numbering,
                      "--metrics", "legacy", "--out", str(tmp_path / "out")]) == 0
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert all(float(r[f"dice_{x}"]) == 1.0 for r in rows.values() for x in ("tc", "wt", "et"))


def test_an_msd_cohort_is_scored_in_msds_values(tmp_path):
    from prep.synth import SynthConfig, synth_cohort

    cohort = tmp_path / "Task01_BrainTumour"
    synth_cohort(SynthConfig(out=cohort, cases=5, seed=4, shape=TINY, layout="msd"), progress=False)
    pred = tmp_path / "pred"
    for c in discover(cohort).cases:  # MSD's own label files, as 'evaluate predict' writes MSD predictions
        pred.mkdir(exist_ok=True)
        shutil.copy(c.seg, pred / f"{c.case_id}.nii.gz")
    for extra in ([], ["--labels", "msd"]):
        assert eval_main(["score", "--pred", str(pred), "--ref", str(cohort), "--metrics", "legacy", *extra]) == 0
        rows = _rows(tmp_path / "pred-scores" / "predictions.csv")
        assert len(rows) == 4 and all(float(r["dice_wt"]) == 1.0 and float(r["dice_et"]) == 1.0
                                      for r in rows.values())
    # read as BraTS 2021 values instead, MSD's 1 (oedema) and 2 (non-enhancing) swap and 3 is no 2021 label
    assert eval_main(["score", "--pred", str(pred), "--ref", str(cohort), "--labels", "brats2021"]) == 1


def test_every_bad_input_is_one_line_and_the_other_cases_are_scored(tiny_cohort, tmp_path, capsys):
    cases = discover(tiny_cohort).cases
    pred = _predictions(tiny_cohort, tmp_path / "pred")
    missing, grid, affine, labels = (c.case_id for c in cases[:4])
    (pred / f"{missing}.nii.gz").unlink()
    _write(pred / f"{grid}.nii.gz", np.zeros((TINY[0], TINY[1], TINY[2] + 1)), nib.load(str(cases[1].seg)).affine)
    shifted = nib.load(str(cases[2].seg)).affine.copy()
    shifted[0, 3] += 5.0
    _write(pred / f"{affine}.nii.gz", np.zeros(TINY), shifted)
    _write(pred / f"{labels}.nii.gz", np.full(TINY, 3), nib.load(str(cases[3].seg)).affine)
    _write(pred / "BraTS2021_99999.nii.gz", np.zeros(TINY), shifted)
    assert eval_main(["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--metrics", "legacy"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5
    assert any(f"case {missing}: no prediction" in e and f"{missing}.nii.gz" in e for e in err)
    assert any(f"{grid}.nii.gz: its grid" in e and "shape 40x40x29" in e for e in err)
    assert any(f"{affine}.nii.gz: its grid" in e and "affines differ" in e for e in err)
    assert any(f"{labels}.nii.gz: label values [3] are not in" in e for e in err)
    assert any("BraTS2021_99999.nii.gz: a prediction with no reference case" in e for e in err)
    rows = _rows(tmp_path / "pred-scores" / "predictions.csv")
    assert sorted(rows) == sorted(c.case_id for c in cases[4:])  # the others scored
    assert set(json.loads((tmp_path / "pred-scores" / "predictions.json").read_text())["problems"]) == {
        missing, grid, affine, labels, "BraTS2021_99999"}


def test_a_reference_folder_without_segs_and_usage_errors(tiny_cohort, tmp_path, capsys):
    ref = tmp_path / "noseg"
    for c in discover(tiny_cohort).cases[:2]:
        shutil.copytree(c.images["t1"].parent, ref / c.case_id)
        (ref / c.case_id / c.seg.name).unlink()
    pred = _predictions(tiny_cohort, tmp_path / "pred")
    assert eval_main(["score", "--pred", str(pred), "--ref", str(ref)]) == 1
    err = capsys.readouterr().err
    assert all(c in err for c in sorted(p.name for p in ref.iterdir()))
    with pytest.raises(SystemExit) as e:
        eval_main(["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--labels", "itk"])
    assert e.value.code == 2
    assert eval_main(["score", "--pred", str(tmp_path / "nowhere"), "--ref", str(tiny_cohort)]) == 2
    assert "--pred" in capsys.readouterr().err
    assert label_values("brats2021") == (0, 1, 2, 4)
