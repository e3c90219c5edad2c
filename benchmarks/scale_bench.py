"""Scale: what a store costs as it grows to BraTS 2021's 1,251 cases, and reads from object storage.

For each N: a cohort of N synthetic cases on a reduced grid (a pool of distinct cases, hard-linked under N case
ids, so that synthesis does not dominate), built with 2 workers. Measured: build cases/s over the first and the
last tenth of the build, root metadata bytes, open + list time, ``store verify`` time, and the loader's
first-batch latency (``--cache none``). Then patches/s with ``--cache none`` from a local S3-compatible server
(moto, on 127.0.0.1) against the local disk, same store, same threads.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from .report import cohort_record, summarize, write_result

COUNTS = {"full": (100, 400, 1251), "quick": (20, 60, 120), "tiny": (6, 12)}
GRID = (48, 48, 31)  # 5 mm voxels over the BraTS field of view
POOL = 24


def _cohort(pool: Path, root: Path, n: int) -> Path:
    """``n`` case folders whose files are hard links to the pool's (case i is pool case i % POOL)."""
    from prep.synth.layouts import case_id

    pool_ids = sorted(p.name for p in pool.iterdir() if p.is_dir())
    out = root / f"{pool.name}-x{n}"
    if out.exists():
        return out
    for i in range(n):
        src_id, dst_id = pool_ids[i % len(pool_ids)], case_id("brats2021", i)
        d = out / dst_id
        d.mkdir(parents=True)
        for f in (pool / src_id).iterdir():
            os.link(f, d / f.name.replace(src_id, dst_id))
    return out


def _rate(times: list[float], first: bool) -> float:
    """Cases per second over the first or the last tenth of the cases to finish."""
    k = max(2, len(times) // 10)
    seg = times[:k] if first else times[-k:]
    return (len(seg) - 1) / max(seg[-1] - seg[0], 1e-9)


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _patches_per_s(store: str, ids: list[str], batches: int) -> float:
    from train.loader import TrainLoader

    loader = TrainLoader(store, ids, ("t1", "t2", "flair"), patch=(96, 96, 96), batch_size=2, cache="none",
                         workers=2, seed=0, steps=batches + 1)
    it = loader.epoch(0)
    next(it)  # warm-up: opens the cases, fetches the shard indexes
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    it.close()
    loader.close()
    return batches * 2 / seconds


def _remote(b, batches: int) -> dict:
    """The benchmark's full-size store, built again on a local S3 server: --cache none patches/s both ways."""
    try:
        import moto  # noqa: F401
        import s3fs
    except ImportError:
        return {"skipped": "needs s3fs and moto[server]: pip install -e '.[dev]'"}
    from prep.build import BuildConfig, build_store
    from store import open_store

    from .engines import available, reading_with
    from .s3server import local_s3_server

    readers = {}
    with tempfile.TemporaryDirectory() as logs, local_s3_server(access_key="bench", secret_key="bench",
                                                                log=Path(logs) / "requests.log"):
        log = Path(logs) / "requests.log"
        s3fs.S3FileSystem().mkdir("bench")
        url = "s3://bench/store.zarr"
        rep = build_store(BuildConfig(source=str(b.raw), store=url, workers=0, spacing=b.spacing), progress=False)
        if not rep.ok:
            raise RuntimeError(f"benchmark S3 build failed: {rep.failed}")
        ids = open_store(b.store).case_ids
        names = [n for n in available() if n != "zarrs"]  # zarrs: zarr-python's remote path, not measured
        runs = {n: {"local": [], "remote": [], "per_patch": []} for n in names}
        for _ in range(3):
            for name in names:  # the engines take turns: none gains from running later
                with reading_with(name):
                    runs[name]["local"].append(_patches_per_s(b.store, ids, batches))
                    before = _requests(log)
                    runs[name]["remote"].append(_patches_per_s(url, ids, batches))
                    runs[name]["per_patch"].append((_requests(log) - before) / (2 * (batches + 1)))
        for name, r in runs.items():
            readers[name] = {"local_patches_per_s": summarize(r["local"]), "s3_patches_per_s": summarize(r["remote"]),
                             "s3_requests_per_patch": summarize(r["per_patch"]),
                             "s3_over_local": statistics.median(r["remote"]) / statistics.median(r["local"])}
    return {"patch": [96, 96, 96], "channels": 3, "loader_threads": 2, "cases": len(ids), **readers["project"],
            "readers": readers,
            "server": "moto standalone server on 127.0.0.1 (serves about 125 requests/s on one core here)",
            "requests": "counted in the server's request log over each timed run, warm-up batch and case opening "
                        "included, per patch delivered",
            "goal": "s3 / local >= 0.5"}


def _requests(log: Path) -> int:
    """Requests the local S3 server has logged so far."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if '" 20' in line or '" 40' in line)


def run(out_dir: Path, work: Path, size: str = "full") -> dict:
    from prep.build import BuildConfig, build_store
    from prep.synth import FOV_MM, SynthConfig, synth_cohort
    from store import open_store
    from store.verify import verify_store
    from train.loader import TrainLoader

    from .cohort import bench_inputs
    from .report import bar_chart

    counts = COUNTS[size]
    grid = GRID if size != "tiny" else (40, 40, 28)
    spacing = tuple(f / g for f, g in zip(FOV_MM, grid))
    work.mkdir(parents=True, exist_ok=True)
    pool, marker = work / f"scale-pool-{size}", work / f"scale-pool-{size}.done"
    if not marker.exists():
        synth_cohort(SynthConfig(out=pool, cases=min(POOL, max(counts)), seed=77, shape=grid, workers=2),
                     progress=False)
        marker.write_text("")
    cohort_record(pool)
    per_n = {}
    for n in counts:
        raw = _cohort(pool, work, n)
        store = work / f"scale-{n}.zarr"
        if store.exists():
            import shutil

            shutil.rmtree(store)
        rep = build_store(BuildConfig(source=str(raw), store=str(store), workers=2, spacing=spacing), progress=False)
        if not rep.ok:
            raise RuntimeError(f"scale build of {n} cases failed: {rep.failed}")
        s = open_store(store)

        def open_and_list(store=store):
            st = open_store(store)
            return len(st.case_ids), len(st.splits["train"])

        t0 = time.perf_counter()
        faults = verify_store(s)
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loader = TrainLoader(str(store), s.splits["train"], ("t1", "t2", "flair"), patch=(32, 32, 32), batch_size=2,
                             cache="none", workers=2, seed=0)
        next(loader.epoch(0))
        first_batch = time.perf_counter() - t0
        loader.close()
        per_n[str(n)] = {
            "cases": n, "build_s": rep.seconds, "publications": rep.publications,
            "cases_per_s_first_tenth": _rate(rep.done_at, first=True),
            "cases_per_s_last_tenth": _rate(rep.done_at, first=False),
            "root_metadata_bytes": (store / "zarr.json").stat().st_size,
            "open_and_list_s": _median_time(open_and_list), "verify_s": verify_s, "verify_faults": len(faults),
            "loader_first_batch_s": first_batch,
        }
        print(f"scale {n}: build {rep.seconds:.1f} s ({per_n[str(n)]['cases_per_s_first_tenth']:.1f} -> "
              f"{per_n[str(n)]['cases_per_s_last_tenth']:.1f} cases/s), root {per_n[str(n)]['root_metadata_bytes']} "
              f"B, open+list {per_n[str(n)]['open_and_list_s']:.3f} s, verify {verify_s:.1f} s, first batch "
              f"{first_batch:.2f} s")
    lo, hi = per_n[str(counts[0])], per_n[str(counts[-1])]
    # cost per case: the inverse of the last tenth's rate, where the store is largest
    cost_ratio = lo["cases_per_s_last_tenth"] / hi["cases_per_s_last_tenth"]
    b = bench_inputs(work, "full" if size == "full" else "tiny")
    remote = _remote(b, batches={"full": 20, "quick": 10, "tiny": 3}[size])
    res = {"size": size, "grid": list(grid), "spacing_mm": list(spacing), "workers": 2, "counts": list(counts),
           "per_n": per_n, f"build_cost_per_case_{counts[-1]}_over_{counts[0]}": cost_ratio, "object_storage": remote,
           "goals": {"build cost per case at the largest N over the smallest": "<= 1.1",
                     "open + list of the largest store": "< 1 s", "s3 / local --cache none patches/s": ">= 0.5"}}
    write_result(out_dir, "scale", res)
    bar_chart(out_dir / "scale.png", f"build cost per case against store size (grid {'x'.join(map(str, grid))}, 2 "
              "workers)", "ms per case (last tenth of the build)",
              {f"N={k}": {"median": 1000 / v["cases_per_s_last_tenth"], "min": 1000 / v["cases_per_s_last_tenth"],
                          "max": 1000 / v["cases_per_s_last_tenth"]} for k, v in per_n.items()}, log=False)
    for name, r in remote.get("readers", {}).items():
        print(f"scale: reader {name}: --cache none from S3 {r['s3_patches_per_s']['median']:.1f} patches/s "
              f"({r['s3_requests_per_patch']['median']:.1f} requests per patch), local disk "
              f"{r['local_patches_per_s']['median']:.1f} ({r['s3_over_local']:.2f}x)")
    print(f"scale: build cost per case at N={counts[-1]} / N={counts[0]}: {cost_ratio:.2f}x")
    return res
