"""build-store on a Dask cluster of separate processes, started with Dask's own command lines on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import open_store
from store.verify import verify_store

from .helpers import dask_processes, free_port, write_case


def _published(store: Path) -> int:
    try:
        return len(json.loads((store / "zarr.json").read_text())["attributes"]["index"])
    except (OSError, ValueError, KeyError):
        return 0


def test_build_on_a_cluster_of_processes_survives_a_killed_worker(tmp_path):
    src = tmp_path / "raw"
    n = 12
    for i in range(n):
        write_case(src, f"BraTS2021_{i:05d}", seed=i, shape=(60, 64, 44))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with dask_processes(2) as (address, workers, procs):
        from distributed import Client

        store = tmp_path / "s.zarr"
        build = subprocess.Popen([sys.executable, "-m", "prep", "build-store", "--source", str(src), "--store",
                                  str(store), "--scheduler", address], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        procs.append(build)
        deadline = time.time() + 120
        while _published(store) < 2 and build.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert build.poll() is None, "the build ended before a worker could be killed"
        workers[0].send_signal(signal.SIGKILL)  # a worker process dies holding a case
        out, err = build.communicate(timeout=300)
        assert build.returncode == 0, err[-3000:]
        s = open_store(store)
        assert len(s) == n and verify_store(s) == []
        # the cases ran on the cluster's own workers (an ignored --scheduler would run them elsewhere)
        with Client(address, timeout="60s") as client:
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
        assert sum(executed.values()) >= 1, executed


def test_an_unreachable_scheduler_is_one_line(tmp_path):
    src = tmp_path / "raw"
    write_case(src, "BraTS2021_00000", seed=0)
    r = subprocess.run([sys.executable, "-m", "prep", "build-store", "--source", str(src), "--store",
                        str(tmp_path / "s.zarr"), "--scheduler", f"tcp://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "scheduler" in r.stderr and "Traceback" not in r.stderr


def test_the_predict_cluster_benchmark_tiny(tmp_path):
    """The benchmark's machinery on tiny cases, two of its arms (a cluster of one worker and one process); the
    four arms and the ratios run in `python -m benchmarks predict-cluster`."""
    from benchmarks import cluster_bench

    cluster_bench.run(tmp_path / "out", tmp_path / "work", "tiny", repeats=1, arms=("one process", "1 worker"))
    saved = json.loads((tmp_path / "out" / "predict-cluster.json").read_text())
    assert saved["cases"] == 3 and set(saved["seconds_per_case"]) == {"one process", "1 worker"}
    assert all(v["median"] > 0 for v in saved["seconds_per_case"].values())
    assert saved["cases_per_s"]["1 worker"] == pytest.approx(3 / saved["seconds_per_case"]["1 worker"]["median"])
