"""Fault injection: damaged stores fail loudly, runs are never overwritten, kills and full disks leave a valid store,
and every error a user can cause is one line naming the file or flag."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from evaluate.cli import main as eval_main
from prep.build import BuildConfig, build_store, run_cli
from prep.discover import discover
from store import FormatError, open_store
from store.cli import main as store_main
from store.format import CURRENT
from store.verify import verify_store
from train.cli import main as train_main

from .conftest import TINY
from .helpers import synth_spacing, write_case

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--batch-size", "2", "--workers", "0"]


@pytest.fixture
def store(tiny_store, tmp_path):
    """A private copy of the tiny store, free to damage."""
    dst = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, dst)
    return dst


def _case_dir(store_path, case_id):
    rec = open_store(store_path).index[case_id]
    return Path(store_path, rec["group"])


def _train(store_path, run_dir, *extra):
    return train_main(["--store", str(store_path), "--run-dir", str(run_dir), *TINY_NET, "--epochs", "1", *extra])


# ----------------------------------------------------------------------------------------- damaged stores


@pytest.mark.parametrize("cache", ["none", "ram"])
def test_a_deleted_shard_fails_every_read_path_naming_case_and_object(store, tmp_path, capsys, cache):
    cid = open_store(store).splits["train"][0]
    (_case_dir(store, cid) / "image" / "c.0.0.0.0").unlink()
    assert _train(store, tmp_path / "run", "--cache", cache) != 0
    err = capsys.readouterr().err
    assert f"case {cid}" in err and "image/c.0.0.0.0 is missing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    faults = verify_store(open_store(store))
    assert any(cid in f and "image/c.0.0.0.0" in f for f in faults)


def test_a_truncated_shard_and_a_damaged_chunk_are_caught(store, tmp_path, capsys):
    s = open_store(store)
    a, b = s.splits["train"][:2]
    shard = _case_dir(store, a) / "image" / "c.1.0.0.0"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(FormatError, match=f"case {a}: object image/c.1.0.0.0 is {len(data) - 100} bytes"):
        open_store(store).case(a)
    shard.write_bytes(data)  # back to whole
    # same size, one flipped bit inside a chunk: no listing sees it; blosc refuses the chunk as it decodes (a
    # damaged chunk that still decodes is the checksum's: test_the_ram_fill_checks_each_cases_checksum)
    label = _case_dir(store, b) / CURRENT.label_path / "c.0.0.0"
    raw = bytearray(label.read_bytes())
    raw[40] ^= 0x10
    label.write_bytes(bytes(raw))
    from train.loader import load_case_arrays

    with pytest.raises((FormatError, RuntimeError, ValueError), match=f"{b}|blosc|decompress"):
        load_case_arrays(str(store), b, ("t1",))
    assert any(b in f for f in verify_store(open_store(store)))


def test_the_ram_fill_checks_each_cases_checksum(store):
    """A label shard rewritten with other values, valid for the codec and recorded at its new size, so that it
    decodes and passes the object listing: only the checksum written with the case can tell, and the ram cache's
    fill (Case.decode_checked) refuses it, naming the case."""
    import json
    import shutil

    from store.fastwrite import write_array
    from train.loader import load_case_arrays

    s = open_store(store)
    cid = s.splits["train"][2]
    folder = _case_dir(store, cid)
    label = s.case(cid).label().copy()
    label[label.shape[0] // 2, label.shape[1] // 2, :] = 2  # a line of oedema the build never wrote
    meta = json.loads((folder / CURRENT.label_path / "zarr.json").read_text())
    shutil.rmtree(folder / CURRENT.label_path)
    write_array(folder / CURRENT.label_path, meta, label)
    group = json.loads((folder / "zarr.json").read_text())
    sizes = group["attributes"]["objects"]
    for key in sizes:
        if key.startswith(f"{CURRENT.label_path}/"):
            sizes[key] = (folder / key).stat().st_size
    (folder / "zarr.json").write_text(json.dumps(group))
    case = open_store(store).case(cid)  # the listing is satisfied
    assert (case.label() == label).all()  # and the damaged values decode
    with pytest.raises(FormatError, match=f"case {cid}: its data do not match the checksum"):
        load_case_arrays(str(store), cid, ("t1",))


def test_a_truncated_root_metadata_file_is_one_line(store, tmp_path, capsys):
    root = store / "zarr.json"
    root.write_text(root.read_text()[:200])
    assert _train(store, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "root metadata (zarr.json) is damaged" in err and "Traceback" not in err
    assert store_main(["verify", str(store)]) == 2
    assert "damaged" in capsys.readouterr().err


def test_older_stores_without_the_object_record_still_open(store):
    cid = open_store(store).case_ids[0]
    meta_file = _case_dir(store, cid) / "zarr.json"
    meta = json.loads(meta_file.read_text())
    assert meta["attributes"]["objects"]  # written by the build: every shard and its size
    del meta["attributes"]["objects"]
    meta_file.write_text(json.dumps(meta))
    assert open_store(store).case(cid).image(("t1",)).shape[0] == 1
    assert verify_store(open_store(store)) == []


def test_evaluate_names_a_missing_object(store, tmp_path, capsys):
    assert _train(store, tmp_path / "run") == 0
    cid = open_store(store).splits["test"][0]
    (_case_dir(store, cid) / CURRENT.label_path / "c.0.0.0").unlink()
    assert eval_main(["--run-dir", str(tmp_path / "run"), "--store", str(store)]) == 2
    assert f"case {cid}: object {CURRENT.label_path}/c.0.0.0 is missing" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- builds


def _verify_ok(path):
    assert verify_store(open_store(path)) == []


@pytest.mark.parametrize("point", ["mid-case", "mid-publish", "after-publish"])
def test_a_build_killed_at_any_point_leaves_a_store_that_verifies_and_resumes(tiny_cohort, tmp_path, point):
    path = tmp_path / "k.zarr"
    r = subprocess.run([sys.executable, "-m", "tests.fault_probe", str(tiny_cohort), str(path), point], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -9, r.stderr[-2000:]  # it really was killed
    _verify_ok(path)
    s = open_store(path)
    # each case is published as it is done (publish_every_s=0): the cases before the kill are in the store
    assert 0 < len(s) < 6 and (point != "mid-case" or len(s) == 2)
    rep = build_store(BuildConfig(source=str(tiny_cohort), store=str(path), workers=0, spacing=synth_spacing(TINY)),
                      progress=False)
    assert rep.ok
    _verify_ok(path)
    # the resumed build's splits are those of an uninterrupted one
    clean = tmp_path / "clean.zarr"
    build_store(BuildConfig(source=str(tiny_cohort), store=str(clean), workers=0, spacing=synth_spacing(TINY)),
                progress=False)
    a, b = open_store(path).splits, open_store(clean).splits
    assert {k: a[k] for k in ("train", "val", "test", "folds")} == {k: b[k] for k in ("train", "val", "test", "folds")}
    assert not list(path.glob(".zarr.json.tmp*")) and not (path / ".build.lock").exists()


def test_disk_full_during_a_build(tiny_cohort, tmp_path, capsys, monkeypatch):
    """Out of space writing the root metadata after two publications: one line, and the store verifies."""
    import store.location as location

    real = location.Location.write_atomic
    calls = {"n": 0}

    def write_atomic(self, key, data):
        if key == "zarr.json":
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.path, key)))
        return real(self, key, data)

    monkeypatch.setattr(location.Location, "write_atomic", write_atomic)
    path = tmp_path / "full.zarr"
    rc = run_cli(BuildConfig(source=str(tiny_cohort), store=str(path), workers=0, spacing=synth_spacing(TINY),
                             publish_every_s=0))
    err = capsys.readouterr().err
    assert rc == 1 and "no space left on device writing" in err and "resume" in err
    _verify_ok(path)
    assert len(open_store(path)) >= 2
    assert not (path / ".build.lock").exists()  # released on the way out
    monkeypatch.setattr(location.Location, "write_atomic", real)
    assert run_cli(BuildConfig(source=str(tiny_cohort), store=str(path), workers=0, spacing=synth_spacing(TINY))) == 0
    _verify_ok(path)


def test_disk_full_writing_a_case_is_that_case_failing(tiny_cohort, tmp_path, monkeypatch):
    import store.fastwrite as fastwrite

    real = fastwrite.write_array
    calls = {"n": 0}

    def write_array(folder, meta, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, meta, data)

    monkeypatch.setattr(fastwrite, "write_array", write_array)
    path = tmp_path / "f.zarr"
    rep = build_store(BuildConfig(source=str(tiny_cohort), store=str(path), workers=0, spacing=synth_spacing(TINY)),
                      progress=False)
    (reason,) = rep.failed.values()
    assert "no space left on device" in reason
    _verify_ok(path)
    assert len(open_store(path)) == 5


def test_a_second_build_on_a_store_being_built_is_refused(tiny_cohort, tmp_path, capsys):
    from prep.build import build_params
    from store.conventions import MODALITIES
    from store.writer import StoreWriter

    path = tmp_path / "l.zarr"
    cfg = BuildConfig(source=str(tiny_cohort), store=str(path), workers=0, spacing=synth_spacing(TINY))
    holder = StoreWriter(str(path), MODALITIES, "brats2021", build_params(cfg))
    try:
        assert run_cli(cfg) == 2
        err = capsys.readouterr().err
        assert f"is being built by process {os.getpid()}" in err
    finally:
        holder.close()
    # a lock left by a process that is gone is taken over
    (path / ".build.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 12345,
                                                  "started": 0, "renewed": 0}))
    assert run_cli(cfg) == 0
    _verify_ok(path)


def test_a_read_only_store_location_is_one_line(tiny_cohort, tmp_path, capsys, monkeypatch):
    import store.location as location

    def refuse(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", self.path)

    monkeypatch.setattr(location.Location, "create_exclusive", refuse)
    rc = run_cli(BuildConfig(source=str(tiny_cohort), store=str(tmp_path / "ro.zarr"), workers=0))
    err = capsys.readouterr().err
    assert rc == 1 and "read-only filesystem" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------- runs and checkpoints


def test_disk_full_while_saving_a_checkpoint(store, tmp_path, capsys, monkeypatch):
    assert _train(store, tmp_path / "run") == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    real = torch.save

    def save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")  # a few bytes landed, then the disk filled
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 832 vs 768")

    monkeypatch.setattr(torch, "save", save)
    assert _train(store, tmp_path / "run", "--epochs", "2", "--resume") == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "no space left on device" in err
    assert not list((tmp_path / "run").glob(".*.tmp*"))  # nothing left behind
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # the previous checkpoint is whole
    monkeypatch.setattr(torch, "save", real)
    (tmp_path / "run" / ".last.pt.tmp999").write_bytes(b"x" * 100)  # a killed save's leftover
    assert _train(store, tmp_path / "run", "--epochs", "2", "--resume") == 0
    assert not list((tmp_path / "run").glob(".*.tmp*"))  # swept at start


def test_a_truncated_checkpoint_on_resume_is_named(store, tmp_path, capsys):
    assert _train(store, tmp_path / "run") == 0
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    assert _train(store, tmp_path / "run", "--epochs", "2", "--resume") == 1
    err = capsys.readouterr().err
    assert f"checkpoint {last} is damaged" in err and "Traceback" not in err


def test_a_crafted_checkpoint_is_refused_for_safety(store, tmp_path, capsys):
    assert _train(store, tmp_path / "run") == 0

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {}, "config": {}, "x": Evil()}, tmp_path / "run" / "best.pt")
    assert eval_main(["--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "refused for safety" in err and "weights_only=False" not in err


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--modalities", "t1", "t1"], "--modalities names a modality twice"),
])
def test_bad_flags_are_refused_before_any_work(store, tmp_path, capsys, args, message):
    rc = train_main(["--store", str(store), "--run-dir", str(tmp_path / "run"), *TINY_NET, *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- cohorts


def test_an_rgb_image_is_a_named_case_failure(tmp_path):
    write_case(tmp_path / "raw", "BraTS2021_00000", seed=0)
    d = write_case(tmp_path / "raw", "BraTS2021_00001", seed=1)
    t1 = nib.load(d / "BraTS2021_00001_t1.nii.gz")
    rgb = np.zeros(t1.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, t1.affine), d / "BraTS2021_00001_t1.nii.gz")
    rep = build_store(BuildConfig(source=str(tmp_path / "raw"), store=str(tmp_path / "s.zarr"), workers=0),
                      progress=False)
    assert "BraTS2021_00001_t1.nii.gz holds" in rep.failed["BraTS2021_00001"]
    assert "RGB" in rep.failed["BraTS2021_00001"] and rep.built == ["BraTS2021_00000"]


def test_hidden_folders_and_symlink_loops_are_reported(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_case(raw, "BraTS2021_00000", seed=0)
    write_case(raw, ".BraTS2021_00001", seed=1)  # hidden, BraTS files inside
    os.symlink(raw / "loop", raw / "loop")  # a link to itself
    cohort = discover(raw)
    assert cohort.skipped == {".BraTS2021_00001": "hidden folder"}
    assert "loop" in cohort.problems and "leads nowhere" in cohort.problems["loop"]
    rc = run_cli(BuildConfig(source=str(raw), store=str(tmp_path / "s.zarr"), workers=0))
    out, err = capsys.readouterr()
    assert rc == 1 and "loop" in err and ".BraTS2021_00001 (hidden folder)" in out
