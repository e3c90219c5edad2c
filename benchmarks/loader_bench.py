"""Loader throughput: augmented 4-channel patch + label samples per second, every variant in one run.

- seed: the seed's MONAI chain from NIfTI (Load, Orientation, Spacing, its random transforms, then Normalize),
  a random crop, DataLoader with 2 workers;
- monai: CacheDataset of the deterministic part (Load, Orientation, Spacing, Normalize), random crop, the random
  transforms on the CPU; persistent: the same with PersistentDataset, its cache on local disk;
- ram, none, gpu: this project's loader, delivery alone (patches on the device) and +aug (device augmentation),
  with its loader threads (``loader_workers``).
Each figure is the median of repeats after a warm-up pass. The process's peak memory is recorded per mode of
this loader (``memory``: the peak while the mode ran and what it added over the process at its start).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .cohort import bench_inputs
from .report import bar_chart, summarize, write_result

BATCH = 4


def _seed_transforms(spacing, patch, cached: bool):
    from monai.transforms import (
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
        Spacingd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    load = [LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=spacing, mode=("bilinear", "nearest"))]
    rand = [RandRotate90d(keys=keys, prob=0.5), RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1), RandScaleIntensityd(keys="image", factors=0.1, prob=0.25),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.25), RandGaussianNoised(keys="image", prob=0.25),
            RandBiasFieldd(keys="image", degree=2, prob=0.5)]
    norm = [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]
    crop = [SpatialPadd(keys=keys, spatial_size=patch), RandSpatialCropd(keys=keys, roi_size=patch, random_size=False)]
    if cached:  # MONAI best practice: deterministic work cached, random work on the crop
        return load + norm, crop + rand
    return load + rand + norm + crop, []  # the seed: random transforms first, on whole volumes, then normalize


def _monai_loader(kind: str, items, spacing, patch, cache_dir: Path, workers: int = 2):
    from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
    from monai.transforms import Compose

    det, rand = _seed_transforms(spacing, patch, cached=kind != "seed")
    if kind == "seed":
        ds = Dataset(items, Compose(det))
    elif kind == "monai":
        # filled on one thread: MONAI's NibabelReader keeps the files of its last read on itself (read() sets
        # self.filenames, get_data() zips the images with them), so two threads loading at once mix their files:
        # a case's four modalities came back as one channel when the other thread had just read a label. The
        # fill is not part of what is timed
        ds = CacheDataset(items, Compose(det + rand), cache_rate=1.0, num_workers=1, progress=False)
    else:
        ds = PersistentDataset(items, Compose(det + rand), cache_dir=str(cache_dir))
    # the batch stacked as plain tensors, so that a batch whose samples differ says how (see run(): workers)
    return DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=False,
                      persistent_workers=workers > 0, collate_fn=_stack_plain)


def _stack_plain(samples: list[dict]) -> dict:
    """The samples' image and label stacked as plain tensors; samples of different shapes are an error naming
    each one's shape and source files."""
    import torch

    shapes = {k: [tuple(s[k].shape) for s in samples] for k in ("image", "label")}
    if any(len(set(v)) > 1 for v in shapes.values()):
        def source(x):
            meta = getattr(x, "meta", None) or {}
            return meta.get("filename_or_obj", "no meta")
        raise RuntimeError("the samples of a batch differ: " + "; ".join(
            f"image {tuple(s['image'].shape)} from {source(s['image'])}, label {tuple(s['label'].shape)}"
            for s in samples))
    return {k: torch.stack([torch.as_tensor(s[k]).as_subclass(torch.Tensor) for s in samples])
            for k in ("image", "label")}


def _time_monai(loader, samples: int) -> float:
    n, t0 = 0, time.perf_counter()
    while n < samples:
        for batch in loader:
            n += batch["image"].shape[0]
            if n >= samples:
                break
    return n / (time.perf_counter() - t0)


def _time_ours(loader, augment, samples: int, device) -> float:
    import torch

    n, t0, epoch = 0, time.perf_counter(), 1000
    while n < samples:
        for img, lab in loader.epoch(epoch):
            if augment is not None:  # as the trainer runs it (train.augment.make_augment's step)
                img, lab = augment.step(img, lab)
            n += img.shape[0]
            if n >= samples:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


class _PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 10 ms), and where it started."""

    def __enter__(self):
        import threading

        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.start_mb = self.peak_mb = self._proc.memory_info().rss / 2**20

        def sample():
            while not self._stop.wait(0.01):
                self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def reader_axis(store, ids, patch, reps: int, size: str, device) -> dict:
    """Each installed Zarr engine (``benchmarks.engines``) on the same patches: ``--cache none`` delivery (patches/s,
    same seed so the same regions) with 1 and 2 loader threads, and the seconds to fill the ``ram`` cache. The
    engines take turns within each repeat, so that no engine gains from running later (a warmer machine)."""
    from train.loader import TrainLoader

    from .engines import available, reading_with

    names = available()
    runs: dict[str, dict[str, list]] = {n: {"none_1_threads": [], "none_2_threads": [], "ram_fill_s": []}
                                        for n in names}
    samples = 8 * BATCH if size != "tiny" else BATCH
    for _ in range(reps):
        for name in names:
            with reading_with(name):
                for threads in (1, 2):
                    loader = TrainLoader(store, ids, patch=patch, batch_size=BATCH, cache="none", workers=threads,
                                         device=device, seed=0)
                    _time_ours(loader, None, BATCH, device)  # warm-up
                    runs[name][f"none_{threads}_threads"].append(_time_ours(loader, None, samples, device))
                    loader.close()
                t0 = time.perf_counter()
                loader = TrainLoader(store, ids, patch=patch, batch_size=BATCH, cache="ram", workers=0,
                                     device=device, seed=0)
                runs[name]["ram_fill_s"].append(time.perf_counter() - t0)
                loader.close()
                del loader
    out = {n: {k: summarize(v) for k, v in r.items()} for n, r in runs.items()}
    base = out["project"]
    for row in out.values():
        row["vs_project"] = {"none_2_threads": row["none_2_threads"]["median"] / base["none_2_threads"]["median"],
                             "ram_fill": base["ram_fill_s"]["median"] / row["ram_fill_s"]["median"]}
    return out


def loader_chart(out_dir: Path, res: dict) -> Path:
    """The loader figure from its JSON: delivery alone and +aug (augmented) per variant, log scale."""
    workers = ", ".join(f"{k} {v['loader_workers']}" for k, v in res["variants"].items() if "+" not in k)
    return bar_chart(Path(out_dir) / "loader.png",
                     f"loader: samples/s ({res['sample'].split(' ')[2]}, batch {res['batch']}, {res['device']}; "
                     f"loader threads / workers: {workers})", "samples / s",
                     {k: {"median": v["samples_per_s"], "min": v["min"], "max": v["max"]}
                      for k, v in res["variants"].items()})


def run(out_dir: Path, work: Path, size: str = "full", repeats: int | None = None) -> dict:
    import torch

    from prep.discover import discover
    from store import open_store
    from train.augment import BatchAugment
    from train.loader import TrainLoader

    b = bench_inputs(work, size)
    reps = repeats or (3 if size == "full" else 2)
    spacing, patch = b.spacing, b.patch
    items = [{"image": [str(c.images[m]) for m in ("t1", "t1ce", "t2", "flair")], "label": str(c.seg)}
             for c in discover(b.raw).cases]
    ids = open_store(b.store).case_ids
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # samples per repeat: enough for a stable rate, few for the slow seed chain
    per = {"seed": 2 * BATCH, "monai": 4 * BATCH, "persistent": 4 * BATCH}
    rates: dict[str, list[float]] = {}
    monai_workers = 0 if size == "tiny" else 2
    for kind in ("seed", "monai", "persistent"):
        # tiny (the tests) loads in the process itself, without DataLoader worker processes
        loader = _monai_loader(kind, items, spacing, patch, work / f"persistent-{size}", monai_workers)
        try:
            _time_monai(loader, BATCH)  # warm-up: worker start, PersistentDataset fills its cache
        except RuntimeError as e:
            raise RuntimeError(f"the {kind} chain: {e}") from e
        rates[kind] = [_time_monai(loader, per[kind] if size != "tiny" else BATCH) for _ in range(reps)]
        del loader
    # none first, so its memory is measured before the ram cache has grown the process
    modes = ["none", "ram"] + (["gpu"] if cuda else [])
    # loader threads: none decodes chunks in 2 threads. ram on the CPU copies patches in the training loop:
    # threads would compete with the augmentation for the same 2 cores.
    workers = {"ram": 0 if not cuda else 2, "none": 2, "gpu": 0}
    memory = {}
    for mode in modes:
        with _PeakRss() as rss:
            loader = TrainLoader(b.store, ids, patch=patch, batch_size=BATCH, cache=mode, workers=workers[mode],
                                 device=device, seed=0)
            for aug in (False, True):
                augment = BatchAugment(seed=0) if aug else None
                # a GPU is fast enough that a longer run is needed for a stable rate
                samples = (32 if cuda else 8) * BATCH if size != "tiny" else 2 * BATCH
                _time_ours(loader, augment, BATCH, device)  # warm-up
                rates[mode + ("+aug" if aug else "")] = [_time_ours(loader, augment, samples, device)
                                                         for _ in range(reps)]
            loader.close()
            del loader
        memory[mode] = {"process_rss_before_mb": rss.start_mb, "process_rss_peak_mb": rss.peak_mb,
                        "added_mb": rss.peak_mb - rss.start_mb}
    readers = reader_axis(b.store, ids, patch, reps, size, device)
    seed_median = statistics.median(rates["seed"])
    variants = {}
    for k, v in rates.items():
        s = summarize(v)
        variants[k] = {"samples_per_s": s["median"], "min": s["min"], "max": s["max"], "repeats": s["n"],
                       "ratio_to_seed": s["median"] / seed_median,
                       "loader_workers": workers.get(k.split("+")[0], monai_workers)}
    res = {"size": size, "cases": b.cases, "grid": list(b.shape), "spacing_mm": list(spacing),
           "sample": f"4 x {'x'.join(map(str, patch))} float image + label", "batch": BATCH,
           "device": str(device), "variants": variants, "memory": memory, "readers": readers,
           "ratios": {"ram+aug / seed": variants["ram+aug"]["samples_per_s"] / seed_median,
                      "ram+aug / monai": variants["ram+aug"]["samples_per_s"] / variants["monai"]["samples_per_s"],
                      "none+aug / persistent": variants["none+aug"]["samples_per_s"]
                      / variants["persistent"]["samples_per_s"]},
           "goals": {"augmented vs seed": ">= 50x", "augmented vs monai": ">= 2x",
                     "none delivery, 2 workers": ">= 20 patches/s (CPU)", "none memory": "< 2048 MB"}}
    write_result(out_dir, "loader", res)
    loader_chart(out_dir, res)
    print(f"{'variant':<12} {'samples/s':>10} {'x seed':>8}")
    for k, v in variants.items():
        print(f"{k:<12} {v['samples_per_s']:10.2f} {v['ratio_to_seed']:8.1f}")
    for k, r in readers.items():
        print(f"reader {k}: none {r['none_1_threads']['median']:.1f} / {r['none_2_threads']['median']:.1f} "
              f"patches/s (1 / 2 threads), ram fill {r['ram_fill_s']['median']:.2f} s")
    for k, m in memory.items():
        print(f"{k}: process memory peak {m['process_rss_peak_mb']:.0f} MB, {m['added_mb']:.0f} MB over its start")
    return res
