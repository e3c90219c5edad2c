"""A model travels as a MONAI bundle and as a BraTS 2025 submission: MONAI's own runner (``python -m monai.bundle
run``) and the submission's entry point, each a process where no module of this project can be imported and the
network is blocked, give the labels of ``evaluate predict --model`` (in 2023+ values for the submission), name each
case they cannot read and predict the others, and write nowhere but the output folder."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from evaluate.cli import main as eval_main
from train.cli import main as train_main

from .helpers import lps_affine, oblique_affine, regridded

TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--workers", "0"]
PROJECT = ("prep", "store", "train", "evaluate", "benchmarks")
TO_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
# WT down to its largest component, and ET under 1e9 mm3 made necrosis: rules that change these cases (the second
# always), so they must travel
RULES = {"convention": "brats2021", "regions": ["TC", "WT", "ET"], "min_component_mm3": {"WT": 1e9},
         "et_relabel_below_mm3": 1e9}

SITE = f"""
import importlib.abc, socket, sys

class _NotThisProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {PROJECT!r}:
            raise ModuleNotFoundError(f"{{name}}: this project's modules are blocked here")
        return None

sys.meta_path.insert(0, _NotThisProject())

def _blocked(*args, **kwargs):
    raise OSError("network access is blocked here")

socket.socket.connect = socket.socket.connect_ex = _blocked
socket.create_connection = socket.getaddrinfo = _blocked
"""


@pytest.fixture(scope="module")
def exported(tiny_store, tmp_path_factory):
    """A tiny 4-modality run with a postprocessing rule, exported as a bundle and as a submission."""
    root = tmp_path_factory.mktemp("bundle")
    run = root / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), *TINY_NET, "--epochs", "2",
                       "--modalities", "t1", "t1ce", "t2", "flair"]) == 0
    (run / "postprocessing.json").write_text(json.dumps(RULES))
    assert train_main(["export", "--run-dir", str(run), "--format", "bundle", "--out", str(root / "bundle")]) == 0
    assert train_main(["export", "--run-dir", str(run), "--format", "brats-submission"]) == 0
    return {"run": run, "bundle": root / "bundle", "submission": run / "export" / "brats-submission"}


def _sandbox(tmp_path: Path) -> tuple[dict, list[str]]:
    """The environment and command prefix of a process that cannot import this project nor reach a network (its
    own network namespace where unshare allows it, and sockets that refuse to connect either way), with HOME and
    TMPDIR empty folders of its own."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    unshare = shutil.which("unshare")
    isolated = unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0
    return env, ([unshare, "-rn"] if isolated else [])


def _run(cmd, env, prefix, cwd):
    return subprocess.run([*prefix, *cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _labels(folder: Path) -> dict:
    return {p.name.removesuffix(".nii.gz"): np.asarray(nib.load(str(p)).dataobj)
            for p in sorted(folder.glob("*.nii.gz"))}


def _cases_2023(cohort: Path, out: Path, flat: bool, ids=None) -> Path:
    """The cohort's cases under BraTS 2023+ file names: one folder per case, or every file side by side (as the
    BraTS 2025 organisers' /input)."""
    for case in sorted(p for p in cohort.iterdir() if p.is_dir()):
        if ids is not None and case.name not in ids:
            continue
        dest = out if flat else out / case.name
        dest.mkdir(parents=True, exist_ok=True)
        for m, new in TO_2023.items():
            shutil.copyfile(case / f"{case.name}_{m}.nii.gz", dest / f"{case.name}-{new}.nii.gz")
    return out


def test_the_sandbox_blocks_this_project_and_the_network(tmp_path):
    env, prefix = _sandbox(tmp_path)
    for code in ("import train", "import store.reader",
                 "import socket; socket.create_connection(('127.0.0.1', 9))"):
        r = _run([sys.executable, "-c", code], env, prefix, tmp_path)
        assert r.returncode != 0 and ("blocked" in r.stderr or "unreachable" in r.stderr), (code, r.stderr)
    assert _run([sys.executable, "-c", "import monai, nibabel, scipy, ignite"], env, prefix, tmp_path).returncode == 0


def test_the_bundle_has_the_specifications_layout_and_fields(exported):
    b = exported["bundle"]
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "models/model-card.json",
              "scripts/__init__.py", "scripts/brats.py", "docs/README.md", "LICENSE"):
        assert (b / f).is_file(), f
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "optional_packages_version", "task", "description", "authors", "copyright", "data_type",
                "image_classes", "label_classes", "pred_classes", "eval_metrics", "intended_use",
                "network_data_format"):
        assert key in meta, key
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 4 and image["channel_def"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert image["spatial_shape"] == [16, 16, 16] and image["dtype"] == "float32" and image["modality"] == "MR"
    assert pred["num_channels"] == 3 and pred["format"] == "segmentation" and pred["value_range"] == [0, 1]
    assert "1 NCR" in meta["label_classes"] and "4 ET" in meta["label_classes"]
    config = json.loads((b / "configs" / "inference.json").read_text())
    assert [t["_target_"] for t in config["preprocessing"]["transforms"]] == \
        ["LoadImaged", "Orientationd", "Spacingd", "CropForegroundd", "NormalizeIntensityd"]
    assert config["inferer"]["_target_"] == "SlidingWindowInferer" and config["rules"] == RULES
    imported = set()
    for node in ast.walk(ast.parse((b / "scripts" / "brats.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.partition(".")[0])
    assert imported <= {"__future__", "sys", "uuid", "pathlib", "numpy", "nibabel", "scipy", "torch", "monai"}, imported


SOURCES = {"at the model's spacing": None, "5 x 5 x 3.9 mm (LPS)": lps_affine((5.0, 5.0, 3.9)),
           "oblique": oblique_affine() @ np.diag([4.0, 5.0, 2.5, 1.0])}


@pytest.mark.parametrize("grid", list(SOURCES))
def test_monais_runner_predicts_the_labels_of_evaluate_predict(exported, tiny_cohort, tmp_path, grid):
    """``python -m monai.bundle run`` with the input and output folders on its command line, in a process that
    cannot import this project, against ``evaluate predict --model`` of the bundle's own model file: the same
    grids, and the same label in at least 99.9% of the voxels of every case, on sources at the model's spacing
    (cropped before any resampling by the project) and on anisotropic and oblique ones (resampled, then cropped).
    The steps are the same MONAI transforms in the same order and the same sliding window, but not the same code
    back: the bundle returns the probabilities through MONAI's Invertd step by step, the project uncrops and
    resamples in one SpatialResample, and this barely trained network's probabilities lie near 0.5 everywhere,
    where float rounding decides a voxel."""
    b = exported["bundle"]
    if SOURCES[grid] is not None:
        tiny_cohort = regridded(tiny_cohort, tmp_path / "sources", SOURCES[grid])
    assert eval_main(["predict", "--model", str(b / "models" / "model.ts"), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "project")]) == 0
    ours = _labels(tmp_path / "project")
    assert eval_main(["predict", "--model", str(b / "models" / "model.ts"), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "raw"), "--no-postprocessing"]) == 0
    assert any((label != ours[k]).any() for k, label in _labels(tmp_path / "raw").items())  # the rules matter
    env, prefix = _sandbox(tmp_path)
    out = tmp_path / "bundle-out"
    r = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
              "--dataset_dir", str(tiny_cohort), "--output_dir", str(out)], env, prefix, b)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = _labels(out)
    assert sorted(theirs) == sorted(ours) and len(ours) == 6
    for case, label in ours.items():
        assert theirs[case].shape == label.shape and (theirs[case] == label).mean() >= 0.999, case
        ref = nib.load(str(tmp_path / "project" / f"{case}.nii.gz"))
        assert np.allclose(nib.load(str(out / f"{case}.nii.gz")).affine, ref.affine, atol=1e-4)
    assert any((label > 0).any() for label in ours.values())  # tumour predicted somewhere


@pytest.mark.parametrize("flat", [False, True], ids=["a folder per case (2023)", "files side by side (2025)"])
def test_the_submission_entry_predicts_in_2023_labels(exported, tiny_cohort, tmp_path, flat):
    """The entry point as a process, input and output folders passed to it, network blocked, this project not
    importable: one file per case id in BraTS 2023+ values, exactly the labels of MONAI's runner on the bundle
    (the same code: ``--labels brats2023``, on the same images under 2021 names), and those of ``evaluate predict
    --model`` in at least 99.9% of each case's voxels; nothing written outside the output folder (HOME, TMPDIR,
    the working folder stay empty), the input left as it was."""
    sub = exported["submission"]
    assert {p.name for p in sub.iterdir()} >= {"Dockerfile", "predict.py", "bundle", "README.md"}
    assert eval_main(["predict", "--model", str(sub / "bundle" / "models" / "model.ts"), "--source",
                      str(tiny_cohort), "--out", str(tmp_path / "project")]) == 0
    project = {k: np.select([v == 4, v == 2, v == 1], [3, 2, 1], 0) for k, v in _labels(tmp_path / "project").items()}
    env, prefix = _sandbox(tmp_path)
    r = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
              str(tiny_cohort), "--output_dir", str(tmp_path / "bundle-out"), "--labels", "brats2023"], env, prefix,
             sub / "bundle")
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = _labels(tmp_path / "bundle-out")
    cases = _cases_2023(tiny_cohort, tmp_path / "input", flat)
    before = sorted((p.relative_to(cases), p.stat().st_mtime_ns) for p in cases.rglob("*"))
    for d in ("home", "tmp"):
        shutil.rmtree(tmp_path / d)
        (tmp_path / d).mkdir()
    (tmp_path / "cwd").mkdir()
    r = _run([sys.executable, str(sub / "predict.py"), "--input", str(cases), "--output", str(tmp_path / "output")],
             env, prefix, tmp_path / "cwd")
    assert r.returncode == 0, r.stderr[-3000:]
    got = _labels(tmp_path / "output")
    assert sorted(got) == sorted(project) == sorted(bundle)
    for case, label in got.items():
        assert set(np.unique(label)) <= {0, 1, 2, 3} and (label > 0).any()
        assert (label == bundle[case]).all(), case
        assert (label == project[case]).mean() >= 0.999, case
    assert sorted((p.relative_to(cases), p.stat().st_mtime_ns) for p in cases.rglob("*")) == before
    assert not any(any((tmp_path / d).iterdir()) for d in ("home", "tmp", "cwd"))


def test_bad_cases_are_named_and_the_others_predicted(exported, tiny_cohort, tmp_path):
    """A case with a missing modality, a 4D image, two grids, a truncated file, a file that is not NIfTI: one line
    each naming the case (no traceback), every case read before inference, the good case predicted, status 1; the
    input unchanged (hashes) and the output folder's other files kept. Nothing to predict: one line, status 1."""
    from .helpers import spoil, tree_hashes

    sub = exported["submission"]
    ids = sorted(p.name for p in tiny_cohort.iterdir() if p.is_dir())
    cases = _cases_2023(tiny_cohort, tmp_path / "input", flat=False, ids=ids)
    good, missing, four_d, grids, truncated, text = ids
    (cases / missing / f"{missing}-t2f.nii.gz").unlink()
    spoil(cases / four_d / f"{four_d}-t1n.nii.gz", "4D")
    spoil(cases / grids / f"{grids}-t2w.nii.gz", "other grid")
    spoil(cases / truncated / f"{truncated}-t1c.nii.gz", "truncated")
    spoil(cases / text / f"{text}-t2f.nii.gz", "not NIfTI")
    before = tree_hashes(cases)
    out = tmp_path / "output"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    env, prefix = _sandbox(tmp_path)
    r = _run([sys.executable, str(sub / "predict.py"), "--input", str(cases), "--output", str(out)], env, prefix,
             tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("case ")]
    assert len(lines) == 5, r.stderr[-3000:]
    assert any(missing in line and "t2f" in line for line in lines)
    assert any(four_d in line and "4D" in line for line in lines)
    assert any(grids in line and "different grids" in line for line in lines)
    assert any(truncated in line and f"{truncated}-t1c.nii.gz cannot be read" in line for line in lines)
    assert any(text in line and f"{text}-t2f.nii.gz cannot be read" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", f"{good}.nii.gz"])
    assert (out / "notes.txt").read_text() == "kept" and tree_hashes(cases) == before
    (tmp_path / "empty").mkdir()
    r = _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
              "--dataset_dir", str(tmp_path / "empty"), "--output_dir", str(out)], env, prefix,
             exported["bundle"])
    assert r.returncode == 1 and "nothing to predict" in r.stderr


def test_outputs_are_checked_before_inference_and_nothing_is_replaced(exported, tiny_cohort, tmp_path):
    """MONAI's runner on the bundle, and the submission's entry point: an output inside the input (through a link)
    or one that cannot be written is one line before any case is read (no traceback); a prediction already in the
    output is kept and named, and replaced only with overwrite; the runner started from another folder with the
    configuration's full path finds the bundle's files."""
    from .helpers import tree_hashes

    env, prefix = _sandbox(tmp_path)
    b, sub = exported["bundle"], exported["submission"]
    ids = sorted(p.name for p in tiny_cohort.iterdir() if p.is_dir())[:2]
    cases = _cases_2023(tiny_cohort, tmp_path / "input", flat=True, ids=ids)
    before = tree_hashes(cases)
    (tmp_path / "link").symlink_to(cases)
    (tmp_path / "a-file").write_text("in the way")
    entry = [sys.executable, str(sub / "predict.py"), "--input", str(cases), "--output"]
    runner = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(b / "configs" / "inference.json"),
              "--dataset_dir", str(cases), "--output_dir"]
    for out, words in [(tmp_path / "link" / "out", "lies inside the input"), (tmp_path / "a-file" / "out",
                                                                                "cannot be written")]:
        for cmd, cwd in ((entry, tmp_path), (runner, b)):
            r = _run([*cmd, str(out)], env, prefix, cwd)
            assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
            assert "cannot be read" not in r.stderr  # found before any case was read
    assert tree_hashes(cases) == before
    out = tmp_path / "output"
    out.mkdir()
    (out / f"{ids[0]}.nii.gz").write_bytes(b"someone else's")
    r = _run([*entry, str(out)], env, prefix, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"kept 1 file(s) already in {out}" in r.stderr and f"{ids[0]}.nii.gz" in r.stderr
    assert (out / f"{ids[0]}.nii.gz").read_bytes() == b"someone else's" and (out / f"{ids[1]}.nii.gz").exists()
    r = _run([*entry, str(out), "--overwrite"], env, prefix, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert nib.load(str(out / f"{ids[0]}.nii.gz")).shape == nib.load(str(out / f"{ids[1]}.nii.gz")).shape
    (tmp_path / "elsewhere").mkdir()
    r = _run([*runner, str(tmp_path / "from-elsewhere"), "--labels", "brats2023"], env, prefix, tmp_path / "elsewhere")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for cid in ids:
        assert (np.asarray(nib.load(str(tmp_path / "from-elsewhere" / f"{cid}.nii.gz")).dataobj) ==
                np.asarray(nib.load(str(out / f"{cid}.nii.gz")).dataobj)).all()
    assert tree_hashes(cases) == before


def test_the_dockerfile_holds_only_inference(exported):
    text = (exported["submission"] / "Dockerfile").read_text()
    assert "nvidia/cuda" in text and "runtime" in text
    assert "COPY bundle /opt/brats/bundle" in text and "COPY predict.py" in text
    assert '"--input", "/input", "--output", "/output"' in text
    for pkg in ("torch==", "monai==", "nibabel==", "scipy==", "pytorch-ignite=="):
        assert pkg in text, pkg
    for other in ("zarr", "dask", "tensorboard", "brats-pipeline", "onnx"):
        assert other not in text, other


def test_export_bad_input(exported, tmp_path, capsys):
    assert train_main(["export", "--run-dir", str(exported["run"]), "--format", "bundle", "--out",
                       str(tmp_path / "m.onnx")]) == 2
    assert "writes a folder" in capsys.readouterr().err
    (tmp_path / "empty-run").mkdir()
    assert train_main(["export", "--run-dir", str(tmp_path / "empty-run"), "--format", "bundle"]) == 2
    assert "cannot export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["export", "--run-dir", str(exported["run"]), "--format", "zip"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, out", [("bundle", "b"), ("torchscript", "m.ts")])
def test_export_never_replaces_a_file_without_overwrite(exported, tmp_path, capsys, fmt, out):
    """A second export over the first is one line naming a file already there, nothing changed and no staging
    folder left; --overwrite replaces the export's files and leaves others."""
    from .helpers import tree_hashes

    argv = ["export", "--run-dir", str(exported["run"]), "--format", fmt, "--out", str(tmp_path / out)]
    assert train_main(argv) == 0
    (tmp_path / "other.txt").write_text("mine")
    before = tree_hashes(tmp_path)
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already" in err[-1] and "--overwrite" in err[-1]
    assert tree_hashes(tmp_path) == before
    assert train_main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "other.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
