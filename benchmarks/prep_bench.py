"""Preprocessing throughput: building the store vs merely decoding the NIfTI files, at 1 and 2 workers.

Both run as Dask tasks on the same warmed-up LocalCluster, so the comparison is at the same number of
workers and excludes cluster start-up, which is measured on its own: the command's fixed cost on a few cases
(``startup``). Also: store bytes per case vs source .nii.gz bytes, the peak
resident memory of each worker process, and where one case's build time goes, step by step (``_steps``, on the
1-worker cluster).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .report import bar_chart, cohort_record, summarize, write_result


def _decode(case) -> int:
    import nibabel as nib
    import numpy as np

    n = 0
    for p in [*case.images.values(), case.seg]:
        n += np.asanyarray(nib.load(str(p)).dataobj).size
    return n


def _warm() -> bool:
    """Import what a build task needs once per worker, outside the timings (MONAI's imports take seconds)."""
    import monai.data  # noqa: F401
    import monai.transforms  # noqa: F401
    import nibabel  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import prep.preprocess  # noqa: F401
    import store.writer  # noqa: F401

    return True


def _steps(case, store_path: str, params: dict) -> dict:
    """Where one case's build time goes, step by step, in a build worker: the decode it shares with the baseline,
    the rest of preprocessing, the label statistics and the write, and within the write, compression alone."""
    import itertools

    import numpy as np

    from prep.build import process_case
    from prep.preprocess import label_statistics, preprocess
    from store.encoding import sha256_file
    from store.fastread import layout
    from store.fastwrite import array_metadata, chunk_bytes, compressor
    from store.format import CURRENT

    t = {}
    t0 = time.perf_counter()
    _decode(case)
    t["decode (as the baseline)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in [*case.images.values(), case.seg]:
        sha256_file(p)
    t["source sha256"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = preprocess(case, encode=True, spacing=params["spacing_mm"], margin=params["crop_margin"])
    t["preprocess beyond decode"] = time.perf_counter() - t0 - t["decode (as the baseline)"]
    t0 = time.perf_counter()
    label_statistics(pre.label, case.label_convention, np.random.default_rng(0))
    t["label statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    process_case(case, store_path, params, None)
    whole = time.perf_counter() - t0
    # the write is what the whole task spends beyond the steps above
    t["write (chunks, files, metadata, checksum)"] = whole - sum(t.values())
    values, chunks = pre.encoded.values, CURRENT.image_chunks
    compress = compressor(layout(array_metadata(values.shape, values.dtype, chunks, CURRENT.codec)))
    t0 = time.perf_counter()
    for idx in itertools.product(*(range(-(-n // k)) for n, k in zip(values.shape, chunks))):
        chunk_bytes(values, idx, chunks, compress)  # as the write does it: padded, all-0 chunks not compressed
    t["of the write: image compression alone"] = time.perf_counter() - t0
    t["whole build task"] = whole
    return t


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _subset(raw: Path, cases, into: Path) -> Path:
    """A cohort folder holding links to ``cases``' folders: a smaller cohort of the same files."""
    into.mkdir(parents=True, exist_ok=True)
    for c in cases:
        (into / c.case_id).symlink_to(next(iter(c.images.values())).parent.resolve(), target_is_directory=True)
    return into


def startup(raw: Path, spacing, per_case_s: float, work: Path, repeats: int) -> dict:
    """The fixed cost of ``python -m prep build-store --workers 1`` on a small cohort: the wall time of the
    command (interpreter start to exit, the cluster started and closed) less the cases' own time at the steady
    per-case rate of a warm worker (``per_case_s``, from the same cases in this run)."""
    import subprocess
    import sys

    from store import open_store

    n = len(list(raw.iterdir()))
    walls = []
    for r in range(repeats):
        store = work / f"startup-{r}.zarr"
        cmd = [sys.executable, "-m", "prep", "build-store", "--source", str(raw), "--store", str(store),
               "--workers", "1", "--spacing", *map(str, spacing)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if res.returncode:
            raise RuntimeError(f"build-store failed: {res.stderr[-2000:]}")
        written = open_store(store).nbytes_on_disk()
        shutil.rmtree(store, ignore_errors=True)
    wall = statistics.median(walls)
    return {"cases": n, "command_wall_s": summarize(walls), "per_case_s": per_case_s,
            "fixed_s": wall - n * per_case_s, "store_bytes": written, "goal_fixed_s": "<= 3"}


def _peers(cases, start: dict, work: Path, out_dir: Path) -> dict:
    """nnU-Net v2 on the same cases as ``start`` (build-store's fixed-cost run), with one process as it had."""
    from . import peers

    if not peers.available():
        print(f"prep --peers: {peers.INSTALL_HINT}")
        return {"skipped": peers.INSTALL_HINT}
    peer = peers.nnunet_times(cases, work / "nnunet", processes=1)
    ours = {"per_case_s": start["per_case_s"], "wall_s": start["command_wall_s"]["median"],
            "bytes_written": start["store_bytes"]}
    res = {"nnunet": peer, "build_store": {**ours, "processes": 1}, **peers.compare(ours, peer)}

    def one(v):
        return {"median": v, "min": v, "max": v}

    n = len(cases)
    bar_chart(out_dir / "prep_peers.png", f"build-store vs nnU-Net v2 {peer['version']}, {n} cases, 1 process",
              "seconds", {"build-store / case": one(ours["per_case_s"]),
                          "nnU-Net preprocess / case": one(peer["per_case_s"]["preprocess"]),
                          "nnU-Net fingerprint + preprocess / case": one(peer["per_case_s"]["fingerprint"]
                                                                         + peer["per_case_s"]["preprocess"]),
                          f"build-store, {n} cases": one(ours["wall_s"]),
                          f"nnU-Net all 3 steps, {n} cases": one(peer["wall_s"]["total_s"])})
    print(f"prep --peers: per case build-store {ours['per_case_s']:.2f} s, nnU-Net preprocessing "
          f"{peer['per_case_s']['preprocess']:.2f} s ({res['per_case_preprocess_over_build']:.1f}x), fingerprint + "
          f"preprocessing {res['per_case_fingerprint_plus_preprocess_over_build']:.1f}x; {n} cases everything "
          f"included {ours['wall_s']:.1f} s vs {peer['wall_s']['total_s']:.1f} s "
          f"({res['wall_fingerprint_plan_preprocess_over_build']:.1f}x); bytes written "
          f"{res['bytes_over_build']:.2f}x")
    return res


def _measure_workers(workers: int, work: Path, cohort, spacing, params: dict, repeats: int, steps):
    """Decode-only and whole-build times of the cohort on a local cluster of ``workers`` workers, and their peak
    memory; with one worker also the seconds per case of each step (else ``steps`` as given). Returns (figures,
    steps)."""
    from distributed import Client

    from prep.build import BuildConfig, build_store, local_cluster
    from store.conventions import MODALITIES
    from store.writer import StoreWriter

    n = len(cohort.cases)
    with local_cluster(workers) as cluster, Client(cluster) as client:
        client.run(_warm)
        dec, build = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.gather(client.map(_decode, cohort.cases, pure=False))
            dec.append(time.perf_counter() - t0)
            store = work / f"s{workers}.zarr"
            shutil.rmtree(store, ignore_errors=True)  # each repeat builds a new store (no --overwrite)
            t0 = time.perf_counter()
            rep = build_store(BuildConfig(source=str(work / "raw"), store=str(store),
                                          scheduler=cluster.scheduler_address, spacing=spacing), progress=False)
            build.append(time.perf_counter() - t0)
            assert rep.ok, rep.failed
        rss = list(client.run(_peak_rss_mb).values())
        if workers == 1:  # the per-step breakdown, on the same warm worker, into a store of its own
            steps_store = str(work / "steps.zarr")
            StoreWriter(steps_store, MODALITIES, cohort.label_convention, params, overwrite=True).close()
            timings = client.gather(client.map(_steps, cohort.cases, store_path=steps_store, params=params,
                                               pure=False))
            steps = {k: summarize([t[k] for t in timings]) for k in timings[0]}
    return {
        "decode_s": summarize(dec),
        "build_s": summarize(build),
        "decode_cases_per_s": n / statistics.median(dec),
        "build_cases_per_s": n / statistics.median(build),
        "build_over_decode": statistics.median(build) / statistics.median(dec),
        "peak_rss_mb_per_worker": max(rss),
    }, steps


def _report(out_dir: Path, res: dict, results: dict) -> None:
    """prep.json, prep.png and the console lines of ``run``'s result."""
    n, shape, start, steps = res["cases"], res["shape"], res["startup"], res["steps_s_per_case (1 worker)"]
    write_result(out_dir, "prep", res)
    bars = {}
    for w, r in results.items():
        bars[f"decode, {w}w"] = {k: n / v for k, v in r["decode_s"].items() if k in ("median", "min", "max")}
        bars[f"build, {w}w"] = {k: n / v for k, v in r["build_s"].items() if k in ("median", "min", "max")}
    bar_chart(out_dir / "prep.png", f"prep: {n} cases of {'x'.join(map(str, shape))}", "cases / s", bars, log=False)
    for w, r in results.items():
        print(f"prep {w} worker(s): build {r['build_cases_per_s']:.2f} cases/s, decode-only "
              f"{r['decode_cases_per_s']:.2f} cases/s, build/decode time {r['build_over_decode']:.2f}x, "
              f"peak RSS per worker {r['peak_rss_mb_per_worker']:.0f} MB")
    print(f"prep: 1 -> 2 workers speed-up {res['speedup_1_to_2_workers']:.2f}x; "
          f"store {res['store_bytes_per_case'] / 1e6:.1f} MB/case vs source "
          f"{res['source_bytes_per_case']['images+seg'] / 1e6:.1f} MB/case ({res['store_over_source']:.2f}x)")
    print(f"prep: build-store --workers 1 on {start['cases']} cases: {start['command_wall_s']['median']:.2f} s, of "
          f"which fixed start-up and shut-down {start['fixed_s']:.2f} s")
    print("prep: seconds per case by step (median, 1 worker):")
    for k, v in steps.items():
        print(f"  {k:45s} {v['median']:.3f}")


def run(out_dir: Path, size: str = "full", peers: bool = False) -> dict:
    from prep.build import BuildConfig, build_params
    from prep.discover import discover
    from prep.synth import FOV_MM, FULL_SHAPE, SynthConfig, synth_cohort
    from store import open_store

    # quick/tiny: a coarser cohort stored at its own voxel size, so it takes the no-resampling path as 1 mm does
    shape = {"full": FULL_SHAPE, "quick": (120, 120, 62), "tiny": (40, 40, 28)}[size]
    spacing = tuple(f / s for f, s in zip(FOV_MM, shape))
    n = {"full": 24, "quick": 4, "tiny": 3}[size]
    repeats = 3 if size == "full" else 1
    work = Path(tempfile.mkdtemp(prefix="prep-bench-"))
    try:
        synth_cohort(SynthConfig(out=work / "raw", cases=n, seed=123, shape=shape, workers=2), progress=False)
        cohort_record(work / "raw")
        cohort = discover(work / "raw")
        params = build_params(BuildConfig(spacing=spacing))
        src_image_bytes = sum(p.stat().st_size for c in cohort.cases for p in c.images.values())
        src_seg_bytes = sum(c.seg.stat().st_size for c in cohort.cases)
        results, steps = {}, None
        for workers in (1, 2):
            results[workers], steps = _measure_workers(workers, work, cohort, spacing, params, repeats, steps)
        few = cohort.cases[:8]
        start = startup(_subset(work / "raw", few, work / f"raw-{len(few)}"), spacing,
                        results[1]["build_s"]["median"] / n, work, repeats)
        peer = _peers(few, start, work, out_dir) if peers else None
        s = open_store(work / "s2.zarr")
        store_bytes = s.nbytes_on_disk()
        res = {
            "shape": list(shape),
            "cases": n,
            "repeats": repeats,
            "workers": {str(k): v for k, v in results.items()},
            "speedup_1_to_2_workers": results[1]["build_s"]["median"] / results[2]["build_s"]["median"],
            "store_bytes_per_case": store_bytes / n,
            "spacing_mm": list(spacing),
            "source_bytes_per_case": {"images": src_image_bytes / n,
                                      "images+seg": (src_image_bytes + src_seg_bytes) / n},
            "store_over_source": store_bytes / (src_image_bytes + src_seg_bytes),
            "steps_s_per_case (1 worker)": steps,
            "startup": start,
            **({"peers": peer} if peer is not None else {}),
            "goals": {"build_over_decode": "<= 1.5", "store_over_source": "<= 1", "peak_rss_mb_per_worker": "< 1536"},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(out_dir, res, results)
    return res
