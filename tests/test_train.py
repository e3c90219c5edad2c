import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.checkpoints import CheckpointError, load_checkpoint, save_atomic
from train.cli import main as train_main

from .conftest import needs_cuda
from .helpers import free_port

TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--batch-size", "2", "--workers", "0"]


def _train(store, run_dir, *extra):
    return train_main(["--store", store, "--run-dir", str(run_dir), *TINY_NET, *extra])


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_one_epoch_end_to_end(tiny_store, tmp_path, capsys):
    assert _train(tiny_store, tmp_path / "run", "--epochs", "1", "--modalities", "t1", "t2", "flair", "--amp",
                  "--device", "cpu") == 0
    run = tmp_path / "run"
    for f in ("config.json", "best.pt", "last.pt", "metrics.jsonl"):
        assert (run / f).exists(), f
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["modalities"] == ["t1", "t2", "flair"] and cfg["epochs"] == 1
    (m,) = _metrics(run)
    assert set(m["dice"]) == {"TC", "WT", "ET"} and 0 <= m["dice_mean"] <= 1
    assert 0 <= m["data_wait_share"] <= 1 and m["samples_per_s"] > 0 and m["val_loss"] > 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
    best = load_checkpoint(run / "best.pt")
    assert best["config"]["modalities"] == ["t1", "t2", "flair"] and "model" in best
    out = capsys.readouterr().out
    assert "Dice TC" in out and "NC" not in out.replace("NCR", "")
    from train.device import cpu_has_bf16

    # --amp says what it does: on the CPU, bf16 autocast or plainly float32 where bf16 would be emulated (a GPU's
    # precision: test_amp_on_cuda_says_what_it_does)
    assert ("bf16 autocast (CPU)" if cpu_has_bf16() else "this CPU has no native bf16") in out


@needs_cuda
def test_amp_on_cuda_says_what_it_does(tiny_store, tmp_path, capsys):
    assert _train(tiny_store, tmp_path / "run", "--epochs", "1", "--modalities", "t1", "--amp",
                  "--device", "cuda") == 0
    out = capsys.readouterr().out
    assert ("bf16 autocast (CUDA)" if torch.cuda.is_bf16_supported() else "fp16 autocast + GradScaler") in out


def test_learning_rate_follows_cosine_with_restarts(tiny_store, tmp_path):
    assert _train(tiny_store, tmp_path / "run", "--epochs", "13", "--val-every", "100", "--lr", "0.001") == 0
    lrs = [m["lr"] for m in _metrics(tmp_path / "run")]
    expected = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * (e % 10) / 10)) / 2 for e in range(13)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert lrs[10] == pytest.approx(1e-3)  # the warm restart


def test_early_stopping_stops(tiny_store, tmp_path, capsys):
    # min-delta 10: no later validation loss (Dice loss <= 1) can count as better than the first
    assert _train(tiny_store, tmp_path / "run", "--epochs", "20", "--patience", "2", "--min-delta", "10") == 0
    assert len(_metrics(tmp_path / "run")) == 3
    assert "early stopping" in capsys.readouterr().out


def test_resume_matches_uninterrupted_run(tiny_store, tmp_path):
    assert _train(tiny_store, tmp_path / "a", "--epochs", "4", "--lr", "0.01") == 0
    assert _train(tiny_store, tmp_path / "b", "--epochs", "2", "--lr", "0.01") == 0
    assert _train(tiny_store, tmp_path / "b", "--epochs", "4", "--lr", "0.01", "--resume") == 0
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["epoch"] for m in b] == [0, 1, 2, 3]
    # on the CPU the resumed run repeats the uninterrupted one to float rounding; on a GPU, cuDNN may pick other
    # convolution algorithms in the second process, whose sums round differently
    rel = 1e-5 if torch.cuda.is_available() else 1e-6
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=rel, abs=1e-7)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=rel, abs=1e-7)
    assert a[2]["train_loss"] != a[1]["train_loss"]


def test_resume_with_another_config_is_refused(tiny_store, tmp_path, capsys):
    assert _train(tiny_store, tmp_path / "run", "--epochs", "1") == 0
    rc = _train(tiny_store, tmp_path / "run", "--epochs", "2", "--resume", "--lr", "0.5")
    err = capsys.readouterr().err
    assert rc == 2 and "another config" in err and "lr" in err
    assert len(_metrics(tmp_path / "run")) == 1  # nothing was done


def test_kfold_outputs(tiny_store, tmp_path):
    assert _train(tiny_store, tmp_path / "kf", "--epochs", "1", "--folds", "2") == 0
    report = json.loads((tmp_path / "kf" / "kfold.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1]
    for f in report["folds"]:
        assert (tmp_path / "kf" / f"fold-{f['fold']}" / "best.pt").exists()
        assert set(f["best_dice"]) == {"TC", "WT", "ET"} and f["best_val_loss"] > 0
    assert report["best_fold"] == min(report["folds"], key=lambda f: f["best_val_loss"])["fold"]
    assert _train(tiny_store, tmp_path / "one", "--epochs", "1", "--fold", "3") == 0
    assert json.loads((tmp_path / "one" / "config.json").read_text())["fold"] == 3


@pytest.mark.parametrize("args, message", [
    (["--modalities", "t1", "dwi"], "unknown modality dwi"),
    (["--patch-size", "64", "64", "64"], "larger than every training case"),
    (["--fold", "9"], "the store has 5 folds"),
    (["--patch-size", "16", "24", "16"], "so they must be square there: --patch-size 16 24 16"),
])
def test_bad_input_fails_before_work(tiny_store, tmp_path, capsys, args, message):
    rc = train_main(["--store", tiny_store, "--run-dir", str(tmp_path / "run"), "--channels", "4", "8", "16",
                     "--workers", "0", "--epochs", "1", *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_store_without_labels_is_refused(tmp_path, capsys):
    from prep.build import BuildConfig, build_store

    from .helpers import write_case

    for i in range(6):
        write_case(tmp_path / "raw", f"BraTS2021_0000{i}", seed=i, skip=("seg",))
    from prep.discover import discover

    assert discover(tmp_path / "raw").problems  # discovery needs seg by default; build unlabelled cases directly
    from prep.build import build_params, process_case
    from store.conventions import MODALITIES
    from store.writer import StoreWriter

    store = str(tmp_path / "s.zarr")
    params = build_params(BuildConfig())
    with StoreWriter(store, MODALITIES, "brats2021", params) as w:
        from prep.discover import discover_case
        from prep.splits import make_splits

        for i in range(6):
            res = process_case(discover_case(tmp_path / "raw" / f"BraTS2021_0000{i}", require_seg=False), store,
                               params, None)
            index = {**w.index, res["case_id"]: res["record"]}
            w.commit(index, make_splits({c: c for c in index}, 0), {})
    rc = train_main(["--store", store, "--run-dir", str(tmp_path / "run"), *TINY_NET, "--epochs", "1"])
    assert rc == 2 and "no labels" in capsys.readouterr().err
    del build_store


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_only_loading_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused for safety") as e:
        load_checkpoint(path)
    assert "weights_only=False" not in str(e.value)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.pt is damaged"):
        load_checkpoint(tmp_path / "cut.pt")
    save_atomic({"model": {"w": torch.ones(2)}, "config": {"a": 1}}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["config"] == {"a": 1}
    assert not list(tmp_path.glob(".ok.pt.tmp*"))


def test_two_process_ddp_on_cpu(tiny_store, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "train", "--store", tiny_store, "--run-dir", str(tmp_path / "ddp"), *TINY_NET, "--epochs", "2",
           "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(tmp_path / "ddp")
    assert [x["epoch"] for x in m] == [0, 1]  # one rank writes the logs
    assert "2 process(es)" in r.stdout
    assert (tmp_path / "ddp" / "best.pt").exists() and (tmp_path / "ddp" / "last.pt").exists()


def test_a_used_run_folder_is_refused_or_moved_aside_never_deleted(tiny_store, tmp_path, capsys):
    assert _train(tiny_store, tmp_path / "run", "--epochs", "2") == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert _train(tiny_store, tmp_path / "run", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # untouched
    assert _train(tiny_store, tmp_path / "run", "--epochs", "1", "--overwrite") == 0
    assert len(_metrics(tmp_path / "run")) == 1
    assert (tmp_path / "run.old-1" / "metrics.jsonl").read_text() == before  # moved, not deleted
    assert (tmp_path / "run.old-1" / "best.pt").exists()
    assert "moved to" in capsys.readouterr().out


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_a_run_opens_the_store_once(tiny_store, tmp_path, monkeypatch, cache):
    """From the command line to the loader's last batch, with a plan to check against the store: the store is
    opened once, and every case read (the cache's fill, the patches, validation) goes through that opening."""
    import store
    from train.config import TrainConfig
    from train.plan import make_plan
    from train.runfolder import write_json

    real, opened = store.open_store, []
    monkeypatch.setattr(store, "open_store", lambda *a, **k: opened.append(a) or real(*a, **k))
    spacing = real(tiny_store).params["spacing_mm"]
    plan = write_json(tmp_path / "plan.json", make_plan(TrainConfig(), "brats2021", spacing))
    assert _train(tiny_store, tmp_path / "run", "--epochs", "2", "--cache", cache, "--plan", str(plan)) == 0
    assert len(opened) == 1, opened
