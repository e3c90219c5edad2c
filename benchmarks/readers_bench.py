"""The Zarr engines side by side on the loader's own work (``benchmarks.engines``): ``--cache none`` 4-channel patches/s
with 1 and 2 loader threads and the ``ram`` cache fill of the benchmark cohort (``loader_bench.reader_axis``), and
against a local S3 server 3-channel 96^3 patches/s with the requests per patch (``scale_bench._remote``); the same
regions for every engine, in one run. And the writer: one case's image and label written by the build's own writer
(``store.fastwrite``) and by tensorstore from the same ``zarr.json``, seconds and whether the files are
byte-identical. And the read alone (``patch_axis``): the same 4-channel patches and labels read by the project's
reader and by tensorstore, as stored and then converted, on one thread each, no loader around them."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .report import summarize, write_result


def writer_axis(store_path: str, reps: int = 5) -> dict:
    """The first case's image and label written again, by ``store.fastwrite.write_array`` and by tensorstore (one
    copy thread) from the same metadata: median seconds, and per file whether both wrote the same bytes."""
    import importlib.util

    import numpy as np

    from store import open_store
    from store.fastwrite import write_array

    if importlib.util.find_spec("tensorstore") is None:
        return {"skipped": "tensorstore is not installed (pip install -e '.[dev]')"}
    import tensorstore as ts

    store = open_store(store_path)
    case = store.case(store.case_ids[0])
    out, tmp = {}, Path(tempfile.mkdtemp())
    try:
        for name, path in case.arrays_paths.items():
            if name == "foreground":
                continue
            meta = json.loads(store.location.read_bytes(f"{case._group_path}/{path}/zarr.json"))
            data = np.asarray(case._group[path][...])
            spec_meta = {k: v for k, v in meta.items()
                         if k not in ("zarr_format", "node_type", "attributes", "storage_transformers")}
            times = {"project": [], "tensorstore": []}
            for _ in range(reps):
                for d in (tmp / "project", tmp / "tensorstore"):
                    shutil.rmtree(d, ignore_errors=True)
                t0 = time.perf_counter()
                write_array(tmp / "project", meta, data)
                times["project"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp / "tensorstore")},
                               "metadata": spec_meta, "create": True},
                              context=ts.Context({"data_copy_concurrency": {"limit": 1}})).result()
                arr[...].write(data).result()
                times["tensorstore"].append(time.perf_counter() - t0)
            files = sorted(f.relative_to(tmp / "project") for f in (tmp / "project").rglob("*") if f.is_file())
            same = {str(f): (tmp / "tensorstore" / f).exists()
                    and (tmp / "tensorstore" / f).read_bytes() == (tmp / "project" / f).read_bytes() for f in files}
            out[name] = {"project_s": statistics.median(times["project"]),
                         "tensorstore_s": statistics.median(times["tensorstore"]), "identical_files": same}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


READ_CASES = 6  # the read-alone axis: patches from this many cases
READ_PATCHES = 40  # and this many regions, drawn once (seeded), each inside its case


def _tensorstore_arms(store, cases, regions, channels: int, biggest) -> dict:
    """The read-alone arms of tensorstore (one copy thread, one I/O thread): int16 as stored, then one numpy
    multiply to float32 into a reused array, and into a fresh one."""
    import numpy as np
    import tensorstore as ts

    from .engines import kvstore_spec

    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 1},
                          "file_io_concurrency": {"limit": 1}})
    opened = {c.case_id: [ts.open({"driver": "zarr3", "kvstore": kvstore_spec(store.location,
                                                                              f"{c._group_path}/{name}")},
                                  read=True, context=context).result() for name in ("image", c.label_path)]
              for c in cases}
    converted = np.empty((channels, *biggest), np.float32)

    def tensorstore(convert: bool, fresh: bool = False):
        def read():
            for case, reg in regions:
                image, label = opened[case.case_id]
                values = image[(slice(None), *reg)].read().result()
                label[reg].read().result()
                if fresh:
                    np.multiply(values, case.scale[:, None, None, None], dtype=np.float32)
                elif convert:
                    np.multiply(values, case.scale[:, None, None, None],
                                out=converted[(slice(None), *(slice(0, n) for n in values.shape[1:]))])
        return read

    return {"tensorstore, int16 as stored": tensorstore(False),
            "tensorstore + numpy multiply to float32": tensorstore(True),
            "tensorstore + numpy multiply into a fresh float32 array": tensorstore(True, fresh=True)}


def patch_axis(store_path: str, patch, reps: int = 5) -> dict:
    """Milliseconds per patch (all channels + label, ``patch`` voxels a side, the same seeded regions inside the
    cases) read on one thread with no loader around it: the project's ``Case.image_into`` (float32 and float16,
    into one reused tensor) + ``Case.label_into``; tensorstore's int16 as stored + label; and tensorstore then one
    numpy multiply to float32 (into one reused array). tensorstore runs with one copy thread and one file I/O
    thread, torch with one thread, so the engines are compared on the read, not on a thread pool. Median of
    ``reps`` passes, the arms taking turns in each."""
    import importlib.util

    import numpy as np
    import torch

    from store import open_store

    store = open_store(store_path)
    cases = [store.case(c) for c in store.case_ids[:READ_CASES]]
    rng = np.random.default_rng(0)
    regions = []
    for k in range(READ_PATCHES):
        case = cases[k % len(cases)]
        start = [int(rng.integers(0, max(n - p, 0) + 1)) for n, p in zip(case.shape, patch)]
        regions.append((case, tuple(slice(a, min(a + p, n)) for a, p, n in zip(start, patch, case.shape))))
    channels = len(cases[0].meta["modalities"])
    biggest = tuple(max(r[1][d].stop - r[1][d].start for r in regions) for d in range(3))
    outs = {dt: torch.empty((channels, *biggest), dtype=dt) for dt in (torch.float32, torch.float16)}
    lab = np.empty(biggest, np.uint8)

    def project(dtype):
        def read():
            for case, reg in regions:
                shape = tuple(s.stop - s.start for s in reg)
                case.image_into(outs[dtype][(slice(None), *(slice(0, n) for n in shape))], None, reg)
                case.label_into(lab[tuple(slice(0, n) for n in shape)], reg)
        return read

    def project_fresh():  # the public read a user meets first: a fresh array per call (Case.image, Case.label)
        for case, reg in regions:
            case.image(region=reg)
            case.label(region=reg)

    arms = {"project, float32": project(torch.float32), "project, float16": project(torch.float16),
            "project, fresh arrays (Case.image, Case.label)": project_fresh}
    if importlib.util.find_spec("tensorstore") is not None:
        arms.update(_tensorstore_arms(store, cases, regions, channels, biggest))
    times: dict[str, list[float]] = {k: [] for k in arms}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for read in arms.values():  # warm: files in the page cache, buffers allocated
            read()
        for _ in range(reps):
            for name, read in arms.items():
                t0 = time.perf_counter()
                read()
                times[name].append((time.perf_counter() - t0) / len(regions) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {"cases": len(cases), "patches": len(regions), "patch": list(patch), "channels": channels,
            "ms_per_patch": {k: summarize(v) for k, v in times.items()}}


def run(out_dir: Path, work: Path, size: str = "full") -> dict:
    import torch

    from store import open_store

    from .cohort import bench_inputs
    from .loader_bench import reader_axis
    from .scale_bench import _remote

    b = bench_inputs(work, size)
    ids = open_store(b.store).case_ids
    local = reader_axis(b.store, ids, b.patch, 5 if size != "tiny" else 1, size, torch.device("cpu"))
    remote = _remote(b, batches={"full": 20, "quick": 10, "tiny": 2}[size])
    writer = writer_axis(b.store)
    alone = patch_axis(b.store, b.patch, 5 if size != "tiny" else 1)
    res = {"size": size, "cases": b.cases, "patch": list(b.patch), "local": local, "object_storage": remote,
           "writer": writer, "read_alone": alone}
    write_result(out_dir, "readers", res)
    lines = ["| engine | none, 1 thread (patches/s) | none, 2 threads | ram fill (s) | S3 patches/s | S3 requests "
             "per patch |", "|---|---|---|---|---|---|"]
    for name, r in local.items():
        s3 = remote.get("readers", {}).get(name)
        lines.append(f"| {name} | {r['none_1_threads']['median']:.1f} | {r['none_2_threads']['median']:.1f} | "
                     f"{r['ram_fill_s']['median']:.2f} | "
                     + (f"{s3['s3_patches_per_s']['median']:.1f} | {s3['s3_requests_per_patch']['median']:.1f} |"
                        if s3 else "- | - |"))
    if "skipped" not in writer:
        lines += ["", "| array | write s, project's writer | write s, tensorstore (1 thread) | same bytes |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {w['project_s']:.3f} | {w['tensorstore_s']:.3f} | "
                  f"{sum(w['identical_files'].values())} of {len(w['identical_files'])} files |"
                  for k, w in writer.items()]
    lines += ["", f"| read alone, one thread ({alone['channels']} x {'x'.join(map(str, b.patch))} + label, "
              f"{alone['patches']} patches of {alone['cases']} cases) | ms per patch |", "|---|---|"]
    lines += [f"| {k} | {v['median']:.1f} |" for k, v in alone["ms_per_patch"].items()]
    table = "\n".join(lines)
    (Path(out_dir) / "readers.md").write_text(
        f"`python -m benchmarks readers{'' if size == 'full' else ' --size ' + size}`: {b.cases} cases "
        f"{'x'.join(map(str, b.shape))}, 4 x {'x'.join(map(str, b.patch))} patches, batch 4 (local); 3 x 96^3, "
        f"batch 2, 2 loader threads (S3).\n\n{table}\n")
    print(table)
    return res
