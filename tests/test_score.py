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
from .helpers import BAD_FILES, free_port, spoil, tree_hashes


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
    for extra in ([], ["--labels", "msd", "--overwrite"]):
        assert eval_main(["score", "--pred", str(pred), "--ref", str(cohort), "--metrics", "legacy", *extra]) == 0
        rows = _rows(tmp_path / "pred-scores" / "predictions.csv")
        assert len(rows) == 4 and all(float(r["dice_wt"]) == 1.0 and float(r["dice_et"]) == 1.0
                                      for r in rows.values())
    # read as BraTS 2021 values instead, MSD's 1 (oedema) and 2 (non-enhancing) swap and 3 is no 2021 label
    assert eval_main(["score", "--pred", str(pred), "--ref", str(cohort), "--labels", "brats2021",
                      "--overwrite"]) == 1


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
    # on a cluster: a negative --workers, a scheduler that does not answer (one line each, nothing written)
    with pytest.raises(SystemExit) as e:
        eval_main(["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--workers", "-1"])
    assert e.value.code == 2 and "--workers must be 0 or more, not -1" in capsys.readouterr().err
    port = free_port()
    assert eval_main(["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--out", str(tmp_path / "c"),
                      "--scheduler", f"tcp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--scheduler tcp://127.0.0.1:{port}: no Dask scheduler answered there" in err[0]
    assert not (tmp_path / "c" / "predictions.csv").exists()
    assert label_values("brats2021") == (0, 1, 2, 4)


MESSAGES = {"truncated": "cannot be read as NIfTI", "not gzip": "cannot be read as NIfTI",
            "not NIfTI": "cannot be read as NIfTI", "empty": "cannot be read as NIfTI", "4D": "its grid",
            "other grid": "its grid", "float": "non-integer values (0.5 among them)", "NaN": "holds NaN values",
            "stray labels": "label values [7] are not in"}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_each_bad_prediction_is_one_line_naming_it_and_the_others_are_scored(tiny_cohort, tmp_path, capsys, kind):
    """A prediction of each class of bad file: one line naming it (no traceback), never scored as an empty map;
    the other cases scored, exit 1."""
    pred = _predictions(tiny_cohort, tmp_path / "pred")
    cid = discover(tiny_cohort).cases[1].case_id
    spoil(pred / f"{cid}.nii.gz", kind)
    assert eval_main(["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--metrics", "legacy"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"{cid}.nii.gz" in err[0] and MESSAGES[kind] in err[0], err
    rows = _rows(tmp_path / "pred-scores" / "predictions.csv")
    assert len(rows) == 5 and cid not in rows and all(float(r["dice_wt"]) == 1.0 for r in rows.values())


def test_an_uncompressed_prediction_is_named(tiny_cohort, tmp_path, capsys):
    pred = _predictions(tiny_cohort, tmp_path / "pred")
    cid = discover(tiny_cohort).cases[0].case_id
    img = nib.load(str(pred / f"{cid}.nii.gz"))
    nib.save(img, str(pred / f"{cid}.nii"))
    (pred / f"{cid}.nii.gz").unlink()
    assert eval_main(["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--metrics", "legacy"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{cid}.nii is there" in err[0] and "gzip it" in err[0]


def test_a_folder_mixing_every_bad_class_scores_its_good_cases_as_a_clean_run(tmp_path, capsys):
    """Every class of bad prediction in one folder beside good ones: each bad one named once, the good cases'
    rows equal to a clean run's character for character, neither input folder changed (hashes)."""
    from prep.synth import SynthConfig, synth_cohort

    cohort = tmp_path / "cohort"
    synth_cohort(SynthConfig(out=cohort, cases=13, seed=21, shape=TINY), progress=False)
    shifted = _predictions(cohort, tmp_path / "clean", lambda lab, i: np.roll(lab, 1 + i % 2, axis=i % 3))
    assert eval_main(["score", "--pred", str(shifted), "--ref", str(cohort)]) == 0
    clean = (tmp_path / "clean-scores" / "predictions.csv").read_text().splitlines()
    mixed = tmp_path / "mixed"
    shutil.copytree(shifted, mixed)
    ids = [c.case_id for c in discover(cohort).cases]
    bad = dict(zip(ids, [*BAD_FILES, "uncompressed"]))
    for cid, kind in bad.items():
        if kind == "uncompressed":
            nib.save(nib.load(str(mixed / f"{cid}.nii.gz")), str(mixed / f"{cid}.nii"))
            (mixed / f"{cid}.nii.gz").unlink()
        else:
            spoil(mixed / f"{cid}.nii.gz", kind)
    hashes = tree_hashes(cohort), tree_hashes(mixed)
    capsys.readouterr()
    assert eval_main(["score", "--pred", str(mixed), "--ref", str(cohort)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(bad) and all(sum(cid in e for e in err) == 1 for cid in bad)
    assert not any("Traceback" in e for e in err)
    got = (tmp_path / "mixed-scores" / "predictions.csv").read_text().splitlines()
    good = [c for c in ids if c not in bad]
    assert len(good) == 3 and got[0] == clean[0]
    assert got[1:] == [line for line in clean[1:] if line.split(",")[0] in good]
    assert (tree_hashes(cohort), tree_hashes(mixed)) == hashes
    # on a local Dask cluster of 2 worker processes: the same reports byte for byte, the same lines, exit 1
    assert eval_main(["score", "--pred", str(mixed), "--ref", str(cohort), "--workers", "2", "--out",
                      str(tmp_path / "on-cluster")]) == 1
    err2 = [e.strip() for e in capsys.readouterr().err.strip().splitlines() if not e.startswith("score:")]
    assert sorted(err2) == sorted(e.strip() for e in err)
    for name in ("predictions.csv", "predictions.json", "predictions-lesions.csv"):
        assert (tmp_path / "on-cluster" / name).read_bytes() == (tmp_path / "mixed-scores" / name).read_bytes(), name


def test_the_reports_never_replace_an_input_or_an_earlier_report(tiny_cohort, tmp_path, capsys):
    """--out inside --pred or --ref, a file, or a folder that cannot be written: one line, exit 2, before any
    scoring; an earlier report is replaced only with --overwrite."""
    pred = _predictions(tiny_cohort, tmp_path / "pred")
    before = tree_hashes(tiny_cohort), tree_hashes(pred)
    (tmp_path / "a-file").write_text("not a folder")
    base = ["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--metrics", "legacy", "--out"]
    for out, words in [(pred / "scores", "lies inside --pred"), (tiny_cohort / "scores", "lies inside --ref"),
                       (tmp_path / "a-file", "a file, not a folder"),
                       (tmp_path / "a-file" / "scores", "cannot be written")]:
        assert eval_main([*base, str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and str(out) in err[0], (out, err)
    assert not (tiny_cohort / "scores").exists() and not (pred / "scores").exists()
    (tmp_path / "link").symlink_to(tiny_cohort)
    assert eval_main([*base, str(tmp_path / "link" / "scores")]) == 2  # through a link, still the cohort
    assert "lies inside --ref" in capsys.readouterr().err
    assert eval_main([*base, str(tmp_path / "s")]) == 0
    first = (tmp_path / "s" / "predictions.csv").read_bytes()
    (tmp_path / "s" / "predictions.csv").write_text("mine")
    assert eval_main([*base, str(tmp_path / "s")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "s" / "predictions.csv").read_text() == "mine"
    assert eval_main([*base, str(tmp_path / "s"), "--overwrite"]) == 0
    assert (tmp_path / "s" / "predictions.csv").read_bytes() == first
    assert (tree_hashes(tiny_cohort), tree_hashes(pred)) == before


def test_a_2024_cohort_scores_against_itself_with_dice_1(tmp_path):
    """Names say 2023, the resection cavity (4) says 2024: decided as build-store decides it."""
    from prep.synth import SynthConfig, synth_cohort

    cohort = tmp_path / "cohort"
    synth_cohort(SynthConfig(out=cohort, cases=3, seed=2, shape=TINY, layout="brats2024"), progress=False)
    assert any(4 in np.unique(np.asarray(nib.load(str(c.seg)).dataobj)) for c in discover(cohort).cases)
    pred = tmp_path / "pred"
    pred.mkdir()
    for c in discover(cohort).cases:
        shutil.copy(c.seg, pred / f"{c.case_id}.nii.gz")
    for extra in ([], ["--labels", "brats2024", "--overwrite"]):
        assert eval_main(["score", "--pred", str(pred), "--ref", str(cohort), *extra]) == 0
        rows = _rows(tmp_path / "pred-scores" / "predictions.csv")
        dice = [k for k in next(iter(rows.values())) if k.startswith("dice_")]
        assert "dice_rc" in dice and len(rows) == 3
        assert all(float(r[k]) == 1.0 for r in rows.values() for k in dice)
        assert json.loads((tmp_path / "pred-scores" / "predictions.json").read_text())["label_convention"] == \
            "brats2024"


def test_one_split_or_the_predicted_cases_alone(tiny_cohort, tiny_store, tmp_path, capsys):
    from store import open_store

    test_ids = sorted(open_store(tiny_store).splits["test"])
    pred = _predictions(tiny_cohort, tmp_path / "pred")
    for p in pred.iterdir():
        if p.name[: -len(".nii.gz")] not in test_ids:
            p.unlink()
    base = ["score", "--pred", str(pred), "--ref", str(tiny_cohort), "--metrics", "legacy", "--overwrite"]
    assert eval_main(base) == 1  # every other case's prediction is missing, and counts
    assert len(capsys.readouterr().err.strip().splitlines()) == 6 - len(test_ids)
    for extra in (["--store", tiny_store, "--split", "test"], ["--only-predicted"]):
        assert eval_main([*base, *extra]) == 0, extra
        assert sorted(_rows(tmp_path / "pred-scores" / "predictions.csv")) == test_ids
    (pred / f"{test_ids[0]}.nii.gz").unlink()
    assert eval_main([*base, "--store", tiny_store, "--split", "test"]) == 1  # a missing test case still counts
    assert f"case {test_ids[0]}: no prediction" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_main([*base, "--split", "test"])
    assert e.value.code == 2 and "--split and --store go together" in capsys.readouterr().err
