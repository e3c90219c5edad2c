"""Exported models travel without the training code: ONNX (onnxruntime) and TorchScript files with their model
card give the torch model's label maps on the test cases; bad exports and mismatched cohorts are one line."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from evaluate.cli import main as eval_main
from evaluate.exported import load_exported
from train.cli import main as train_main
from train.export import EnsembleNet
from train.options import training_command
from train.runs import load_run

from .helpers import fake_kfold, lps_affine, regridded

TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--workers", "0"]


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    r = tmp_path_factory.mktemp("export") / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(r), *TINY_NET, "--epochs", "2",
                       "--modalities", "t1", "t2", "flair"]) == 0
    assert eval_main(["--run-dir", str(r), "--metrics", "legacy"]) == 0  # scores for the card
    (r / "postprocessing.json").write_text(json.dumps({  # a rule that changes something, so it must travel
        "convention": "brats2021", "regions": ["TC", "WT", "ET"], "min_component_mm3": {},
        "et_relabel_below_mm3": 1e9}))
    return r


def _labels(folder):
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


@pytest.mark.parametrize("fmt, file", [("onnx", "model.onnx"), ("torchscript", "model.ts")])
def test_exported_model_predicts_the_torch_models_labels(run, tiny_cohort, tmp_path, fmt, file, capsys):
    out = tmp_path / "export"
    assert train_main(["export", "--run-dir", str(run), "--format", fmt, "--out", str(out)]) == 0
    card = json.loads((out / "model-card.json").read_text())
    assert card["file"] == file and card["input"]["modalities"] == ["t1", "t2", "flair"]
    assert card["input"]["patch_size"] == [16, 16, 16] and card["output"]["regions"] == ["TC", "WT", "ET"]
    assert card["output"]["label_convention"] == "brats2021" and card["input"]["orientation"] == "RAS"
    assert card["input"]["spacing_mm"] == json.loads((run / "preprocessing.json").read_text())["params"]["spacing_mm"]
    assert "dice_wt" in card["scores"]["test"]["means"] and card["postprocessing"]["et_relabel_below_mm3"] == 1e9
    assert card["training"]["command"].startswith("python -m train ") and "--patch-size 16 16 16" in \
        card["training"]["command"] and card["project_version"]
    # logits of the exported network against the torch model's, on a batch of real-sized patches
    torch_run, exported = load_run(run), load_exported(out / file)
    x = torch.randn(2, 3, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(exported.models[0](x), torch_run.models[0](x), atol=1e-4)
    # whole cases: the same label maps as the run folder's (postprocessing included)
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "torch")]) == 0
    assert eval_main(["predict", "--model", str(out / file), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "exported")]) == 0
    a, b = _labels(tmp_path / "torch"), _labels(tmp_path / "exported")
    assert a.keys() == b.keys() and len(a) == 6 and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(v.any() for v in a.values())
    if fmt == "onnx":  # the run's postprocessing changes these predictions, and it travelled with the model
        assert eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out",
                          str(tmp_path / "raw"), "--no-postprocessing"]) == 0
        assert any(not np.array_equal(v, a[k]) for k, v in _labels(tmp_path / "raw").items())


def test_the_model_travels_with_its_card_alone(run, tiny_cohort, tmp_path, capsys):
    """--out naming a file writes that file and its card beside it; copied elsewhere, the two predict the run's
    labels with its postprocessing (which the card carries); a folder given to --model takes the model inside."""
    import shutil

    assert train_main(["export", "--run-dir", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").is_file() and json.loads((tmp_path / "m-card.json").read_text())["file"] == "m.onnx"
    card = json.loads((tmp_path / "m-card.json").read_text())
    assert card["scores"]["test"]["model"] == "single model"  # what evaluate recorded
    assert card["postprocessing"]["et_relabel_below_mm3"] == 1e9
    away = tmp_path / "elsewhere"
    away.mkdir()
    for f in ("m.onnx", "m-card.json"):
        shutil.copy(tmp_path / f, away / f)
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "torch")]) == 0
    assert eval_main(["predict", "--model", str(away), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "away")]) == 0  # the folder: its one model
    a, b = _labels(tmp_path / "torch"), _labels(tmp_path / "away")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # postprocessing included
    assert not any((v == 4).any() for v in b.values())  # the card's rule: every ET relabelled
    # a postprocessing.json beside it that differs from the card's: an error naming both
    (away / "postprocessing.json").write_text(json.dumps({**card["postprocessing"], "et_relabel_below_mm3": 0.0}))
    capsys.readouterr()
    assert eval_main(["predict", "--model", str(away / "m.onnx"), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "p")]) == 2
    e = capsys.readouterr().err
    assert "postprocessing.json differs from the postprocessing in" in e and "m-card.json" in e
    (away / "postprocessing.json").write_text(json.dumps(card["postprocessing"]))  # the same: fine
    assert eval_main(["predict", "--model", str(away / "m.onnx"), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "p")]) == 0
    # a folder of two models, a folder of none, a file name of the other format
    shutil.copy(tmp_path / "m.onnx", away / "n.onnx")
    shutil.copy(tmp_path / "m-card.json", away / "n-card.json")
    capsys.readouterr()
    assert eval_main(["predict", "--model", str(away), "--source", str(tiny_cohort), "--out", str(tmp_path / "q")]) == 2
    assert "holding m.onnx, n.onnx: name the model file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert eval_main(["predict", "--model", str(tmp_path / "empty"), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "q")]) == 2
    assert "holding no model file" in capsys.readouterr().err
    assert train_main(["export", "--run-dir", str(run), "--format", "torchscript", "--out",
                       str(tmp_path / "x.onnx")]) == 2
    e = capsys.readouterr().err
    assert "a .onnx file is onnx, not --format torchscript; name it x.ts" in e and len(e.strip().splitlines()) == 1


def test_a_kfold_ensemble_exports_as_one_network(run, tmp_path):
    kf = tmp_path / "kf"
    fake_kfold(run, kf, 2)
    ck = torch.load(kf / "fold-1" / "best.pt", weights_only=True)  # two different members
    ck["model"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, kf / "fold-1" / "best.pt")
    assert train_main(["export", "--run-dir", str(kf), "--format", "torchscript", "--ensemble", "--out",
                       str(tmp_path / "e")]) == 0
    card = json.loads((tmp_path / "e" / "model-card.json").read_text())
    assert card["inference"]["ensemble"] and card["kind"] == "ensemble of 2 folds"
    members = load_run(kf, ensemble=True).models
    x = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():  # the sigmoid of the one network is the members' mean probability
        mean = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
        assert not torch.allclose(members[0](x), members[1](x))
        assert torch.allclose(torch.sigmoid(load_exported(tmp_path / "e" / "model.ts").models[0](x)), mean, atol=1e-5)
        assert torch.allclose(EnsembleNet(members[:1])(x), members[0](x))


def test_export_and_predict_bad_input(run, tiny_cohort_2023, tmp_path, capsys):
    def err(rc_expected, argv, main):
        assert main(argv) == rc_expected
        e = capsys.readouterr().err
        assert len(e.strip().splitlines()) == 1, e
        return e

    assert "no checkpoint" in err(2, ["export", "--run-dir", str(tmp_path), "--format", "onnx"], train_main)
    out = tmp_path / "export"
    assert train_main(["export", "--run-dir", str(run), "--format", "onnx", "--out", str(out)]) == 0
    capsys.readouterr()
    # a cohort in another label convention (2023 names) than the model's (2021 labels)
    e = err(2, ["predict", "--model", str(out / "model.onnx"), "--source", str(tiny_cohort_2023), "--out",
                str(tmp_path / "p")], eval_main)
    assert "brats2021 labels" in e and "brats2023" in e
    (out / "model-card.json").rename(out / "card.json")
    e = err(2, ["predict", "--model", str(out / "model.onnx"), "--source", str(tiny_cohort_2023), "--out",
                str(tmp_path / "p")], eval_main)
    assert "model-card.json" in e and "model.onnx" in e
    e = err(2, ["predict", "--model", str(tmp_path / "nothing.onnx"), "--source", str(tiny_cohort_2023), "--out",
                str(tmp_path / "p")], eval_main)
    assert "no such file" in e
    # a damaged card, and a card that describes another file
    (out / "model-card.json").write_text("{not json")
    e = err(2, ["predict", "--model", str(out / "model.onnx"), "--case", str(next(tiny_cohort_2023.iterdir())),
                "--out", str(tmp_path / "p.nii.gz")], eval_main)
    assert "model-card.json is damaged" in e and "export the run again" in e
    (out / "model-card.json").write_text(json.dumps({**json.loads((out / "card.json").read_text()),
                                                     "file": "model.ts"}))
    e = err(2, ["predict", "--model", str(out / "model.onnx"), "--case", str(next(tiny_cohort_2023.iterdir())),
                "--out", str(tmp_path / "p.nii.gz")], eval_main)
    assert "describes model.ts, not model.onnx" in e
    # --ensemble with an exported model, and an ONNX model asked to run on a GPU
    (out / "card.json").rename(out / "model-card.json")
    e = err(2, ["predict", "--model", str(out / "model.onnx"), "--ensemble", "--source", str(tiny_cohort_2023),
                "--out", str(tmp_path / "p")], eval_main)
    assert "--ensemble with --model" in e and "python -m train export --ensemble" in e
    from train.runs import RunError

    with pytest.raises(RunError, match="ONNX models run on the CPU here"):
        load_exported(out / "model.onnx", "cuda")


def test_an_ensemble_of_different_patch_sizes_is_not_exported(run, tmp_path, capsys):
    kf = tmp_path / "kf"
    fake_kfold(run, kf, 2)
    ck = torch.load(kf / "fold-1" / "best.pt", weights_only=True)
    ck["config"]["patch_size"] = [32, 32, 32]
    torch.save(ck, kf / "fold-1" / "best.pt")
    assert train_main(["export", "--run-dir", str(kf), "--format", "onnx", "--ensemble", "--out",
                       str(tmp_path / "e")]) == 2
    e = capsys.readouterr().err
    assert "different patch sizes" in e and "export each run by itself" in e and len(e.strip().splitlines()) == 1
    assert not (tmp_path / "e" / "model.onnx").exists()


def test_the_training_command_reproduces_the_configuration(run):
    from train.config import TrainConfig
    from train.options import build_parser, config_from_args

    cfg = TrainConfig.load(run / "config.json")
    again = config_from_args(build_parser().parse_args(training_command(cfg).split()[3:]))
    assert {k: v for k, v in again.to_dict().items() if k not in ("resume", "overwrite")} == \
        {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "overwrite")}


def _predict_from_card(card: dict, model_path, case_dir):
    """A predictor written from the model card alone: nibabel, MONAI's transforms and sliding window, onnxruntime,
    scipy; no module of this project. Returns the label map on the source grid."""
    import nibabel as nib
    import onnxruntime as ort
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import NormalizeIntensity, Orientation, Spacing, SpatialResample
    from scipy import ndimage

    steps = {s["step"]: s for s in card["recipe"]}
    files = [next(case_dir.glob(f"*_{m}.nii.gz")) for m in card["input"]["modalities"]]
    first = nib.load(str(files[0]))
    data = np.stack([np.asarray(nib.load(str(f)).dataobj, np.float32) for f in files])
    x = MetaTensor(torch.from_numpy(data), affine=torch.from_numpy(first.affine))
    x = Orientation(axcodes="RAS")(x)
    grid = Spacing(pixdim=steps["spacing"]["mm"], mode=steps["spacing"]["interpolation"],
                   padding_mode=steps["spacing"]["padding_mode"])(x)
    nonzero = np.argwhere(np.asarray((grid != 0).any(0)))
    margin = steps["crop"]["crop_margin"]
    lo = np.maximum(nonzero.min(0) - margin, 0)
    hi = np.minimum(nonzero.max(0) + margin + 1, grid.shape[1:])
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    x = NormalizeIntensity(nonzero=True, channel_wise=True)(grid.as_tensor()[(slice(None), *box)])
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def net(t):
        return torch.from_numpy(session.run(None, {card["input"]["name"]: t.numpy()})[0])

    sw = steps["sliding window"]
    with torch.no_grad():
        logits = sliding_window_inference(x[None].float(), sw["roi_size"], sw["sw_batch_size"], net,
                                          overlap=sw["overlap"], mode=sw["mode"], padding_mode=sw["padding_mode"],
                                          cval=sw["cval"])
    prob = torch.zeros((logits.shape[1], *grid.shape[1:]))
    prob[(slice(None), *box)] = torch.sigmoid(logits)[0]  # uncropped: 0 outside the crop
    back = SpatialResample(mode="bilinear", padding_mode=steps["to the source grid"]["padding_mode"])(
        MetaTensor(prob, affine=grid.affine), dst_affine=torch.from_numpy(first.affine), spatial_size=first.shape)
    regions = dict(zip(card["output"]["regions"], np.asarray(back) > steps["threshold"]["value"]))
    regions["TC"] |= regions["ET"]  # the labels nest: ET inside TC inside WT
    regions["WT"] |= regions["TC"]
    rules = card["postprocessing"] or {"min_component_mm3": {}, "et_relabel_below_mm3": 0.0}
    voxel = float(np.prod(first.header.get_zooms()[:3]))
    inner = {"WT": ("WT", "TC", "ET"), "TC": ("TC", "ET"), "ET": ("ET",)}
    for name in ("WT", "TC", "ET"):
        k = rules["min_component_mm3"].get(name, 0)
        parts, n = ndimage.label(regions[name], np.ones((3, 3, 3)))
        if k and n:
            sizes = np.bincount(parts.ravel())
            small = sizes * voxel < k
            small[0] = False
            small[1 + np.argmax(sizes[1:])] = False
            for r in inner[name]:
                regions[r] &= ~small[parts]
    if 0 < regions["ET"].sum() * voxel < rules["et_relabel_below_mm3"]:
        regions["ET"][:] = False
    values = steps["labels"]["values"]
    label = np.zeros(first.shape, np.uint8)
    label[regions["WT"]] = values["edema"]
    label[regions["TC"]] = values["necrosis"]
    label[regions["ET"]] = values["enhancing"]
    return label


@pytest.mark.parametrize("grid", ["at the model's spacing", "5 x 5 x 3.9 mm (LPS)"])
def test_a_predictor_written_from_the_card_alone_gives_the_projects_labels(run, tiny_cohort, tmp_path, grid):
    """The card's steps, in its order, by a predictor that shares no code with this project: the project's labels
    in at least 99.9% of each case's voxels, on sources at the model's spacing and on sources it resamples."""
    if grid != "at the model's spacing":
        tiny_cohort = regridded(tiny_cohort, tmp_path / "sources", lps_affine((5.0, 5.0, 3.9)))
    out = tmp_path / "export"
    assert train_main(["export", "--run-dir", str(run), "--format", "onnx", "--out", str(out)]) == 0
    card = json.loads((out / "model-card.json").read_text())
    assert [s["step"] for s in card["recipe"]][:5] == ["read", "orientation", "spacing", "crop", "normalisation"]
    assert eval_main(["predict", "--model", str(out / "model.onnx"), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "project")]) == 0
    ours = _labels(tmp_path / "project")
    assert len(ours) == 6
    for name, label in ours.items():
        theirs = _predict_from_card(card, out / "model.onnx", tiny_cohort / name.removesuffix(".nii.gz"))
        assert (theirs == label).mean() >= 0.999, name
