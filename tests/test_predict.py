"""Challenge-ready prediction: whole folders, resumable, bad cases reported; test-time augmentation; ensembles
that travel; the pipeline that overlaps reading, inference and writing; the same on a Dask cluster (--workers,
--scheduler): the one-process files bit for bit, a rerun that predicts only what is missing, another model's folder
refused, an unreachable scheduler one line."""

import contextlib
import gzip
import json
import os
import shutil
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from evaluate.cli import main as eval_main
from evaluate.inference import MIRRORS, predict_probabilities
from evaluate.pipeline import run_pipeline
from train.cli import main as train_main
from train.runs import load_run

from .conftest import TINY as TINY_SHAPE
from .conftest import needs_cuda, no_cuda
from .helpers import dask_processes, fake_kfold, free_port

TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--workers", "0"]



@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    r = tmp_path_factory.mktemp("runs") / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(r), *TINY_NET, "--epochs", "1",
                       "--modalities", "t1", "t2", "flair"]) == 0
    return r


def test_run_pipeline_keeps_going_past_failures_and_overlaps_stages():
    threads = {"load": set(), "infer": set(), "finish": set()}
    finished = []

    def load(i):
        threads["load"].add(threading.current_thread().name)
        if i == 2:
            raise ValueError("bad input 2")
        return i * 10

    def infer(x):
        threads["infer"].add(threading.current_thread().name)
        if x == 40:
            raise RuntimeError("model failed on 4")
        return x + 1

    def finish(i, loaded, out):
        threads["finish"].add(threading.current_thread().name)
        if i == 6:
            raise OSError("disk")
        finished.append((i, loaded, out))

    failures = dict(run_pipeline(range(8), load, infer, finish))
    assert set(failures) == {2, 4, 6} and isinstance(failures[2], ValueError)
    assert sorted(finished) == [(i, 10 * i, 10 * i + 1) for i in (0, 1, 3, 5, 7)]
    # reading and writing run in their own threads, the model in the caller's
    assert all(t.startswith("load") for t in threads["load"]) and all(t.startswith("write") for t in threads["finish"])
    assert threads["infer"] == {threading.current_thread().name}


def test_tta_averages_the_eight_mirrorings(run, tiny_store):
    from store import open_store
    from train.device import amp_context
    from train.validation import sliding_window_logits

    assert len(MIRRORS) == 8 and len(set(MIRRORS)) == 8
    loaded = load_run(run)
    s = open_store(tiny_store)
    image = s.case(s.case_ids[0]).image(("t1", "t2", "flair"))
    got = predict_probabilities(loaded, image, "cpu", tta=True)
    x = torch.from_numpy(image)[None]
    autocast, _, _ = amp_context(loaded.config, torch.device("cpu"))
    model = loaded.models[0]
    manual = []
    for dims in MIRRORS:
        xi = torch.flip(x, dims) if dims else x
        p = torch.sigmoid(sliding_window_logits(model, xi, loaded.config, autocast))
        manual.append((torch.flip(p, dims) if dims else p)[0].numpy())
    np.testing.assert_allclose(got, np.mean(manual, axis=0), rtol=1e-5, atol=1e-6)
    plain = predict_probabilities(loaded, image, "cpu")
    np.testing.assert_allclose(plain, manual[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, plain)  # the mirrorings do change the average


def _cohort_with_bad_cases(tiny_cohort, tmp_path):
    src = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, src)
    (src / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").unlink()  # a modality the model reads
    t2 = src / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz"
    img = nib.load(t2)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-2], img.affine), t2)  # another grid than t1
    for seg in src.glob("*/*_seg.nii.gz"):
        seg.unlink()  # prediction needs no seg
    return src


def test_predict_a_whole_folder_resumes_and_reports_bad_cases(run, tiny_cohort, tmp_path, capsys):
    src = _cohort_with_bad_cases(tiny_cohort, tmp_path)
    out = tmp_path / "pred"
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(src), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "missing modality flair" in captured.err and "BraTS2021_00002" in captured.err
    good = ["BraTS2021_00000", "BraTS2021_00003", "BraTS2021_00004", "BraTS2021_00005"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in good]
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".nii.gz")) == [".predicted-by.json"]
    for c in good:
        pred, t1 = nib.load(out / f"{c}.nii.gz"), nib.load(src / c / f"{c}_t1.nii.gz")
        assert pred.shape == t1.shape and np.allclose(pred.affine, t1.affine)
        assert set(np.unique(np.asanyarray(pred.dataobj)).tolist()) <= {0, 1, 2, 4}
    assert "predicted 4, skipped 0" in captured.out
    # a second run skips what is written; a lost output is predicted again
    (out / "BraTS2021_00003.nii.gz").unlink()
    before = (out / "BraTS2021_00000.nii.gz").stat().st_mtime_ns
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(src), "--out", str(out)]) == 1
    assert "predicted 1, skipped 3" in capsys.readouterr().out
    assert (out / "BraTS2021_00003.nii.gz").exists()
    assert (out / "BraTS2021_00000.nii.gz").stat().st_mtime_ns == before


def test_folder_and_case_predictions_agree_and_predict_tta_writes_source_grid_labels(run, tiny_cohort, tmp_path):
    """--source and --case give the same labels; --tta writes a label map on the source grid in the source's
    values (that TTA averages the 8 mirrorings is test_tta_averages_the_eight_mirrorings)."""
    src = tmp_path / "one"
    shutil.copytree(tiny_cohort / "BraTS2021_00003", src / "BraTS2021_00003")
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(src), "--out", str(tmp_path / "f")]) == 0
    assert eval_main(["predict", "--run-dir", str(run), "--case", str(src / "BraTS2021_00003"), "--out",
                      str(tmp_path / "c.nii.gz")]) == 0
    a = np.asanyarray(nib.load(tmp_path / "f" / "BraTS2021_00003.nii.gz").dataobj)
    b = np.asanyarray(nib.load(tmp_path / "c.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b)
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(src), "--out", str(tmp_path / "t"),
                      "--tta"]) == 0
    tta, t1 = nib.load(tmp_path / "t" / "BraTS2021_00003.nii.gz"), nib.load(src / "BraTS2021_00003" /
                                                                             "BraTS2021_00003_t1.nii.gz")
    assert tta.shape == t1.shape and np.allclose(tta.affine, t1.affine)
    assert set(np.unique(np.asanyarray(tta.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_predict_bad_input(run, tiny_cohort, tiny_cohort_2023, tmp_path, capsys):
    src = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, src)
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(src), "--out", str(src / "pred")]) == 2
    assert "lies inside --source" in capsys.readouterr().err
    empty = tmp_path / "norun"
    empty.mkdir()
    assert eval_main(["predict", "--run-dir", str(empty), "--source", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort_2023),
                      "--out", str(tmp_path / "o2")]) == 2
    assert "trained on brats2021 labels" in capsys.readouterr().err


@no_cuda
def test_predict_on_cuda_without_one_is_one_line(run, tiny_cohort, tmp_path, capsys):
    rc = eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out", str(tmp_path / "o"),
                    "--device", "cuda"])
    assert rc == 2 and "--device cuda" in capsys.readouterr().err


@needs_cuda
def test_predict_on_cuda_gives_the_cpus_labels(run, tiny_cohort, tmp_path):
    for dev in ("cpu", "cuda"):
        assert eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out",
                          str(tmp_path / dev), "--device", dev]) == 0
    for f in sorted((tmp_path / "cpu").glob("*.nii.gz")):
        a = np.asanyarray(nib.load(f).dataobj)
        b = np.asanyarray(nib.load(tmp_path / "cuda" / f.name).dataobj)
        assert (a == b).mean() >= 0.999, f.name  # float rounding near 0.5 may differ between the devices


def test_an_ensemble_travels_with_its_run_folder(run, tiny_store, tmp_path):
    kf = fake_kfold(run, tmp_path / "kf", 2)  # its report holds absolute paths to where the folds were made
    moved = tmp_path / "elsewhere" / "kf"
    moved.parent.mkdir()
    shutil.move(str(kf), moved)
    ens = load_run(moved, ensemble=True)
    assert len(ens.models) == 2 and all(str(moved) in str(p) for p in ens.checkpoints)
    assert eval_main(["--run-dir", str(moved), "--ensemble", "--tta", "--metrics", "legacy"]) == 0
    assert (moved / "eval" / "test-tta.csv").exists() and (moved / "eval" / "test-tta.json").exists()


def test_predict_case_never_writes_over_an_input_or_an_existing_file(run, tiny_cohort, tmp_path, capsys):
    """--case with --out inside the case folder (the reference seg's own name among them, or through a link), a
    file for --case, a folder for --out, an existing --out without --overwrite: one line each, exit 2, nothing
    in the case folder changed and no temporary file left; --overwrite replaces the file."""
    from .helpers import tree_hashes

    case = tmp_path / "BraTS2021_00003"
    shutil.copytree(tiny_cohort / "BraTS2021_00003", case)
    before = tree_hashes(case)
    (tmp_path / "link").symlink_to(case)
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("a file in the way")
    base = ["predict", "--run-dir", str(run), "--case"]
    for argv, words in [
        ([str(case), "--out", str(case / "BraTS2021_00003_seg.nii.gz")], "lies inside --case"),
        ([str(case), "--out", str(tmp_path / "link" / "p.nii.gz")], "lies inside --case"),
        ([str(case / "BraTS2021_00003_t1.nii.gz"), "--out", str(tmp_path / "p.nii.gz")], "not a folder"),
        ([str(case), "--out", str(tmp_path / "a-folder")], "a folder; with --case"),
        ([str(case), "--out", str(tmp_path / "p.txt")], "names a .nii.gz file"),
        ([str(case), "--out", str(tmp_path / "a-file" / "p.nii.gz")], "a file, not a folder"),
    ]:
        assert eval_main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
    assert tree_hashes(case) == before and not list((tmp_path / "a-folder").iterdir())
    out = tmp_path / "p.nii.gz"
    out.write_bytes(b"someone else's file")
    assert eval_main([*base, str(case), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"someone else's file"
    assert eval_main([*base, str(case), "--out", str(out), "--overwrite"]) == 0
    assert nib.load(out).shape == nib.load(case / "BraTS2021_00003_t1.nii.gz").shape
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file
    assert tree_hashes(case) == before


def test_predict_source_keeps_what_is_there_unless_overwrite(run, tiny_cohort, tmp_path, capsys):
    """A file already in --out is kept and named (a killed run resumes); --overwrite predicts it again. An --out
    inside the cohort through a link is refused; the cohort is unchanged (hashes)."""
    from .helpers import tree_hashes

    before = tree_hashes(tiny_cohort)
    (tmp_path / "link").symlink_to(tiny_cohort)
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out",
                      str(tmp_path / "link" / "pred")]) == 2
    assert "lies inside --source" in capsys.readouterr().err
    out = tmp_path / "pred"
    out.mkdir()
    (out / "BraTS2021_00000.nii.gz").write_bytes(b"mine")
    (out / "notes.txt").write_text("kept")
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predicted 5, skipped 1" in printed and "kept 1 file(s)" in printed and "BraTS2021_00000.nii.gz" in printed
    assert (out / "BraTS2021_00000.nii.gz").read_bytes() == b"mine" and (out / "notes.txt").read_text() == "kept"
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out", str(out),
                      "--overwrite"]) == 0
    assert "predicted 6, skipped 0" in capsys.readouterr().out
    assert nib.load(out / "BraTS2021_00000.nii.gz").shape == TINY_SHAPE and (out / "notes.txt").read_text() == "kept"
    assert tree_hashes(tiny_cohort) == before


# ---------------------------------------------------------------------------------- on a Dask cluster


def _decoded(folder):
    return {p.name: gzip.decompress(p.read_bytes()) for p in sorted(folder.glob("*.nii.gz"))}


def test_two_workers_write_the_one_process_files_and_a_rerun_predicts_only_what_is_missing(run, tiny_cohort, tmp_path,
                                                                                           capsys):
    src = _cohort_with_bad_cases(tiny_cohort, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["predict", "--run-dir", str(run), "--source", str(src)]
    assert eval_main([*base, "--out", str(one)]) == 1
    capsys.readouterr()
    assert eval_main([*base, "--out", str(two), "--workers", "2"]) == 1
    captured = capsys.readouterr()
    # the bad cases: one line each, the four good ones written
    assert "missing modality flair" in captured.err and "case BraTS2021_00002" in captured.err
    assert "predicted 4, skipped 0" in captured.out
    assert len(_decoded(two)) == 4 and _decoded(two) == _decoded(one)  # every voxel and header byte
    marker = json.loads((two / ".predicted-by.json").read_text())
    assert marker == json.loads((one / ".predicted-by.json").read_text()) and len(marker["model_sha256"]) == 64
    assert not [p for p in two.iterdir() if ".tmp" in p.name]
    (two / "BraTS2021_00004.nii.gz").unlink()
    kept = (two / "BraTS2021_00000.nii.gz").stat().st_mtime_ns
    assert eval_main([*base, "--out", str(two), "--workers", "2"]) == 1
    assert "predicted 1, skipped 3" in capsys.readouterr().out
    assert _decoded(two) == _decoded(one) and (two / "BraTS2021_00000.nii.gz").stat().st_mtime_ns == kept


def test_another_models_folder_and_an_unreachable_scheduler_are_one_line(run, tiny_cohort, tmp_path, capsys):
    out = tmp_path / "pred"
    base = ["predict", "--run-dir", str(run), "--source", str(tiny_cohort), "--out", str(out)]
    assert eval_main(base) == 0
    names = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert eval_main([*base, "--tta", "--workers", "2"]) == 2  # the same model with TTA writes other labels
    err = capsys.readouterr().err.strip()
    assert "holds predictions made otherwise (their tta differ" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == names
    port = free_port()
    assert eval_main([*base[:-1], str(tmp_path / "other"), "--scheduler", f"tcp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--scheduler tcp://127.0.0.1:{port}: no Dask scheduler answered there" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        eval_main(["predict", "--run-dir", str(run), "--case", str(tiny_cohort / "BraTS2021_00000"), "--out",
                   str(tmp_path / "x.nii.gz"), "--workers", "2"])
    assert "go with --source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main([*base[:-1], str(tmp_path / "neg"), "--workers", "-1"])
    assert "--workers must be 0 or more, not -1" in capsys.readouterr().err


def test_a_worker_killed_mid_run_loses_nothing_and_writes_nothing_twice(run, tmp_path):
    """A cluster of a scheduler and 2 worker processes (Dask's own command lines): one worker is killed once the
    first prediction is written; every case is predicted, each file written once (its inode never changes while
    the run goes on) and whole, and the files are the one-process files byte for byte after decompression."""
    import signal
    import subprocess
    import sys

    from .helpers import write_case

    src = tmp_path / "raw"
    n = 8
    for i in range(n):
        write_case(src, f"BraTS2021_{i:05d}", seed=i, shape=(48, 52, 36))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "pred"
    with dask_processes(2) as (address, workers, procs):
        predict = subprocess.Popen([sys.executable, "-m", "evaluate", "predict", "--run-dir", str(run), "--source",
                                    str(src), "--out", str(out), "--scheduler", address], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(predict)
        inodes: dict = {}

        def look():
            for p in [p for p in out.glob("*.nii.gz") if not p.name.startswith(".")] if out.exists() else []:
                with contextlib.suppress(FileNotFoundError):
                    inodes.setdefault(p.name, set()).add(p.stat().st_ino)

        deadline = time.time() + 180
        while not inodes and predict.poll() is None and time.time() < deadline:
            look()
            time.sleep(0.01)
        assert predict.poll() is None and len(inodes) < n, "the run ended before a worker could be killed"
        workers[0].send_signal(signal.SIGKILL)  # a worker dies, holding a case or about to take one
        while predict.poll() is None and time.time() < deadline:
            look()
            time.sleep(0.01)
        stdout, stderr = predict.communicate(timeout=60)
        look()
        assert predict.returncode == 0, stderr[-3000:]
        assert f"predicted {n}, skipped 0 already written, failed 0" in stdout
    assert sorted(inodes) == [f"BraTS2021_{i:05d}.nii.gz" for i in range(n)]
    assert all(len(seen) == 1 for seen in inodes.values()), inodes  # written once each
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    one = tmp_path / "one"
    assert eval_main(["predict", "--run-dir", str(run), "--source", str(src), "--out", str(one)]) == 0
    assert _decoded(out) == _decoded(one)  # whole: every file decompresses, to the one-process bytes
