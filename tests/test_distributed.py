"""Distributed training under torchrun on the CPU (gloo): uneven cohorts, validation on every rank, one writer,
no hang, memory that adds up, two nodes on one machine."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.checks import ConfigError, case_cache_bytes, check_cache_memory, check_gpu_ranks
from train.cli import main as train_main
from train.config import TrainConfig
from train.distributed import Dist

from .helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = ["--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--batch-size", "2", "--workers", "0",
            "--device", "cpu"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(nproc, *args, timeout=240, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), *extra, *args]
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_shards_hold_every_case_once_and_none_is_empty():
    ids = [f"c{i}" for i in range(9)]
    for world in (1, 2, 4, 5, 9):
        shards = [Dist(rank=r, world=world).shard(ids) for r in range(world)]
        assert all(shards) and max(map(len, shards)) - min(map(len, shards)) <= 1
        assert sorted(sum(shards, [])) == sorted(ids)  # each case cached once on the node
    shards = [Dist(rank=r, world=12).shard(ids) for r in range(12)]
    assert all(len(s) == 1 for s in shards) and set(sum(shards, [])) == set(ids)  # more ranks than cases
    assert Dist().shard(ids) == ids  # one process: every case, in order


def test_uneven_cohort_on_two_ranks_trains_to_the_end(store12, tmp_path):
    # 9 training cases, 2 ranks, batch 2: before, rank 0 ran 3 steps and rank 1 ran 2, and both hung
    r = _torchrun(2, "-m", "train", "--store", store12, "--run-dir", str(tmp_path / "ddp"), *TINY_NET,
                  "--epochs", "2", "--cache", "ram")
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(tmp_path / "ddp")
    assert [x["epoch"] for x in m] == [0, 1]  # one writer
    assert all(x["steps"] == 3 and x["ranks"] == 2 for x in m)  # ceil(9 / (2 x 2))
    assert all(math.isfinite(x["val_loss"]) and x["val_cases"] == 2 for x in m)
    # one copy of the cohort on the node: the two shards (5 + 4 cases) between them, not 2 x 9
    one = _torchrun(1, "-m", "train", "--store", store12, "--run-dir", str(tmp_path / "one"), *TINY_NET,
                    "--epochs", "1", "--cache", "ram", "--steps-per-epoch", "3")
    assert one.returncode == 0, one.stderr[-3000:]
    (m1,) = _metrics(tmp_path / "one")
    assert m1["steps"] == m[0]["steps"] == 3 and m1["ranks"] == 1  # same --steps-per-epoch, same steps
    assert m1["cache_bytes_per_node"] > 0
    assert m[0]["cache_bytes_per_node"] == m1["cache_bytes_per_node"]


def test_steps_per_epoch_is_the_same_on_one_and_two_ranks(store12, tmp_path):
    r = _torchrun(2, "-m", "train", "--store", store12, "--run-dir", str(tmp_path / "two"), *TINY_NET,
                  "--epochs", "1", "--steps-per-epoch", "4", "--cache", "none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert train_main(["--store", store12, "--run-dir", str(tmp_path / "one"), *TINY_NET, "--epochs", "1",
                       "--steps-per-epoch", "4", "--cache", "none"]) == 0
    assert _metrics(tmp_path / "two")[0]["steps"] == _metrics(tmp_path / "one")[0]["steps"] == 4


def test_validation_shared_across_ranks_gives_one_ranks_figures(store12):
    def result(nproc):
        r = _torchrun(nproc, "-m", "tests.dist_probe", "validate", store12)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])

    one, two = result(1), result(2)
    assert one["val_cases"] == two["val_cases"] == 9  # 5 on rank 0, 4 on rank 1: each case once
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-9)
    for region in ("TC", "WT", "ET"):
        assert two["dice"][region] == pytest.approx(one["dice"][region], rel=1e-9, abs=1e-12)


def test_kfold_under_torchrun_records_every_fold(store12, tmp_path):
    r = _torchrun(2, "-m", "train", "--store", store12, "--run-dir", str(tmp_path / "kf"), *TINY_NET,
                  "--epochs", "1", "--folds", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "kf" / "kfold.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1]
    for f in report["folds"]:
        assert math.isfinite(f["best_val_loss"]) and f["best_val_loss"] > 0
        assert all(math.isfinite(v) for v in f["best_dice"].values())
        assert f["run_dir"] == f"fold-{f['fold']}"  # relative: the run folder can move
    assert not list((tmp_path / "kf").glob("*.tmp*"))


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_rank_killed_mid_epoch_ends_the_job(store12, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "train", "--store", store12, "--run-dir", str(tmp_path / "k"), *TINY_NET, "--epochs", "1",
           "--steps-per-epoch", "100000", "--cache", "none", "--dist-timeout", "30"]
    p = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        for line in p.stdout:  # the writer's banner: both ranks are past the set-up and training
            if line.startswith("training ") or time.time() > deadline:
                break
        time.sleep(2)
        ranks = _children(p.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        rc = p.wait(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc != 0


def test_a_collective_that_never_completes_times_out_naming_rank_and_step():
    t0 = time.time()
    r = _torchrun(2, "-m", "tests.dist_probe", "timeout", timeout=120)
    assert r.returncode != 0
    assert "rank 0 of 2" in r.stderr and "epoch 1, step 2/3" in r.stderr and "--dist-timeout 3 s" in r.stderr
    assert "--resume" in r.stderr
    assert time.time() - t0 < 50  # not gloo's default of 30 minutes


def test_two_nodes_on_loopback_train_together(store12, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "twonodes", "-m", "train", "--store", store12, "--run-dir", str(tmp_path / "nodes"),
               *TINY_NET, "--epochs", "2"]
        procs.append(subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    m = _metrics(tmp_path / "nodes")
    assert [x["epoch"] for x in m] == [0, 1] and all(x["ranks"] == 2 for x in m)
    assert "2 process(es)" in "".join(o[0] for o in outs)


@pytest.mark.parametrize("args, message", [
    (["--steps-per-epoch", "0"], "--steps-per-epoch must be at least 1"),
    (["--dist-timeout", "-5"], "--dist-timeout must be a positive"),
])
def test_bad_distributed_flags_fail_before_work(tiny_store, tmp_path, capsys, args, message):
    rc = train_main(["--store", tiny_store, "--run-dir", str(tmp_path / "run"), *TINY_NET, "--epochs", "1", *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_gpu_cache_with_more_ranks_than_gpus_is_refused():
    cfg = TrainConfig(cache="gpu")
    with pytest.raises(ConfigError, match="2 processes on this node, which has 1 GPU"):
        check_gpu_ranks(cfg, Dist(rank=0, world=2, local_world=2), device_count=1)
    check_gpu_ranks(cfg, Dist(rank=0, world=2, local_world=1), device_count=1)  # two nodes of one GPU: fine
    check_gpu_ranks(TrainConfig(cache="ram"), Dist(rank=0, world=4, local_world=4), device_count=1)


def test_ram_cache_larger_than_memory_is_refused_up_front(store12, tmp_path, capsys, monkeypatch):
    from store import open_store

    store = open_store(store12)
    ids = store.splits["train"]
    cfg = TrainConfig(store=store12, modalities=("t1", "t2", "flair"))
    need = check_cache_memory(cfg, store, ids, Dist(), available=None)
    assert need == sum(case_cache_bytes(store.case(c).shape, 3) for c in ids)
    # two ranks on one node cache the cohort once between them; two nodes of one rank cache about half each
    both = check_cache_memory(cfg, store, ids, Dist(rank=1, world=2, local_rank=1, local_world=2), None)
    half = check_cache_memory(cfg, store, ids, Dist(rank=1, world=2, local_rank=0, local_world=1), None)
    assert both == need and half < 0.6 * need
    monkeypatch.setattr("train.distributed.available_memory_bytes", lambda: need // 2)
    rc = train_main(["--store", store12, "--run-dir", str(tmp_path / "run"), *TINY_NET, "--epochs", "1",
                     "--cache", "ram"])
    err = capsys.readouterr().err
    assert rc == 2 and "--cache ram needs" in err and "available" in err and "--cache none" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_dynunet_with_deep_supervision_and_a_time_limit_under_two_ranks(store12, tmp_path):
    # deep supervision outputs through DDP, and the time-limit decision shared from rank 0: both ranks stop after
    # the same epoch, with a validation
    r = _torchrun(2, "-m", "train", "--store", store12, "--run-dir", str(tmp_path / "ds"), "--model", "dynunet",
                  "--deep-supervision", "--loss", "dicece", "--optimizer", "sgd", "--schedule", "poly", *TINY_NET,
                  "--epochs", "50", "--val-every", "10", "--time-limit", "0.0005")
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(tmp_path / "ds")
    assert len(m) == 1 and m[0]["ranks"] == 2 and math.isfinite(m[0]["val_loss"]) and m[0]["wall_s"] > 0


_END = """
import atexit, sys
from train.distributed import end_process
atexit.register(lambda: print("finalized"))
print("output", flush=False)
end_process(3)
"""


def test_a_rank_ends_with_its_code_and_output_but_no_finalization():
    """Under torchrun (WORLD_SIZE > 1) a rank ends without the interpreter's finalization, where gloo now and then
    aborted it, its exit code and buffered output kept; one process ends as usual."""
    for world, finalized in (("2", False), ("1", True)):
        r = subprocess.run([sys.executable, "-c", _END], env={**_env(), "WORLD_SIZE": world}, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 3 and "output" in r.stdout, (world, r.stderr)
        assert ("finalized" in r.stdout) == finalized, world
