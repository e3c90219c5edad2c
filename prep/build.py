"""``python -m prep build-store``: every case preprocessed once into the Zarr store, one Dask task per case.

The driving process discovers the cohort, submits one task per case to a Dask cluster (a LocalCluster of
``workers`` single-threaded processes, or the cluster at ``scheduler``), and publishes each finished case in
the store's index as it arrives. Workers write case groups aside; nothing is visible before it is complete.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.conventions import MODALITIES

from .discover import CaseFiles, DiscoveryError, discover
from .preprocess import CROP_MARGIN, TARGET_SPACING, CaseError, label_statistics, preprocess, sha256_file


@dataclass(frozen=True)
class BuildConfig:
    source: str = "data/raw"
    store: str = "data/brats.zarr"
    workers: int = 2
    scheduler: str | None = None
    split_seed: int = 0
    overwrite: bool = False
    crop_margin: int = CROP_MARGIN
    spacing: tuple[float, float, float] = TARGET_SPACING


@dataclass
class BuildReport:
    built: list[str]
    skipped: list[str]
    failed: dict[str, str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failed


def build_params(cfg: BuildConfig) -> dict:
    """Everything that changes the stored values; a store built with other params is refused."""
    from store.format import CURRENT

    return {
        "format_version": CURRENT.version,
        "orientation": "RAS",
        "spacing_mm": [float(v) for v in cfg.spacing],
        "interpolation": {"image": "bilinear", "label": "nearest"},
        "normalization": "z-score per channel over nonzero voxels (MONAI NormalizeIntensity nonzero, channel_wise)",
        "crop": "bounding box of voxels nonzero in any modality",
        "crop_margin": cfg.crop_margin,
        "image_encoding": f"{CURRENT.image_dtype}, one source intensity unit per step (float sources: range/32000)",
        "modalities": list(MODALITIES),
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def process_case(case: CaseFiles, store_path: str, params: dict, previous: dict | None) -> dict:
    """One Dask task: hash the sources, skip if unchanged, else preprocess and write the case aside.

    Returns {"case_id", "status": built|skipped|failed, "record" or "reason"}; never raises for a bad case.
    """
    from store.zarrstore import case_group_name, write_case

    cid = case.case_id
    try:
        files = {**case.images, **({"seg": case.seg} if case.seg is not None else {})}
        sha = {k: sha256_file(p) for k, p in files.items()}
        params_hash = _hash(params)[:16]
        token = _hash([sha, params_hash])[:12]
        group = case_group_name(cid, token)
        if previous and previous.get("group") == group:
            return {"case_id": cid, "status": "skipped", "record": previous}
        pre = preprocess(case, MODALITIES, with_label=case.seg is not None, margin=params["crop_margin"],
                         spacing=params["spacing_mm"], encode=True)
        seed = int(token[:8], 16)
        if pre.label is not None:
            label_counts, region_counts, fg = label_statistics(pre.label, case.label_convention,
                                                               np.random.default_rng(seed))
        else:
            label_counts, region_counts, fg = {}, {}, np.zeros((0, 4), np.int32)
        attrs = {
            "case_id": cid,
            "patient_id": case.patient_id,
            "modalities": list(MODALITIES),
            "label_convention": case.label_convention,
            "source_files": {k: Path(p).name for k, p in files.items()},
            "source_sha256": sha,
            **pre.geometry,
            "normalization": pre.normalization,
            "label_counts": label_counts,
            "region_counts": region_counts,
            "foreground_counts": {r: int((fg[:, 0] == i).sum()) for i, r in enumerate(("TC", "WT", "ET"))},
            "params_hash": params_hash,
        }
        write_case(store_path, group, pre.encoded, pre.label, fg, attrs)
        record = {"group": group, "source_sha256": sha, "params_hash": params_hash, "patient_id": case.patient_id}
        return {"case_id": cid, "status": "built", "record": record}
    except CaseError as e:
        return {"case_id": cid, "status": "failed", "reason": str(e)}
    except Exception as e:  # an unexpected fault in one case must not stop the others
        where = traceback.extract_tb(e.__traceback__)[-1]
        return {"case_id": cid, "status": "failed",
                "reason": f"case {cid}: {type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"}


# glibc settings for build workers (environment variables read at process start). distributed's own
# MALLOC_TRIM_THRESHOLD_=65536 pins glibc's mmap threshold at 128 KiB, so every array a case allocates is mapped
# and page-faulted afresh (a case took 1.8x its time on one core). Instead: arrays up to 1 GiB come from the heap,
# which is kept (a worker's memory stays at its high-water mark, one case's worth: measured in `benchmarks prep`)
# and grown 256 MiB at a time, in one arena for the worker's threads. One case went from 1.19 to 0.82 s on one core.
BUILD_WORKER_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(2**30),
    "MALLOC_TRIM_THRESHOLD_": str(2**31),
    "MALLOC_TOP_PAD_": str(2**28),
    "MALLOC_ARENA_MAX": "1",
}


def local_cluster(workers: int):
    """A LocalCluster of ``workers`` one-thread worker processes for building, with ``BUILD_WORKER_MALLOC``.
    (Workers of a cluster given by ``--scheduler`` keep their own settings: start them with these variables.)"""
    import os

    import dask
    from distributed import LocalCluster

    env = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in BUILD_WORKER_MALLOC.items()}
    with dask.config.set(env):
        # the nanny sets these in this process's environment too before spawning: put it back afterwards, so
        # processes started later from here (loader workers, say) do not inherit them
        keys = {*dask.config.get("distributed.nanny.pre-spawn-environ"), "PYTHONHASHSEED"}
        saved = {k: os.environ.get(k) for k in keys}
        try:
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                silence_logs=40)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _client(cfg: BuildConfig):
    from distributed import Client

    if cfg.scheduler:
        return Client(cfg.scheduler, timeout="20s"), None
    cluster = local_cluster(cfg.workers)
    return Client(cluster), cluster


def build_store(cfg: BuildConfig, progress: bool = True) -> BuildReport:
    """Build or update the store at ``cfg.store`` from the cohort at ``cfg.source``."""
    from tqdm import tqdm

    from store.zarrstore import StoreWriter, _is_local

    from .splits import make_splits

    t0 = time.perf_counter()
    cohort = discover(cfg.source)
    store_path = str(Path(cfg.store).resolve()) if _is_local(cfg.store) else cfg.store
    params = build_params(cfg)
    writer = StoreWriter(store_path, MODALITIES, cohort.label_convention, params, overwrite=cfg.overwrite)
    writer.collect_garbage()
    writer.group.attrs["source"] = str(Path(cfg.source).resolve())
    index = writer.index
    failed: dict[str, str] = dict(cohort.problems)
    built, skipped = [], []
    bar = tqdm(total=len(cohort.cases), desc="build-store", unit="case", disable=not progress)

    def handle(res: dict) -> None:
        cid = res["case_id"]
        if res["status"] == "failed":
            failed[cid] = res["reason"]
        else:
            (built if res["status"] == "built" else skipped).append(cid)
            if res["status"] == "built":
                writer.publish(cid, res["record"])
        bar.update()
        bar.set_postfix(done=len(built), skipped=len(skipped), failed=len(failed))

    try:
        if cfg.workers == 0 and not cfg.scheduler:
            for case in cohort.cases:  # in-process, for debugging
                handle(process_case(case, store_path, params, index.get(case.case_id)))
        else:
            from distributed import as_completed

            client, cluster = _client(cfg)
            try:
                futures = {client.submit(process_case, case, store_path, params, index.get(case.case_id),
                                         pure=False): case.case_id for case in cohort.cases}
                for fut in as_completed(futures):
                    try:
                        handle(fut.result())
                    except Exception as e:  # a worker that died under a case
                        cid = futures[fut]
                        handle({"case_id": cid, "status": "failed", "reason": f"case {cid}: worker failed: {e}"})
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    finally:
        bar.close()
        # A case whose sources now fail is no longer what the store holds for it: unpublish it.
        for cid in failed:
            writer.unpublish(cid)
        # Splits over every published case, keeping earlier assignments; the failure report of this build.
        index = writer.index
        patients = {cid: rec.get("patient_id", cid) for cid, rec in index.items()}
        if patients:
            previous = writer.group.attrs.get("splits") or None
            writer.set_splits(make_splits(patients, cfg.split_seed, previous))
        writer.set_failures(failed)
    return BuildReport(built, skipped, failed, time.perf_counter() - t0)


def run_cli(cfg: BuildConfig) -> int:
    """Build, print the failure report and the store summary; exit status 1 when any case failed."""
    from store import FormatError

    try:
        report = build_store(cfg)
    except (DiscoveryError, FormatError, FileNotFoundError) as e:
        print(f"prep build-store: error: {e}", file=sys.stderr)
        return 2
    print(f"built {len(report.built)}, skipped {len(report.skipped)} unchanged, failed {len(report.failed)} "
          f"in {report.seconds:.1f} s -> {cfg.store}")
    if report.failed:
        print("failures (also kept in the store's 'failures' attribute):", file=sys.stderr)
        for _, reason in sorted(report.failed.items()):
            print(f"  {reason}", file=sys.stderr)
    return 1 if report.failed else 0


__all__ = ["BuildConfig", "BuildReport", "build_params", "build_store", "local_cluster", "process_case", "run_cli"]
