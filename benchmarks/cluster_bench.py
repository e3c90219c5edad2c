"""``python -m benchmarks predict-cluster``: ``evaluate predict --source`` over the benchmark cohort in one
process (reading and writing in threads; torch on every core, and on one thread) against a local Dask cluster of
1 and 2 one-thread worker processes (``--workers``), each timed as its command would run it: the cluster's start,
each worker's model load and every case. Goals (2 cores): 2 workers at least 1.7x the cases per second of 1
worker; 1 worker at most 1.1x the one-process time per case."""

from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path

from .cohort import bench_inputs
from .report import bar_chart, summarize, write_result

ARMS = ("one process", "one process, 1 thread", "1 worker", "2 workers")


def _trained_run(b, run_dir: Path) -> Path:
    """A run folder of the benchmark's network (one training step: the weights do not change the time)."""
    from train.cli import main as train_main

    if not (run_dir / "best.pt").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        rc = train_main(["--store", b.store, "--run-dir", str(run_dir), "--patch-size", *map(str, b.patch),
                         "--channels", *map(str, b.channels), "--epochs", "1", "--steps-per-epoch", "1",
                         "--batch-size", "1", "--workers", "0", "--fold", "0", "--cache", "none"])
        if rc != 0:
            raise RuntimeError("benchmark training failed")
    return run_dir


def run(out_dir: Path, work: Path, size: str = "full", repeats: int | None = None, arms=ARMS) -> dict:
    import torch

    from evaluate.cluster import run_on_cluster
    from evaluate.predictions import predict_folder

    b = bench_inputs(work, size)
    run_dir = _trained_run(b, work / f"cluster-run-{size}")
    repeats = repeats or (2 if size == "full" else 1)
    runners = {"one process": None, "one process, 1 thread": None,
               "1 worker": partial(run_on_cluster, workers=1, progress=False),
               "2 workers": partial(run_on_cluster, workers=2, progress=False)}
    times = {a: [] for a in arms}
    cases = None
    for _ in range(repeats):
        for arm in arms:  # interleaved, so drift in the machine's speed falls on every arm alike
            out = work / "cluster-pred"
            shutil.rmtree(out, ignore_errors=True)
            threads = torch.get_num_threads()
            if arm.endswith("1 thread"):  # torch as a one-thread worker has it: the cluster's own cost apart
                torch.set_num_threads(1)
            t0 = time.perf_counter()
            try:
                rep = predict_folder(str(run_dir), str(b.raw), str(out), device="cpu", progress=False,
                                     cluster=runners[arm])
            finally:
                torch.set_num_threads(threads)
            times[arm].append(time.perf_counter() - t0)
            if rep["failed"]:
                raise RuntimeError(f"benchmark prediction failed: {rep['failed']}")
            cases = len(rep["written"])
    per_case = {a: summarize([t / cases for t in times[a]]) for a in arms}
    rate = {a: cases / per_case[a]["median"] for a in arms}
    if set(arms) != set(ARMS):  # a subset (the tests'): its figures only
        return write_result(out_dir, "predict-cluster", {"size": size, "cases": cases, "seconds_per_case": per_case,
                                                         "cases_per_s": rate})
    res = {"command": f"python -m benchmarks predict-cluster{' --quick' if size == 'quick' else ''}", "size": size,
           "grid": list(b.shape), "cases": cases, "patch": list(b.patch), "channels": list(b.channels),
           "repeats": repeats, "seconds_per_case": per_case, "cases_per_s": rate,
           "two_over_one_worker": rate["2 workers"] / rate["1 worker"],
           "one_worker_over_one_process": per_case["1 worker"]["median"] / per_case["one process"]["median"],
           "one_worker_over_one_thread": per_case["1 worker"]["median"]
           / per_case["one process, 1 thread"]["median"],
           "goals": {"2 workers >= 1.7x 1 worker": rate["2 workers"] / rate["1 worker"] >= 1.7,
                     "1 worker <= 1.1x one process": per_case["1 worker"]["median"]
                     <= 1.1 * per_case["one process"]["median"]},
           "timed": "the whole predict_folder call: discovery, the cluster's start and close, each worker's model "
                    "load, every case read, predicted and written; the one-process arms read and write in threads "
                    "beside torch, which uses every core (one process) or one thread (one process, 1 thread), as "
                    "each one-thread worker does"}
    write_result(out_dir, "predict-cluster", res)
    bar_chart(out_dir / "predict-cluster.png", f"evaluate predict over {cases} cases of {b.shape}", "s per case",
              per_case, log=False)
    print(f"predict: one process {per_case['one process']['median']:.2f} s/case, 1 worker "
          f"{per_case['1 worker']['median']:.2f}, 2 workers {per_case['2 workers']['median']:.2f}, one process with "
          f"one torch thread {per_case['one process, 1 thread']['median']:.2f} "
          f"(2/1 workers {res['two_over_one_worker']:.2f}x, 1 worker/one process "
          f"{res['one_worker_over_one_process']:.2f}x)")
    return res
