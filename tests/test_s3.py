"""Stores on object storage, against a real S3-compatible server on 127.0.0.1 (moto's standalone server)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluate.cli import main as eval_main
from prep.build import BuildConfig, build_store, run_cli
from store import FormatError, open_store
from store.cli import main as store_main
from store.verify import verify_store
from train.cli import main as train_main

from .conftest import S3_SECRET, TINY
from .helpers import synth_spacing

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--batch-size", "2", "--workers", "0",
            "--epochs", "1"]


def _fs():
    import s3fs

    return s3fs.S3FileSystem()


@pytest.fixture(scope="module")
def s3_store(s3_server, tiny_cohort):
    """The tiny cohort built on S3 by a build killed with SIGKILL after two publications, then resumed."""
    url = f"s3://{s3_server()}/brats.zarr"
    r = subprocess.run([sys.executable, "-m", "tests.fault_probe", str(tiny_cohort), url, "after-publish"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == -9, r.stderr[-2000:]
    assert verify_store(open_store(url)) == [] and len(open_store(url)) == 2  # valid between the two runs
    rep = build_store(BuildConfig(source=str(tiny_cohort), store=url, workers=0, spacing=synth_spacing(TINY)),
                      progress=False)
    assert rep.ok and len(rep.built) == 4 and len(rep.skipped) == 2, rep
    return url


def test_s3_store_holds_what_a_local_build_holds_and_reads_fast_path(s3_store, tiny_store):
    remote, local = open_store(s3_store), open_store(tiny_store)
    assert verify_store(remote) == []
    assert remote.case_ids == local.case_ids and remote.splits["train"] == local.splits["train"]
    cid = remote.case_ids[0]
    rc, lc = remote.case(cid), local.case(cid)
    reader = rc._reader("image")
    assert reader.fast and reader.remote is not None  # shard index + byte ranges, not zarr's generic path
    np.testing.assert_array_equal(rc.image(), lc.image())
    region = (slice(3, 20), slice(0, 17), slice(5, 9))
    np.testing.assert_array_equal(rc.image(("t2", "flair"), region), lc.image(("t2", "flair"), region))
    np.testing.assert_array_equal(rc.label(), lc.label())
    # each shard's index is fetched once, then kept
    rc.image(("t1",), region)
    assert set(reader._indexes) == {(i, 0, 0, 0) for i in range(4)}
    assert store_main(["info", s3_store]) == 0 and store_main(["verify", s3_store]) == 0


@pytest.mark.parametrize("cache", ["none", "ram"])
def test_train_and_evaluate_from_s3(s3_store, tmp_path, cache):
    run = tmp_path / f"run-{cache}"
    assert train_main(["--store", s3_store, "--run-dir", str(run), *TINY_NET, "--cache", cache]) == 0
    assert eval_main(["--run-dir", str(run), "--metrics", "legacy"]) == 0
    assert (run / "eval" / "test.csv").exists()
    # credentials only ever come from the environment: nothing written holds them
    for f in run.rglob("*"):
        assert not f.is_file() or S3_SECRET.encode() not in f.read_bytes(), f
    fs = _fs()
    bucket = s3_store[len("s3://"):].split("/")[0]
    for key in fs.find(bucket):
        assert S3_SECRET.encode() not in fs.cat_file(key), key


def test_a_missing_or_damaged_object_on_s3_is_caught(s3_server, tiny_cohort, tmp_path, capsys):
    url = f"s3://{s3_server()}/d.zarr"
    assert build_store(BuildConfig(source=str(tiny_cohort), store=url, workers=0, spacing=synth_spacing(TINY)),
                       progress=False).ok
    s = open_store(url)
    a, b = s.splits["train"][:2]
    root = url[len("s3://"):]
    fs = _fs()
    fs.rm(f"{root}/{s.index[a]['group']}/image/c.0.0.0.0")
    shard = f"{root}/{s.index[b]['group']}/{s.case(b).label_path}/c.0.0.0"
    data = bytearray(fs.cat_file(shard))
    data[40] ^= 0x10
    fs.pipe_file(shard, bytes(data))
    faults = verify_store(open_store(url))
    assert any(a in f and "image/c.0.0.0.0 is missing" in f for f in faults)
    assert any(b in f for f in faults)
    assert train_main(["--store", url, "--run-dir", str(tmp_path / "r"), *TINY_NET, "--cache", "none"]) == 2
    assert f"case {a}: object image/c.0.0.0.0 is missing" in capsys.readouterr().err


def test_s3_bad_input_is_one_line(s3_server, tiny_cohort, tmp_path, capsys, monkeypatch):
    cfg = BuildConfig(source=str(tiny_cohort), store="s3://no-such-bucket-here/s.zarr", workers=0)
    assert run_cli(cfg) == 2
    assert "bucket no-such-bucket-here does not exist" in capsys.readouterr().err
    # a URL that is not a store
    bucket = s3_server()
    _fs().pipe_file(f"{bucket}/notastore/readme.txt", b"hello")
    assert train_main(["--store", f"s3://{bucket}/notastore", "--run-dir", str(tmp_path / "r"), *TINY_NET]) == 2
    err = capsys.readouterr().err
    assert "notastore" in err and "Traceback" not in err
    # no credentials at all
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(FormatError, match="refused or did not answer.*credentials come only from"):
            open_store(f"s3://{bucket}/s.zarr")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_an_s3_url_without_s3fs_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    assert store_main(["info", "s3://bucket/s.zarr"]) == 2
    assert "pip install -e '.[s3]'" in capsys.readouterr().err
    assert train_main(["--store", "s3://bucket/s.zarr", "--run-dir", str(tmp_path / "r"), *TINY_NET]) == 2
    assert "pip install -e '.[s3]'" in capsys.readouterr().err


def test_predict_a_cohort_to_object_storage(s3_server, tiny_store, tiny_cohort, tmp_path, capsys):
    """evaluate predict --source ... --out s3://...: the files a local --out gets (after decompression), in this
    process and from a cluster's workers, the folder's marker beside them; a rerun predicts nothing, another
    model's (TTA's) predictions are refused in one line, --case refuses a URL."""
    import gzip
    import json

    run = tmp_path / "run"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), *TINY_NET]) == 0
    base = ["predict", "--run-dir", str(run), "--source", str(tiny_cohort)]
    assert eval_main([*base, "--out", str(tmp_path / "local")]) == 0
    local = {p.name: gzip.decompress(p.read_bytes()) for p in (tmp_path / "local").glob("*.nii.gz")}
    assert len(local) == 6
    fs, bucket = _fs(), s3_server()
    for prefix, extra in (("one", []), ("cluster", ["--workers", "2"])):
        url = f"s3://{bucket}/{prefix}"
        assert eval_main([*base, "--out", url, *extra]) == 0
        got = {k.rsplit("/", 1)[1]: gzip.decompress(fs.cat_file(k)) for k in fs.find(f"{bucket}/{prefix}")
               if k.endswith(".nii.gz")}
        assert got == local, prefix
        marker = json.loads(fs.cat_file(f"{bucket}/{prefix}/.predicted-by.json"))
        assert marker == json.loads((tmp_path / "local" / ".predicted-by.json").read_text())
    capsys.readouterr()
    assert eval_main([*base, "--out", f"s3://{bucket}/one"]) == 0
    assert "predicted 0, skipped 6" in capsys.readouterr().out
    assert eval_main([*base, "--out", f"s3://{bucket}/one", "--tta"]) == 2
    assert "holds predictions made otherwise (their tta differ" in capsys.readouterr().err
    assert eval_main([*base, "--out", "s3://no-such-bucket-here/pred"]) == 2  # checked before any case
    assert "bucket no-such-bucket-here does not exist" in capsys.readouterr().err
    case = sorted(tiny_cohort.iterdir())[0]
    assert eval_main(["predict", "--run-dir", str(run), "--case", str(case), "--out", f"s3://{bucket}/x.nii.gz"]) == 2
    assert "with --case, --out names a local .nii.gz file" in capsys.readouterr().err
