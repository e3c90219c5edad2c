"""Every BraTS-family cohort a user brings: nested folders, BraTS 2018-2020 as downloaded (HGG/ and LGG/, grade kept
and stratified on), BraTS 2023+ task prefixes recorded per case and in the store and used by the scorer; mixed
cohorts are one line per case and the others go on."""

import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from evaluate.cli import main as eval_main
from prep.build import BuildConfig, build_store, run_cli
from prep.cli import main as prep_main
from prep.discover import discover
from store import open_store
from store.cli import main as store_main
from train.cli import main as train_main

from .conftest import TINY
from .helpers import synth_spacing, write_case

TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--workers", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def cohort2019(tmp_path_factory):
    out = tmp_path_factory.mktemp("b19") / "MICCAI_BraTS_2019_Data_Training"
    assert prep_main(["synth", "--layout", "brats2019", "--cases", "13", "--shape", *map(str, TINY), "--out",
                      str(out)]) == 0
    return out


def test_nested_folders_hidden_duplicates_and_loops(tmp_path):
    write_case(tmp_path / "site-a" / "batch-1", "BraTS2021_00001")
    write_case(tmp_path / "site-b", "BraTS2021_00002")
    write_case(tmp_path / "site-b" / ".trash", "BraTS2021_00003")
    write_case(tmp_path / "site-c" / "copy", "BraTS2021_00002")  # the same id again
    os.symlink(tmp_path / "site-a", tmp_path / "site-a" / "batch-1" / "up")  # a loop back to an ancestor... inside
    os.symlink(tmp_path, tmp_path / "site-b" / "root")  # ...and to the cohort folder itself
    c = discover(tmp_path)
    assert [x.case_id for x in c.cases] == ["BraTS2021_00001", "BraTS2021_00002"]
    assert c.skipped == {"site-b/.trash": "hidden folder"}
    assert "found twice, in site-b/BraTS2021_00002 and site-c/copy/BraTS2021_00002" in \
        c.problems["site-c/copy/BraTS2021_00002"]
    assert "a loop" in c.problems["site-b/root"]


def test_brats2019_as_downloaded_keeps_grades_and_stratifies(cohort2019, tmp_path, capsys):
    c = discover(cohort2019)
    assert len(c.cases) == 13 and c.layout == "brats2021" and {x.task for x in c.cases} == {"gli"}
    grades = {x.case_id: x.grade for x in c.cases}
    assert sum(g == "LGG" for g in grades.values()) == 3 and all(
        (cohort2019 / g / cid).is_dir() for cid, g in grades.items())
    store = tmp_path / "s.zarr"
    rep = build_store(BuildConfig(source=str(cohort2019), store=str(store), workers=0, spacing=synth_spacing(TINY),
                                  stratify="grade"), progress=False)
    assert rep.ok and len(rep.built) == 13
    s = open_store(store)
    assert {cid: s.case(cid).meta["grade"] for cid in s.case_ids} == grades
    assert {rec["grade"] for rec in s.attrs["index"].values()} == {"HGG", "LGG"}
    strat = s.splits["stratified"]
    # each grade split by itself: 0.75 / 0.15 / 0.10 of 10 HGG and of 3 LGG patients
    assert strat == {"HGG": {"train": 7, "val": 2, "test": 1}, "LGG": {"train": 3, "val": 0, "test": 0}}
    assert {grades[c] for c in s.splits["val"] + s.splits["test"]} == {"HGG"}
    assert store_main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "grades     HGG 10, LGG 3" in out and "tasks      GLI 13" in out and "(patients, stratified)" in out
    # trains briefly and predicts in its own convention, reading the nested cohort
    run = tmp_path / "run"
    assert train_main(["--store", str(store), "--run-dir", str(run), *TINY_NET]) == 0
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(cohort2019), "--out",
                      str(tmp_path / "pred")]) == 0
    written = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(written) == 13
    assert set(np.unique(np.asarray(nib.load(str(written[0])).dataobj)).tolist()) <= {0, 1, 2, 4}


def test_stratifying_a_cohort_without_grades_is_one_line(tiny_cohort, tmp_path, capsys):
    rc = run_cli(BuildConfig(source=str(tiny_cohort), store=str(tmp_path / "s.zarr"), workers=0, stratify="grade"))
    err = capsys.readouterr().err
    assert rc == 2 and "--stratify grade: case BraTS2021_00000 has no grade" in err and "HGG/ and LGG/" in err
    assert len(err.strip().splitlines()) == 1


def _as_task(src, dst, task: str):
    """A BraTS 2023 cohort renamed into another task's ids (BraTS-GLI-... -> BraTS-MEN-...)."""
    for case in sorted(p for p in src.iterdir() if p.is_dir()):
        new = case.name.replace("-GLI-", f"-{task}-")
        (dst / new).mkdir(parents=True)
        for f in case.iterdir():
            shutil.copy(f, dst / new / f.name.replace(case.name, new))


def test_tasks_are_recorded_and_scored_with_their_parameters(tiny_cohort_2023, tmp_path, capsys):
    gli = tmp_path / "gli"  # enough cases for a validation and a test case
    assert prep_main(["synth", "--layout", "brats2023", "--cases", "10", "--shape", *map(str, TINY), "--out",
                      str(gli)]) == 0
    men = tmp_path / "men"
    _as_task(gli, men, "MEN")
    store = tmp_path / "men.zarr"
    assert build_store(BuildConfig(source=str(men), store=str(store), workers=0, spacing=synth_spacing(TINY)),
                       progress=False).ok
    s = open_store(store)
    assert {s.case(c).meta["task"] for c in s.case_ids} == {"men"}
    assert {r["task"] for r in s.attrs["index"].values()} == {"men"}
    run = tmp_path / "run"
    assert train_main(["--store", str(store), "--run-dir", str(run), *TINY_NET]) == 0
    assert eval_main(["--run-dir", str(run), "--metrics", "brats2023"]) == 0
    assert set(json.loads((run / "eval" / "test.json").read_text())["tasks"]) == {"men"}
    # a cohort mixing tasks: the odd case is one line, the others are built
    mixed = tmp_path / "mixed"
    shutil.copytree(men, mixed)
    _as_task(tiny_cohort_2023, tmp_path / "ped", "PED")
    first = sorted((tmp_path / "ped").iterdir())[0]
    shutil.copytree(first, mixed / first.name)
    c = discover(mixed)
    assert len(c.cases) == 10 and list(c.problems) == [first.name]
    assert "task PED in a MEN cohort" in c.problems[first.name] and "its own store" in c.problems[first.name]


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    """A synthetic Task01_BrainTumour: 11 cases, 9 labelled in imagesTr/labelsTr, 2 in imagesTs."""
    root = tmp_path_factory.mktemp("msd")
    assert prep_main(["synth", "--layout", "msd", "--cases", "11", "--shape", *map(str, TINY), "--out",
                      str(root / "Task01_BrainTumour")]) == 0
    return root


def test_msd_task01_builds_trains_and_predicts_in_its_own_convention(msd, tmp_path, capsys):
    c = discover(msd)
    assert len(c.cases) == 9 and c.layout == "msd" and c.label_convention == "brats2021"
    assert c.skipped == {"Task01_BrainTumour/imagesTs": "unlabelled test cases: 'python -m evaluate predict' reads "
                                                         "them"}
    assert len(discover(msd, require_seg=False).cases) == 11
    store = tmp_path / "msd.zarr"
    assert build_store(BuildConfig(source=str(msd), store=str(store), workers=0, spacing=synth_spacing(TINY)),
                       progress=False).ok
    # the same generator and seed in the BraTS 2021 layout: the channels and labels must land where those do
    ref_root = tmp_path / "b21"
    assert prep_main(["synth", "--cases", "4", "--shape", *map(str, TINY), "--out", str(ref_root)]) == 0
    ref = tmp_path / "b21.zarr"
    assert build_store(BuildConfig(source=str(ref_root), store=str(ref), workers=0, spacing=synth_spacing(TINY)),
                       progress=False).ok
    s, r = open_store(store), open_store(ref)
    for i in range(4):
        a, b = s.case(f"BRATS_{i + 1:03d}"), r.case(f"BraTS2021_{i:05d}")
        assert a.meta["source_labels"] == {"0": 0, "1": 2, "2": 1, "3": 4} and a.meta["layout"] == "msd"
        assert a.meta["source_files"]["t2"] == f"Task01_BrainTumour/imagesTr/BRATS_{i + 1:03d}.nii.gz"
        assert np.array_equal(a.label(), b.label())
        assert np.allclose(a.image(), b.image(), atol=0.02)  # float sources: stored in 1/32000 of their range
    # trains briefly, scores against the MSD labels mapped, predicts imagesTs too, in MSD's values
    run = tmp_path / "run"
    assert train_main(["--store", str(store), "--run-dir", str(run), *TINY_NET]) == 0
    assert eval_main(["--run-dir", str(run), "--metrics", "legacy", "--save-predictions"]) == 0
    assert json.loads((run / "eval" / "test.json").read_text())["grid"] == "source"
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(msd), "--out", str(tmp_path / "pred")]) == 0
    written = sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz"))
    assert written == [f"BRATS_{i:03d}.nii.gz" for i in range(1, 12)]
    from evaluate.cases import to_source_labels

    case = next(x for x in discover(msd).cases if x.case_id == "BRATS_001")
    assert to_source_labels(np.array([0, 1, 2, 4], np.uint8), case.source_labels).tolist() == [0, 2, 1, 3]
    values = set()
    for name in written:
        values |= set(np.unique(np.asarray(nib.load(str(tmp_path / "pred" / name)).dataobj)).tolist())
    assert values <= {0, 1, 2, 3} and len(values) > 1
    # evaluate --save-predictions writes MSD's values too: the same labels as predict's (from the store's images,
    # stored in 1/32000 of their range, so all but a few voxels)
    saved = sorted((run / "eval" / "pred").glob("*.nii.gz"))
    assert saved and all(f.name in written for f in saved)
    tumour = 0
    for f in saved:
        a = np.asarray(nib.load(str(f)).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "pred" / f.name)).dataobj)
        either = (a > 0) | (b > 0)
        assert set(np.unique(a).tolist()) <= {0, 1, 2, 3}
        assert not either.any() or (a[either] == b[either]).mean() > 0.9
        tumour += int(either.sum())
    assert tumour > 0


def test_msd_bad_input_is_one_line(msd, tmp_path):
    from prep.discover import DiscoveryError

    bad = tmp_path / "Task01_BrainTumour"
    shutil.copytree(msd / "Task01_BrainTumour", bad)
    meta = json.loads((bad / "dataset.json").read_text())
    for change, message in (({"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}}, "not the four BraTS modalities"),
                            ({"labels": {**meta["labels"], "3": "cyst"}}, "unknown: ['cyst']")):
        (bad / "dataset.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(DiscoveryError, match=re.escape(message)) as e:
            discover(tmp_path)
        assert str(bad / "dataset.json") in str(e.value) and "\n" not in str(e.value)
    (bad / "dataset.json").write_text(json.dumps(meta))
    # a 4D image with three channels: that case fails, naming its file; the others are built
    img = nib.load(str(bad / "imagesTr" / "BRATS_001.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :3], img.affine), str(bad / "imagesTr" / "BRATS_001.nii.gz"))
    rep = build_store(BuildConfig(source=str(tmp_path), store=str(tmp_path / "s.zarr"), workers=0,
                                  spacing=synth_spacing(TINY)), progress=False)
    assert list(rep.failed) == ["BRATS_001"] and len(rep.built) == 8
    assert "BRATS_001.nii.gz has shape" in rep.failed["BRATS_001"] and "lists 4 channels" in rep.failed["BRATS_001"]
    # a label value dataset.json does not name: that case fails, naming its file
    seg = nib.load(str(bad / "labelsTr" / "BRATS_002.nii.gz"))
    lab = np.asarray(seg.dataobj).copy()
    lab[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(lab, seg.affine), str(bad / "labelsTr" / "BRATS_002.nii.gz"))
    rep = build_store(BuildConfig(source=str(tmp_path), store=str(tmp_path / "s2.zarr"), workers=0,
                                  spacing=synth_spacing(TINY)), progress=False)
    assert "BRATS_002" in rep.failed and "BRATS_002.nii.gz has labels [5] that dataset.json does not name" in \
        rep.failed["BRATS_002"]


def test_a_single_case_is_built_without_starting_a_cluster(tmp_path, monkeypatch):
    """One case: the command's own process builds it (a worker's start costs more than the case)."""
    import prep.build as build

    write_case(tmp_path / "raw", "BraTS2021_00000")
    monkeypatch.setattr(build, "_Connection", lambda cfg: pytest.fail("a cluster was started for one case"))
    rep = build_store(BuildConfig(source=str(tmp_path / "raw"), store=str(tmp_path / "s.zarr"), workers=2),
                      progress=False)
    assert rep.ok and rep.built == ["BraTS2021_00000"]
    write_case(tmp_path / "raw", "BraTS2021_00001")
    with pytest.raises(pytest.fail.Exception, match="a cluster was started"):  # two cases: the cluster again
        build_store(BuildConfig(source=str(tmp_path / "raw"), store=str(tmp_path / "s.zarr"), workers=2),
                    progress=False)
