"""Postprocessing learned on validation: the rules' effect on label maps, the search, the file every command
replays, and its bad inputs."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from evaluate.cli import main as eval_main
from evaluate.postprocess import PostprocessingError, Rules, apply, load_rules
from evaluate.tuning import ValidationCase, tune
from store import open_store
from train.cli import main as train_main

from .test_scoring import TINY_NET

SHAPE = (40, 36, 24)


def _box(label, lo, hi, value):
    label[tuple(slice(a, b) for a, b in zip(lo, hi))] = value


def _case():
    """A brats2021 label map: a tumour (oedema around a core with enhancing rim) and three specks far from it, a
    WT speck (oedema), a TC speck (necrosis inside oedema) and an ET speck (enhancing inside oedema)."""
    lab = np.zeros(SHAPE, np.uint8)
    _box(lab, (4, 4, 4), (20, 20, 14), 2)
    _box(lab, (8, 8, 6), (16, 16, 12), 4)
    _box(lab, (10, 10, 8), (14, 14, 10), 1)
    _box(lab, (30, 4, 4), (32, 6, 6), 2)  # WT speck, 8 voxels
    _box(lab, (30, 20, 4), (34, 24, 8), 2)
    _box(lab, (31, 21, 5), (33, 23, 7), 1)  # TC speck, 8 voxels, in a 64-voxel oedema island
    _box(lab, (30, 28, 14), (34, 32, 18), 2)
    _box(lab, (31, 29, 15), (33, 31, 17), 4)  # ET speck, 8 voxels
    return lab


def test_rules_remove_specks_from_nested_regions():
    lab = _case()
    out = apply(lab, (1, 1, 1), Rules("brats2021", ("TC", "WT", "ET"), {"WT": 10}))
    assert (out[30:32, 4:6, 4:6] == 0).all()  # the 8-voxel WT speck goes
    assert (out[4:20, 4:20, 4:14] == lab[4:20, 4:20, 4:14]).all() and (out[30:34, 20:24, 4:8] > 0).all()
    out = apply(lab, (1, 1, 1), Rules("brats2021", ("TC", "WT", "ET"), {"TC": 10}))
    assert (out[31:33, 21:23, 5:7] == 2).all()  # a removed TC speck is oedema
    assert (out[31:33, 29:31, 15:17] == 2).all()  # the ET speck is a TC speck too
    out = apply(lab, (1, 1, 1), Rules("brats2021", ("TC", "WT", "ET"), {"ET": 10}))
    assert (out[31:33, 29:31, 15:17] == 1).all() and (out[8:16, 8:16, 6:12] == lab[8:16, 8:16, 6:12]).all()
    # volumes are mm^3: the 8-voxel specks are 125 mm^3 at 2.5 mm and survive a 100 mm^3 rule
    assert (apply(lab, (2.5, 2.5, 2.5), Rules("brats2021", ("TC", "WT", "ET"), {"WT": 100})) == lab).all()


def test_a_removal_never_takes_a_cases_largest_component():
    lab = np.zeros(SHAPE, np.uint8)
    _box(lab, (4, 4, 4), (6, 6, 6), 2)  # a case whose only tumour is 8 voxels of oedema
    rules = Rules("brats2021", ("TC", "WT", "ET"), {"WT": 1000})
    assert (apply(lab, (1, 1, 1), rules) == lab).all()  # the region's only lesion stays
    _box(lab, (20, 20, 10), (23, 23, 13), 2)  # a second one, 27 voxels: now the largest
    out = apply(lab, (1, 1, 1), rules)
    assert (out[4:6, 4:6, 4:6] == 0).all() and (out[20:23, 20:23, 10:13] == 2).all()


def test_small_total_et_is_relabelled_as_core():
    lab = np.zeros(SHAPE, np.uint8)
    _box(lab, (4, 4, 4), (12, 12, 12), 2)
    _box(lab, (6, 6, 6), (8, 8, 8), 4)  # 8 voxels of ET in all
    rules = Rules("brats2021", ("TC", "WT", "ET"), {}, 10.0)
    out = apply(lab, (1, 1, 1), rules)
    assert (out[6:8, 6:8, 6:8] == 1).all() and (out == 4).sum() == 0
    _box(lab, (9, 9, 9), (11, 11, 11), 4)  # 16 voxels: over the threshold, kept
    assert (apply(lab, (1, 1, 1), rules) == lab).all()
    assert apply(lab, (1, 1, 1), None) is lab  # no rules: the same array


def _reference():
    ref = np.zeros(SHAPE, np.uint8)
    _box(ref, (4, 4, 4), (20, 20, 14), 2)
    _box(ref, (8, 8, 6), (16, 16, 12), 4)
    _box(ref, (10, 10, 8), (14, 14, 10), 1)
    return ref


def test_search_keeps_only_rules_that_raise_the_score():
    ref = _reference()
    pred = _case()  # the reference plus three false-positive specks
    cases = [ValidationCase(f"c{i}", pred, ref, (1.0, 1.0, 1.0), "gli") for i in range(3)]
    rules, record = tune(cases, "brats2021", ("TC", "WT", "ET"), "brats2023", min_cases=3)
    assert record["score_after"] > record["score_before"]
    # the three islands (8, 64 and 64 voxels) are WT false positives: the smallest grid value above 64 mm^3
    assert rules.min_component_mm3["WT"] == 100 and rules.describe() == ["WT components under 100 mm^3 removed"]
    from evaluate.tuning import case_objective
    assert record["score_after"] == pytest.approx(np.mean([
        case_objective(apply(c.pred, c.spacing, rules), c.ref, "brats2021", c.spacing, "gli", "brats2023")
        for c in cases]))
    tried = [t for t in record["search"] if t["rule"] == "WT" and t["mm3"] == 100]
    assert tried[0]["gain"] > 0 and tried[0]["gain_ci95"][0] > 0
    # nothing to gain: predictions equal to the references keep no rule (ties keep none)
    perfect = [ValidationCase("c", ref, ref, (1.0, 1.0, 1.0), "gli")]
    rules, record = tune(perfect, "brats2021", ("TC", "WT", "ET"), "legacy", min_cases=1)
    assert rules.describe() == [] and record["score_after"] == record["score_before"] == 1.0
    with pytest.raises(ValueError, match="validation"):
        tune([], "brats2021", ("TC", "WT", "ET"))


def test_a_rule_is_kept_only_when_its_gain_generalises():
    """12 validation cases: specks in one of them only. Removing them raises the mean score, but the interval of
    the gain reaches zero (the case is absent from a third of the resamples): no rule. Specks in all 12: kept."""
    from evaluate.tuning import TooFewCases

    ref, specked = _reference(), _case()
    one = [ValidationCase(f"c{i:02d}", specked if i == 0 else ref, ref, (1.0, 1.0, 1.0), "gli") for i in range(12)]
    rules, record = tune(one, "brats2021", ("TC", "WT", "ET"), "brats2023")
    assert rules.describe() == [] and record["score_after"] == record["score_before"]
    wt = [t for t in record["search"] if t["rule"] == "WT" and t["mm3"] == 100][0]
    assert wt["gain"] > 0 and wt["gain_ci95"][0] <= 0  # a positive mean gain, which the old search kept
    every = [ValidationCase(f"c{i:02d}", specked, ref, (1.0, 1.0, 1.0), "gli") for i in range(12)]
    assert tune(every, "brats2021", ("TC", "WT", "ET"), "brats2023")[0].min_component_mm3["WT"] == 100
    with pytest.raises(TooFewCases, match="fewer than --min-cases 10"):
        tune(every[:9], "brats2021", ("TC", "WT", "ET"), "brats2023")


def _write_rules(run, **over):
    d = {"convention": "brats2021", "regions": ["TC", "WT", "ET"], "min_component_mm3": {"WT": 1e9},
         "et_relabel_below_mm3": 0.0, **over}
    (Path(run) / "postprocessing.json").write_text(json.dumps(d))


def test_bad_postprocessing_files_are_refused(tmp_path):
    _write_rules(tmp_path, convention="brats2023")
    with pytest.raises(PostprocessingError, match="made for brats2023 labels"):
        load_rules(tmp_path, "brats2021", ("TC", "WT", "ET"))
    _write_rules(tmp_path)
    with pytest.raises(PostprocessingError, match="made for regions TC WT ET"):
        load_rules(tmp_path, "brats2021", ("TC", "WT", "ET", "RC"))
    (tmp_path / "postprocessing.json").write_text("{not json")
    with pytest.raises(PostprocessingError, match="damaged"):
        load_rules(tmp_path, "brats2021", ("TC", "WT", "ET"))
    assert load_rules(tmp_path / "nowhere", "brats2021", ("TC", "WT", "ET")) is None


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pp_run(tiny_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("pp") / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), *TINY_NET, "--epochs", "2", "--lr", "0.01"]) == 0
    return run


def test_tune_writes_rules_that_evaluate_and_predict_replay(pp_run, tiny_store, tmp_path, capsys):
    n_val = len(open_store(tiny_store).splits["val"])
    assert eval_main(["tune-postprocessing", "--run-dir", str(pp_run), "--metric", "legacy", "--min-cases",
                      str(n_val)]) == 0
    made = json.loads((pp_run / "postprocessing.json").read_text())
    assert made["validation_cases"] == sorted(open_store(tiny_store).splits["val"])
    assert made["score_after"] >= made["score_before"] and made["metric"] == "legacy"
    assert set(made["min_component_mm3"]) == {"WT", "TC", "ET"}
    # the run's plan records the tuned rules (it was written with none)
    plan = json.loads((pp_run / "plan.json").read_text())["postprocessing"]
    assert plan["file"] == "postprocessing.json" and plan["metric"] == "legacy"
    assert {k: plan[k] for k in ("min_component_mm3", "et_relabel_below_mm3", "rules")} == {
        k: made[k] for k in ("min_component_mm3", "et_relabel_below_mm3", "rules")}
    # a rule that removes every WT component but each case's largest: evaluate writes what the rule makes of the
    # model's own labels
    from scipy.ndimage import label as components

    ev = pp_run / "eval"
    assert eval_main(["--run-dir", str(pp_run), "--save-predictions", "--no-postprocessing"]) == 0
    summary = json.loads((ev / "test.json").read_text())
    assert summary["postprocessing"] == ["none: --no-postprocessing"] and "postprocessing_gain" not in summary
    own = {f.name: (np.asanyarray(nib.load(f).dataobj), nib.load(f).header.get_zooms()[:3])
           for f in (ev / "pred").glob("*.nii.gz")}
    _write_rules(pp_run)
    rules = load_rules(pp_run, "brats2021", ("TC", "WT", "ET"))
    assert eval_main(["--run-dir", str(pp_run), "--save-predictions"]) == 0
    summary = json.loads((ev / "test.json").read_text())
    assert summary["postprocessing"] == ["WT components under 1e+09 mm^3 removed"]
    assert "brats2023_dice_wt" in summary["postprocessing_gain"]
    # the run's report shows the rule and the gain it made, with its interval
    page = (pp_run / "report.html").read_text()
    gain = summary["postprocessing_gain"]["brats2023_dice_wt"]
    assert "WT components under 1e+09 mm^3 removed" in page
    assert f"<td>brats2023_dice_wt</td><td>{gain['mean_gain']:.4f}</td><td>[{gain['ci95'][0]:.4f}" in page
    assert sorted(own) == sorted(f.name for f in (ev / "pred").glob("*.nii.gz"))
    for name, (lab, zooms) in own.items():
        out = np.asanyarray(nib.load(ev / "pred" / name).dataobj)
        assert (out == apply(lab, zooms, rules)).all() and components(out > 0, np.ones((3, 3, 3)))[1] <= 1
    before = (ev / "test-before-postprocessing.csv").read_text().splitlines()
    assert len(before) == 1 + summary["cases"] and (ev / "test-scores.png").stat().st_size > 0
    lesions = (ev / "test-lesions.csv").read_text().splitlines()
    assert lesions[0].startswith("case,region,side") and "reference" in "".join(lesions[1:])
    # predict replays it too
    source = open_store(tiny_store).attrs["source"]
    cid = open_store(tiny_store).splits["test"][0]
    out, plain = tmp_path / "p.nii.gz", tmp_path / "plain.nii.gz"
    assert eval_main(["predict", "--run-dir", str(pp_run), "--case", f"{source}/{cid}", "--out", str(out)]) == 0
    assert eval_main(["predict", "--run-dir", str(pp_run), "--case", f"{source}/{cid}", "--out", str(plain),
                      "--no-postprocessing"]) == 0
    plain_img = nib.load(plain)
    assert (np.asanyarray(nib.load(out).dataobj) == apply(np.asanyarray(plain_img.dataobj),
                                                          plain_img.header.get_zooms()[:3], rules)).all()
    # a file made for other regions: one line naming it, exit 2
    _write_rules(pp_run, regions=["TC", "WT", "ET", "RC"])
    capsys.readouterr()
    assert eval_main(["--run-dir", str(pp_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "postprocessing.json was made for regions" in err
    (pp_run / "postprocessing.json").unlink()


def test_kfold_runs_tune_on_out_of_fold_predictions(tiny_store, tmp_path, capsys):
    run = tmp_path / "kf"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), *TINY_NET, "--epochs", "1", "--folds", "2"]) == 0
    folds = open_store(tiny_store).splits["folds"][:2]
    n = sum(len(f["val"]) for f in folds)  # every fold's validation cases count
    capsys.readouterr()
    assert eval_main(["tune-postprocessing", "--run-dir", str(run), "--min-cases", str(n + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{n} validation case(s), fewer than --min-cases {n + 1}" in err
    assert not (run / "postprocessing.json").exists()
    assert eval_main(["tune-postprocessing", "--run-dir", str(run), "--min-cases", str(n + 1), "--or-skip"]) == 0
    assert "skipped" in capsys.readouterr().out and not (run / "postprocessing.json").exists()
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            eval_main(["tune-postprocessing", "--run-dir", str(run), "--min-cases", bad])
        assert e.value.code == 2 and "--min-cases must be at least 1" in capsys.readouterr().err
    assert eval_main(["tune-postprocessing", "--run-dir", str(run), "--min-cases", str(n)]) == 0
    made = json.loads((run / "postprocessing.json").read_text())
    assert made["validation_cases"] == sorted(c for f in folds for c in f["val"])
    assert made["validation"] == "out-of-fold predictions of every fold"


def test_a_run_without_validation_cases_is_refused(pp_run, tiny_store, tmp_path, capsys):
    store = tmp_path / "noval.zarr"
    shutil.copytree(tiny_store, store)
    root = json.loads((store / "zarr.json").read_text())
    splits = root["attributes"]["splits"]
    splits["train"], splits["val"] = splits["train"] + splits["val"], []
    (store / "zarr.json").write_text(json.dumps(root))
    capsys.readouterr()
    assert eval_main(["tune-postprocessing", "--run-dir", str(pp_run), "--store", str(store), "--min-cases",
                      "1"]) == 2
    assert "has no validation cases" in capsys.readouterr().err
