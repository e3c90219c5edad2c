"""Training data path: seeded patch sampling over a store, three cache modes, batches moved to the device.

- The sampler (``train.sampling``) draws every patch position from a seeded generator, before any data is read,
  so ``ram``, ``none`` and ``gpu`` deliver the same batches for the same seed.
- The store is opened once: the trainer's opened store, or one opened here, gives the case objects every source
  reads through (worker processes, which get the paths only, open it once each).
- ``workers`` loader threads assemble whole batches ahead of the step (reading, decoding and copying release the
  GIL); each patch is written once, straight into its slot of a batch tensor reused once the caller drops it.
- A batch: image float16 (B, C, P, P, P) z-scores of the chosen modalities only, label uint8 (B, 1, P, P, P)
  in the store's label convention; zero outside the case where a patch overhangs (the background value).
- Foreground oversampling as nnU-Net: in each batch the last ``round(B * fg_fraction)`` samples are centred on a
  voxel drawn from the store's foreground coordinates of a region chosen uniformly among those present.

Cache modes:
- ``ram``: MONAI CacheDataset decodes the cases once (``cache_rate`` of them); loader threads share it, and the
  cache is moved into shared memory tensors, so worker processes reading it (a DataLoader over the source) get
  no copy each either (MONAI issue 5930).
- ``none``: each patch is read straight from the Zarr chunks it overlaps (the store is the persistent cache).
- ``gpu``: the cases live on the device in float16; patches are cut there, no CPU work per step.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import torch
from monai.transforms import Transform

from store.conventions import MODALITIES

from .distributed import heap_returned_to_os
from .sampling import PatchSampler, PatchSpec, crop_pad, region

CACHE_MODES = ("ram", "none", "gpu")


# ----------------------------------------------------------------------------------------------- sources


class StoreSource:
    """``none``: patches read from the Zarr chunks they overlap. Pickles as paths only, so a worker process opens
    the store itself; in this process it reads through ``opened`` (the cases already opened, in ``case_ids``
    order) where given."""

    def __init__(self, store_path: str, case_ids: list[str], modalities, opened=None):
        self.store_path = store_path
        self.case_ids = case_ids
        self.modalities = tuple(modalities)
        self._store = None
        self._cases: dict[int, object] = dict(enumerate(opened or ()))

    def __getstate__(self):
        return {"store_path": self.store_path, "case_ids": self.case_ids, "modalities": self.modalities}

    def __setstate__(self, state):
        self.__init__(**state)

    def case(self, c: int):
        """The store's case object of case ``c``, opened once."""
        if c not in self._cases:
            if self._store is None:
                from store import open_store

                self._store = open_store(self.store_path)
            self._cases[c] = self._store.case(self.case_ids[c])
        return self._cases[c]

    def fetch(self, specs: list[PatchSpec], patch) -> list | None:
        """Object storage: every chunk a batch's patches touch, image and label, in one concurrent round of
        requests (per-request latency, not bandwidth, is the cost there); None for local stores."""
        from store.fastread import fetch_together

        cases = [self.case(s.case) for s in specs]
        if not cases or not cases[0].remote:
            return None
        reads = [case.patch_reads(self.modalities, region(s.start, patch, case.shape))
                 for s, case in zip(specs, cases)]
        got = fetch_together([r for per_spec in reads for r in per_spec])
        out, k = [], 0
        for per_spec in reads:
            out.append(got[k:k + len(per_spec)])
            k += len(per_spec)
        return out

    def patch_into(self, spec: PatchSpec, patch, img_out: np.ndarray, lab_out: np.ndarray, fetched=None) -> None:
        """Read the patch of ``spec`` (its start, ``patch`` voxels a side, X, Y, Z) into ``img_out`` (C, X, Y, Z) and
        ``lab_out`` (X, Y, Z); parts outside the case stay zero (``fetched``: the batch's bytes fetched together on
        object storage)."""
        case = self.case(spec.case)
        reg = region(spec.start, patch, case.shape)
        at = tuple(r.start - s for r, s in zip(reg, spec.start))  # where the read block sits in the patch
        if any(r.stop - r.start != p for r, p in zip(reg, patch)):  # overhangs the case: zero background
            img_out[...] = 0
            lab_out[...] = 0
        img_f, lab_f = (fetched + [None])[:2] if fetched is not None else (None, None)
        # each chunk decoded straight into the batch slot, rounded to float16 once, as load_case_arrays does,
        # so every mode yields the same bits
        case.image_into(torch.from_numpy(img_out), self.modalities, reg, at, img_f)
        case.label_into(lab_out, reg, at, lab_f)


def load_case_arrays(store_path: str, case_id: str, modalities, shared: bool = False) -> dict:
    """``decode_case`` of one case of the store at ``store_path``, which is opened for it."""
    from store import open_store

    return decode_case(open_store(store_path).case(case_id), modalities, shared)


def decode_case(case, modalities, shared: bool = False) -> dict:
    """A whole case (a store's case object) decoded: image float16 tensor (C, X, Y, Z) of ``modalities``, label
    uint8 tensor (X, Y, Z) or None; both in shared memory with ``shared`` (the ram cache keeps them there: the image
    is decoded straight into it, so the case is never held twice, even briefly); checked against the checksum
    written with it (a whole-case read reads everything the checksum covers anyway)."""
    out = torch.empty((len(modalities), *case.shape), dtype=torch.float16)
    image, label = case.decode_checked(modalities, out=out.share_memory_() if shared else out)
    label = torch.from_numpy(label) if label is not None else None
    if shared and label is not None:
        label.share_memory_()
    return {"image": image, "label": label}


class _LoadCase(Transform):
    """{'case_id', 'case'} -> the decoded case as tensors, read through ``source`` (a StoreSource: the cases it
    was given, or its store opened once). A MONAI Transform and deterministic, so CacheDataset caches its output."""

    def __init__(self, source: StoreSource):
        self.source = source

    def __call__(self, item: dict) -> dict:
        case = self.source.case(item["case"])
        return {"case_id": item["case_id"], **decode_case(case, self.source.modalities, shared=True)}


class RamSource:
    """``ram``: MONAI CacheDataset of the decoded cases, its cache in shared memory (one copy for all workers).

    Cases beyond ``cache_rate`` are read from the store when asked for (MONAI's own behaviour).
    """

    def __init__(self, store_path: str, case_ids: list[str], modalities, cache_rate: float = 1.0,
                 num_workers: int = 1, progress: bool = False, opened=None):
        from monai.data import CacheDataset

        from store.progress import on_terminal

        self.case_ids = case_ids
        self.modalities = tuple(modalities)
        self._fallback = StoreSource(store_path, case_ids, modalities, opened)  # also the cases beyond cache_rate
        with heap_returned_to_os():
            ds = CacheDataset([{"case_id": c, "case": i} for i, c in enumerate(case_ids)],
                              transform=_LoadCase(self._fallback),
                              cache_rate=cache_rate, num_workers=max(1, num_workers),
                              progress=progress and on_terminal(),
                              copy_cache=False)
        self.cached: list[dict | None] = [None] * len(case_ids)
        for i, item in enumerate(ds._cache):
            if isinstance(item, dict):  # in shared memory already: _LoadCase decoded it there, inside the scope
                self.cached[i] = {"image": item["image"], "label": item["label"]}
        del ds  # the shared tensors are the cache now

    def nbytes(self) -> int:
        return sum(v["image"].nbytes + (v["label"].nbytes if v["label"] is not None else 0)
                   for v in self.cached if v is not None)

    def patch_into(self, spec: PatchSpec, patch, img_out: np.ndarray, lab_out: np.ndarray) -> None:
        """The patch of ``spec`` (its start, ``patch`` voxels a side, X, Y, Z) from the cached case into ``img_out``
        (C, X, Y, Z) and ``lab_out`` (X, Y, Z), from the store where the case is not cached; parts outside the case
        stay zero."""
        item = self.cached[spec.case]
        if item is None:
            self._fallback.patch_into(spec, patch, img_out, lab_out)
            return
        crop_pad(item["image"], spec.start, patch, torch.from_numpy(img_out))
        crop_pad(item["label"], spec.start, patch, torch.from_numpy(lab_out))


def _storage_users(t: torch.Tensor) -> int | None:
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(t.untyped_storage()._cdata)


class _BufferPool:
    """Batch tensors reused once nothing outside the pool refers to them any more.

    A fresh batch-sized tensor costs the CPU a page fault per 4 KiB each time (more than filling it); the pool
    hands out views of tensors it keeps, and takes a tensor back only when no view of it is alive (its storage's
    use count is back to the pool's own), so a batch the caller still holds is never overwritten. Where torch does
    not expose the use count, every batch is new. Pinned (CUDA) batches are not pooled: torch caches those, and
    an asynchronous copy may still be reading one the caller has dropped."""

    def __init__(self, keep: int):
        import threading

        self.keep = keep
        self._items: list[tuple[torch.Tensor, ...]] = []
        self._lock = threading.Lock()
        probe = torch.empty(1)
        self._idle = _storage_users(probe)  # the count of a tensor no one else refers to

    def get(self, shapes, dtypes) -> tuple[torch.Tensor, ...]:
        with self._lock:
            if self._idle is not None:
                for item in self._items:
                    if all(t.shape == s and t.dtype == d and _storage_users(t) == self._idle
                           for t, s, d in zip(item, shapes, dtypes)):
                        return tuple(t.view(t.shape) for t in item)  # a view: the pool sees it in use
            item = tuple(torch.empty(s, dtype=d) for s, d in zip(shapes, dtypes))
            if self._idle is not None:
                self._items = [*self._items[-(self.keep - 1):], item] if self.keep > 1 else [item]
            return tuple(t.view(t.shape) for t in item)


class _Batches:
    """Batch ``g`` = batch ``g % n`` of epoch ``g // n``, its specs recomputed from the seeded sampler, so any
    loader thread can assemble any batch of any epoch."""

    def __init__(self, source, sampler: PatchSampler):
        self.source = source
        self.sampler = sampler
        self._epoch: tuple[int, list] | None = None

    def specs(self, g: int) -> list[PatchSpec]:
        n = self.sampler.batches_per_epoch()
        e, b = divmod(g, n)
        cached = self._epoch  # one read: loader threads may replace it meanwhile
        if cached is None or cached[0] != e:
            cached = self._epoch = (e, self.sampler.epoch(e))
        return cached[1][b]

    def assemble(self, g: int, pin: bool = False, pool: _BufferPool | None = None):
        specs = self.specs(g)
        patch = self.sampler.patch
        shapes = ((len(specs), len(self.source.modalities), *patch), (len(specs), 1, *patch))
        if pool is not None and not pin:
            img, lab = pool.get(shapes, (torch.float16, torch.uint8))
        else:
            img = torch.empty(shapes[0], dtype=torch.float16, pin_memory=pin)
            lab = torch.empty(shapes[1], dtype=torch.uint8, pin_memory=pin)
        fetch = getattr(self.source, "fetch", None)  # object storage: the whole batch's bytes in one round
        fetched = fetch(specs, patch) if fetch is not None else None
        for i, s in enumerate(specs):  # each patch written once, straight into its slot of the batch
            if fetched is not None:
                self.source.patch_into(s, patch, img[i].numpy(), lab[i, 0].numpy(), fetched[i])
            else:
                self.source.patch_into(s, patch, img[i].numpy(), lab[i, 0].numpy())
        return img, lab


class GpuSource:
    """``gpu``: every case resident on the device in float16, patches cut there."""

    def __init__(self, store_path: str, case_ids: list[str], modalities, device, shapes, opened=None):
        # float16 image channels plus the uint8 label, per voxel of each case (``shapes``: the stored shapes)
        need = sum((2 * len(modalities) + 1) * int(np.prod(shape)) for shape in shapes)
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:  # the same path with the CPU as the device (the tests run it so where no GPU is present)
            import psutil

            free = psutil.virtual_memory().available
        if need > 0.8 * free:
            raise ValueError(f"--cache gpu needs {need / 2**30:.1f} GiB for {len(case_ids)} cases, the device has "
                             f"{free / 2**30:.1f} GiB free; use --cache ram or fewer cases")
        self.cases = []
        with heap_returned_to_os():
            for k, c in enumerate(case_ids):
                a = decode_case(opened[k], modalities) if opened else load_case_arrays(store_path, c, modalities)
                self.cases.append((a["image"].to(device), a["label"].to(device)))

    def nbytes(self) -> int:
        return sum(i.nbytes + label.nbytes for i, label in self.cases)

    def batch(self, specs: list[PatchSpec], patch):
        imgs = [crop_pad(self.cases[s.case][0], s.start, patch) for s in specs]
        labs = [crop_pad(self.cases[s.case][1], s.start, patch) for s in specs]
        return torch.stack(imgs), torch.stack(labs)[:, None]


class TrainLoader:
    """Batches of patches for one epoch at a time, delivered on ``device`` (image float16, label uint8);
    ``steps`` batches an epoch (default: one pass over the cases). ``store``: the store at ``store_path`` already
    opened, and its modalities and the cache mode already checked, by the caller (the trainer); None: opened and
    checked here."""

    def __init__(self, store_path: str, case_ids: list[str], modalities=MODALITIES, patch=(128, 128, 128),
                 batch_size: int = 2, cache: str = "ram", cache_rate: float = 1.0, workers: int = 2,
                 device: str | torch.device = "cpu", seed: int = 0, fg_fraction: float = 1 / 3,
                 progress: bool = False, steps: int | None = None, store=None):
        from store import open_store

        if store is None:  # opened here, so checked here; a trainer passes the store it opened and checked
            if cache not in CACHE_MODES:
                raise ValueError(f"cache must be ram, none or gpu, not {cache!r}")
            store = open_store(store_path)
            if err := store.modality_error(modalities):
                raise ValueError(err)
        self.device = torch.device(device)
        if cache == "gpu" and self.device.type != "cuda":
            raise ValueError("--cache gpu needs a CUDA device")
        cases = [store.case(c) for c in case_ids]
        self.case_ids = list(case_ids)
        self.modalities = tuple(modalities)
        self.patch = tuple(int(p) for p in patch)
        self.sampler = PatchSampler([c.shape for c in cases], [c.foreground() for c in cases], self.patch,
                                    batch_size, fg_fraction, seed, steps)
        self.cache = cache
        self.workers = workers
        self._threads = None
        if cache == "ram":
            self.source = RamSource(store_path, self.case_ids, modalities, cache_rate, workers, progress, cases)
        elif cache == "none":
            self.source = StoreSource(store_path, self.case_ids, modalities, cases)
        else:
            self.source = GpuSource(store_path, self.case_ids, modalities, self.device, [c.shape for c in cases],
                                    cases)
        self._batches = _Batches(self.source, self.sampler)
        # batches in flight (2 per thread, 1 more being filled) + the caller's + one it may keep a step longer
        self._buffers = _BufferPool(keep=3 * max(workers, 1) + 2)

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch()

    def _pool(self):
        if self._threads is None:
            from concurrent.futures import ThreadPoolExecutor

            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="loader")
        return self._threads

    def epoch(self, epoch: int):
        """Yields (image, label) on the device; the next batches are assembled while the caller works on this
        one, and host-to-device copies are asynchronous (pinned batches) on CUDA."""
        n = len(self)
        if self.cache == "gpu":
            for specs in self.sampler.epoch(epoch):
                yield self.source.batch(specs, self.patch)
            return
        cuda = self.device.type == "cuda"
        indices = iter(range(epoch * n, (epoch + 1) * n))
        if not self.workers:
            for g in indices:
                img, lab = self._batches.assemble(g, cuda, self._buffers)
                yield img.to(self.device, non_blocking=cuda), lab.to(self.device, non_blocking=cuda)
            return
        # ``workers`` loader threads, each assembling a whole batch; the reading and decoding release the GIL,
        # so threads run in parallel, and a batch needs no trip through shared memory as with processes
        pool, pending = self._pool(), collections.deque()
        try:
            for g in itertools.islice(indices, 2 * self.workers):
                pending.append(pool.submit(self._batches.assemble, g, cuda, self._buffers))
            while pending:
                img, lab = pending.popleft().result()
                for g in itertools.islice(indices, 1):
                    pending.append(pool.submit(self._batches.assemble, g, cuda, self._buffers))
                yield img.to(self.device, non_blocking=cuda), lab.to(self.device, non_blocking=cuda)
        finally:  # the caller stopped early: drop what is queued
            for f in pending:
                f.cancel()

    def close(self) -> None:
        """Stop the loader threads (they also end with the process)."""
        if self._threads is not None:
            self._threads.shutdown(cancel_futures=True)
            self._threads = None
