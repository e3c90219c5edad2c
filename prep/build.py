"""``python -m prep build-store``: every case preprocessed once into the Zarr store, one Dask task per case.

The driving process discovers the cohort, submits one task per case to a Dask cluster (a LocalCluster of
``workers`` single-threaded processes, or the cluster at ``scheduler``), and publishes each finished case in
the store's index as it arrives. Workers write case groups aside; nothing is visible before it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from store.conventions import MODALITIES, REGIONS
from store.encoding import sha256_file

from .discover import CaseFiles, DiscoveryError, discover
from .preprocess import CROP_MARGIN, TARGET_SPACING, CaseError, label_statistics, preprocess


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
    # "grade": every split and fold keeps the HGG/LGG ratio (BraTS 2018-2020 cohorts); None: no strata
    stratify: str | None = None
    # finished cases are published together at most this often (one root write for many cases: its cost grows
    # with the store, so one write per case would make a large build quadratic); 0 publishes each case alone
    publish_every_s: float = 1.0


@dataclass
class BuildReport:
    built: list[str]
    skipped: list[str]
    failed: dict[str, str]
    seconds: float
    ignored: dict[str, str] = field(default_factory=dict)  # folders not looked into (hidden), with why
    done_at: list[float] = field(default_factory=list)  # seconds from the start at which each case finished
    publications: int = 0  # root-metadata writes that published cases

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
    from store.records import CaseRecord
    from store.writer import case_group_name, write_case

    cid = case.case_id
    try:
        files = {**case.images, **({"seg": case.seg} if case.seg is not None else {})}
        digests = {str(p): sha256_file(p) for p in {str(p) for p in files.values()}}  # an MSD 4D file once
        sha = {k: digests[str(p)] for k, p in files.items()}
        params_hash = _hash(params)[:16]
        token = _hash([sha, params_hash])[:12]
        group = case_group_name(cid, token)
        if previous and previous.get("group") == group:
            return {"case_id": cid, "status": "skipped", "record": previous}
        pre = preprocess(case, MODALITIES, with_label=case.seg is not None, margin=params["crop_margin"],
                         spacing=params["spacing_mm"], encode=True)
        seed = int(token[:8], 16)
        convention = pre.label_convention or case.label_convention
        if pre.label is not None:
            label_counts, region_counts, fg = label_statistics(pre.label, convention,
                                                               np.random.default_rng(seed))
        else:
            label_counts, region_counts, fg = {}, {}, np.zeros((0, 4), np.int32)
        record = CaseRecord(
            case_id=cid, patient_id=case.patient_id, modalities=tuple(MODALITIES), label_convention=convention,
            source_files={k: case.source_name(p) for k, p in files.items()}, source_sha256=sha, geometry=pre.geometry,
            normalization=pre.normalization, label_counts=label_counts, region_counts=region_counts,
            foreground_counts={r: int((fg[:, 0] == i).sum()) for i, r in enumerate(REGIONS)},
            params_hash=params_hash, task=case.task, grade=case.grade, source_labels=case.source_labels,
            layout=case.layout)
        write_case(store_path, group, pre.encoded, pre.label, fg, record)
        record = {"group": group, "source_sha256": sha, "params_hash": params_hash, "patient_id": case.patient_id,
                  "task": case.task, "layout": case.layout, **({"grade": case.grade} if case.grade else {})}
        return {"case_id": cid, "status": "built", "record": record, "label_convention": convention}
    except CaseError as e:
        return {"case_id": cid, "status": "failed", "reason": str(e)}
    except Exception as e:  # an unexpected fault in one case must not stop the others
        import errno

        from store.location import describe_os_error

        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):
            return {"case_id": cid, "status": "failed", "reason": f"case {cid}: {describe_os_error(e, store_path)}"}
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


class SchedulerError(ValueError):
    """A --scheduler address where no Dask scheduler answers."""


def connect(scheduler: str | None, workers: int):
    """(client, the LocalCluster started for it or None): the cluster at ``scheduler``, else a LocalCluster of
    ``workers`` one-thread processes; build-store, evaluate predict and score all connect through this."""
    from distributed import Client

    if scheduler:
        try:
            return Client(scheduler, timeout="10s"), None
        except (OSError, TimeoutError) as e:
            raise SchedulerError(f"--scheduler {scheduler}: no Dask scheduler answered there "
                                 f"({type(e).__name__}); start one with 'dask scheduler' and its workers with "
                                 f"'dask worker ADDRESS'") from None
    cluster = local_cluster(workers)
    return Client(cluster), cluster


def _client(cfg: BuildConfig):
    return connect(cfg.scheduler, cfg.workers)


def _import_in_background(*modules: str) -> None:
    """Import ``modules`` on a daemon thread: what the driver needs only later (sklearn, for the splits, takes
    over a second) loads while the cluster starts instead of after the first case. An import that fails here
    fails again, with its error, where the module is used."""
    import importlib
    import threading

    def load():
        for m in modules:
            with contextlib.suppress(Exception):  # reported where the module is used
                importlib.import_module(m)

    threading.Thread(target=load, name="import-ahead", daemon=True).start()


class _Connection:
    """The build's Dask client, connected on a thread from the moment it is made, closed (with the LocalCluster it
    started, if any) on leaving; a failure to connect is raised by ``client()``."""

    def __init__(self, cfg: BuildConfig):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="connect")
        self._future = pool.submit(_client, cfg)
        pool.shutdown(wait=False)

    def client(self):
        return self._future.result()[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            client, cluster = self._future.result()
        except Exception:  # noqa: BLE001 (raised by client() where it was needed)
            return
        client.close()
        if cluster is not None:
            cluster.close()


class _Publisher:
    """The build's side of the store while cases finish: each finished case waits in ``pending`` until the next
    publication (at most every ``publish_every_s``), which writes the index, the splits over it and the failures
    together (one atomic root write). Splits keep the assignments of the last completed build (``settled``)."""

    def __init__(self, writer, cfg: BuildConfig, failed: dict, grades: dict):
        self.writer, self.cfg, self.failed, self.grades = writer, cfg, failed, grades
        stored = writer.splits
        self.base = {"patients": stored.get("settled", stored.get("patients", {}))} if stored else None
        self.pending: dict = {}  # finished, not yet published: case id -> record (None: unpublish, it failed)
        self.last_at = time.perf_counter()
        self.publications = 0
        self.built: list[str] = []
        self.skipped: list[str] = []

    def splits_for(self, index: dict, final: bool = False) -> dict:
        from .splits import make_splits

        patients = {cid: rec.get("patient_id", cid) for cid, rec in index.items()}
        if not patients:
            return {}
        strata = None
        if self.cfg.stratify == "grade":
            strata = {p: index[c].get("grade") or self.grades.get(p) or "ungraded" for c, p in patients.items()}
        sp = make_splits(patients, self.cfg.split_seed, self.base, strata)
        sp["settled"] = sp["patients"] if final else (self.base or {}).get("patients", {})
        return sp

    def publish(self, force: bool = False) -> None:
        if not self.pending or (not force and time.perf_counter() - self.last_at < self.cfg.publish_every_s):
            return
        now = self.writer.index
        for cid, rec in self.pending.items():
            if rec is None:
                now.pop(cid, None)
            else:
                now[cid] = rec
        self.writer.commit(now, self.splits_for(now), self.failed)
        self.pending.clear()
        self.last_at, self.publications = time.perf_counter(), self.publications + 1

    def handle(self, res: dict) -> None:
        """One finished case (``process_case``'s result): recorded, and published when it is time."""
        cid = res["case_id"]
        if res["status"] == "failed":
            self.failed[cid] = res["reason"]
            # a case whose sources now fail is no longer what the store holds for it
            self.pending[cid] = None
        else:
            (self.built if res["status"] == "built" else self.skipped).append(cid)
            if res["status"] == "built":
                self.writer.admit_convention(res["label_convention"])  # before the case is visible
                self.pending[cid] = res["record"]
        self.publish()

    def finish(self) -> None:
        """The completed build's splits become the settled ones (a stopped build keeps its last)."""
        now = self.writer.index
        for cid, rec in self.pending.items():
            if rec is not None:
                now[cid] = rec
        for cid in self.failed:
            now.pop(cid, None)
        self.writer.commit(now, self.splits_for(now, final=True), self.failed)
        self.publications += 1


def _results(cohort, connection, in_process: bool, store_path: str, params: dict, index: dict):
    """Each case's ``process_case`` result as it finishes: in this process, or on the cluster (a worker that died
    under a case gives that case's failure)."""
    if in_process:
        for case in cohort.cases:  # in-process, for debugging
            yield process_case(case, store_path, params, index.get(case.case_id))
        return
    from distributed import as_completed

    client = connection.client()
    futures = {client.submit(process_case, case, store_path, params, index.get(case.case_id), pure=False):
               case.case_id for case in cohort.cases}
    for fut in as_completed(futures):
        try:
            res = fut.result()
        except Exception as e:  # a worker that died under a case
            cid = futures[fut]
            res = {"case_id": cid, "status": "failed", "reason": f"case {cid}: worker failed: {e}"}
        yield res


def _discover_for_build(cfg: BuildConfig):
    """The cohort, with ``--stratify grade`` refused where a case has no grade."""
    cohort = discover(cfg.source)
    if cfg.stratify == "grade" and (ungraded := [c.case_id for c in cohort.cases if c.grade is None]):
        raise DiscoveryError(f"--stratify grade: case {ungraded[0]} has no grade ({len(ungraded)} of "
                             f"{len(cohort.cases)} cases); grades come from HGG/ and LGG/ folders (BraTS 2018-2020 "
                             f"as downloaded)")
    return cohort


def build_store(cfg: BuildConfig, progress: bool = True) -> BuildReport:
    """Build or update the store at ``cfg.store`` from the cohort at ``cfg.source``.

    Every publication writes the index, the splits over it and the failure report together (one atomic root
    write), so the store verifies whenever the build stops. Splits keep the assignments of the last completed
    build (``settled``); a killed build resumed gives the splits an uninterrupted one would."""
    from store.location import Location
    from store.progress import progress_bar
    from store.writer import StoreWriter

    t0 = time.perf_counter()
    _import_in_background("sklearn.model_selection")
    cohort = _discover_for_build(cfg)
    grades = {c.patient_id: c.grade for c in cohort.cases}
    store_path = str(Path(cfg.store).resolve()) if Location(cfg.store).local else cfg.store
    params = build_params(cfg)
    failed: dict[str, str] = dict(cohort.problems)
    # the cluster starts (worker processes spawn and import) while the store is opened and cleaned
    # one case (or none) on a local cluster: the command's own process builds it, since starting a worker costs
    # more than the case (about 0.5 s of a 3 s command here) and there is nothing to run beside it
    in_process = not cfg.scheduler and (cfg.workers == 0 or len(cohort.cases) <= 1)
    connection = contextlib.nullcontext() if in_process else _Connection(cfg)
    with connection, StoreWriter(store_path, MODALITIES, cohort.label_convention, params,
                                 overwrite=cfg.overwrite) as writer:
        writer.collect_garbage()
        writer.set_source(str(Path(cfg.source).resolve()))
        publisher = _Publisher(writer, cfg, failed, grades)
        bar = progress_bar(len(cohort.cases), "build-store", "case", enabled=progress)
        done_at: list[float] = []
        finished = False
        try:
            for res in _results(cohort, connection, in_process, store_path, params, writer.index):
                publisher.handle(res)
                done_at.append(time.perf_counter() - t0)
                bar.update()
                bar.set_postfix(done=len(publisher.built), skipped=len(publisher.skipped), failed=len(failed))
            finished = True
        finally:
            bar.close()
            if finished:
                publisher.finish()
    return BuildReport(publisher.built, publisher.skipped, failed, time.perf_counter() - t0, dict(cohort.skipped),
                       done_at, publisher.publications)


def run_cli(cfg: BuildConfig) -> int:
    """Build, print the failure report and the store summary; exit status 1 when any case failed."""
    from store import FormatError
    from store.location import describe_os_error

    try:
        report = build_store(cfg)
    except (DiscoveryError, FormatError, FileNotFoundError, ImportError, SchedulerError) as e:
        print(f"prep build-store: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only filesystem: the store is left as its last publication
        print(f"prep build-store: error: {describe_os_error(e, e.filename or cfg.store)}; the store holds every "
              f"case published before this (run the build again to resume)", file=sys.stderr)
        return 1
    print(f"built {len(report.built)}, skipped {len(report.skipped)} unchanged, failed {len(report.failed)} "
          f"in {report.seconds:.1f} s -> {cfg.store}")
    if report.ignored:
        print("not looked into: " + ", ".join(f"{name} ({why})" for name, why in sorted(report.ignored.items())))
    if report.failed:
        print("failures (also kept in the store's 'failures' attribute):", file=sys.stderr)
        for _, reason in sorted(report.failed.items()):
            print(f"  {reason}", file=sys.stderr)
    return 1 if report.failed else 0


__all__ = ["BuildConfig", "BuildReport", "build_params", "build_store", "local_cluster", "process_case", "run_cli"]
