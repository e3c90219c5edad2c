from types import SimpleNamespace

import numpy as np
import pytest
import torch

from store import open_store
from store.conventions import region_masks
from train.loader import RamSource, TrainLoader
from train.sampling import PatchSampler, crop_pad

from .conftest import needs_cuda


def _epochs(loader, n=2):
    return [(a.clone(), b.clone()) for e in range(n) for a, b in loader.epoch(e)]


# the cache modes compared with ram; gpu on a CUDA device (skipped, and said so, where none is present; the gpu
# mode's code on the CPU: test_the_gpu_modes_code_on_the_cpu_gives_rams_batches)
OTHER_MODES = ["none", pytest.param("gpu", marks=needs_cuda)]


@pytest.mark.parametrize("mode", OTHER_MODES)
@pytest.mark.parametrize("workers", [0, 2])
def test_cache_modes_give_identical_batches(tiny_store, workers, mode):
    ids = open_store(tiny_store).case_ids
    device = "cuda" if mode == "gpu" else "cpu"
    kw = dict(modalities=("t1", "t2", "flair"), patch=(16, 16, 16), batch_size=3, workers=workers, seed=5,
              device=device)
    ram = _epochs(TrainLoader(tiny_store, ids, cache="ram", **kw))
    other = _epochs(TrainLoader(tiny_store, ids, cache=mode, **kw))
    assert len(ram) == len(other) == 4
    for (a, b), (c, d) in zip(ram, other):
        assert a.dtype == torch.float16 and a.shape == (3, 3, 16, 16, 16) and b.shape == (3, 1, 16, 16, 16)
        assert a.device.type == c.device.type == device
        assert torch.equal(a, c) and torch.equal(b, d)
    other_seed = _epochs(TrainLoader(tiny_store, ids, cache="ram", **{**kw, "seed": 6}))
    assert not all(torch.equal(a, c) for (a, _), (c, _) in zip(ram, other_seed))


def test_none_reads_patches_across_chunk_borders_as_ram(tmp_path):
    """Cases larger than a chunk: patches straddle chunk borders (and the case border) on every axis."""
    from prep.build import BuildConfig, build_store
    from store.format import CURRENT

    from .helpers import write_case

    n = CURRENT.image_chunks[1]
    for i in range(2):
        write_case(tmp_path / "raw", f"BraTS2021_0000{i}", shape=(n + 30, n + 20, 24), seed=i)
    store = str(tmp_path / "s.zarr")
    build_store(BuildConfig(source=str(tmp_path / "raw"), store=store, workers=0), progress=False)
    ids = open_store(store).case_ids
    assert all(open_store(store).case(c).shape[0] > n for c in ids)
    kw = dict(patch=(n // 2 + 8, n // 2 + 8, 16), batch_size=4, workers=2, seed=1)
    ram = _epochs(TrainLoader(store, ids, cache="ram", **kw), 3)
    none = _epochs(TrainLoader(store, ids, cache="none", **kw), 3)
    for (a, b), (c, d) in zip(ram, none):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_stopping_an_epoch_early_leaves_the_next_unchanged(tiny_store):
    ids = open_store(tiny_store).case_ids
    kw = dict(patch=(16, 16, 16), batch_size=1, cache="none", workers=2, seed=3)
    loader = TrainLoader(tiny_store, ids, **kw)
    first = next(iter(loader.epoch(0)))  # abandoned with batches still queued
    again = _epochs(loader, 2)
    fresh = _epochs(TrainLoader(tiny_store, ids, **kw), 2)
    assert torch.equal(first[0], fresh[0][0])
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(again, fresh))
    loader.close()
    assert len(_epochs(loader, 1)) == len(loader)  # closed threads come back on demand


def test_patch_holds_the_chosen_channels_of_the_case(tiny_store):
    s = open_store(tiny_store)
    ids = s.case_ids
    loader = TrainLoader(tiny_store, ids, modalities=("flair", "t1"), patch=(16, 16, 16), batch_size=2,
                         cache="none", workers=0, seed=0)
    specs = loader.sampler.epoch(0)[0]
    img, lab = next(iter(loader.epoch(0)))
    for i, spec in enumerate(specs):
        case = s.case(ids[spec.case])
        ref = crop_pad(case.image(("flair", "t1")).astype(np.float16), spec.start, (16, 16, 16))
        np.testing.assert_array_equal(img[i].numpy(), ref)
        np.testing.assert_array_equal(lab[i, 0].numpy(), crop_pad(case.label(), spec.start, (16, 16, 16)))


def test_patch_larger_than_case_is_zero_padded(tiny_store):
    s = open_store(tiny_store)
    ids = s.case_ids[:2]
    loader = TrainLoader(tiny_store, ids, patch=(48, 48, 48), batch_size=2, cache="none", workers=0, seed=0)
    img, lab = next(iter(loader.epoch(0)))
    assert img.shape == (2, 4, 48, 48, 48)
    for i, spec in enumerate(loader.sampler.epoch(0)[0]):
        shape = s.case(ids[spec.case]).shape
        inside = np.zeros((48, 48, 48), bool)
        inside[tuple(slice(-a, -a + n) for a, n in zip(spec.start, shape))] = True
        assert (img[i][:, torch.from_numpy(~inside)] == 0).all()
        assert float(img[i].float().abs().sum()) > 0


def test_foreground_oversampling_rate(tiny_store):
    s = open_store(tiny_store)
    ids = s.case_ids
    cases = [s.case(c) for c in ids]
    patch = (8, 8, 8)
    sampler = PatchSampler([c.shape for c in cases], [c.foreground() for c in cases], patch, batch_size=3,
                           fg_fraction=1 / 3, seed=0)
    assert sampler.n_foreground() == 1
    labels = [c.label() for c in cases]
    hits_forced, hits_random, n = 0, 0, 0
    for e in range(60):
        for batch in sampler.epoch(e):
            for i, spec in enumerate(batch):
                lab = labels[spec.case]
                centre = tuple(int(np.clip(a + p // 2, 0, n_ - 1)) for a, p, n_ in zip(spec.start, patch, lab.shape))
                if i == 2:
                    n += 1
                    hits_forced += bool(lab[centre] > 0)
                else:
                    hits_random += bool(lab[centre] > 0)
    assert hits_forced == n  # every forced sample is centred on tumour
    assert hits_random < 0.5 * 2 * n  # random ones mostly are not: oversampling is what finds tumour
    regions = region_masks(labels[0], s.label_convention)
    assert regions[1].any()


@pytest.mark.parametrize("workers", [0, 2])
def test_the_gpu_modes_code_on_the_cpu_gives_rams_batches(tiny_store, workers):
    """The gpu cache mode's source (every case resident on the device, patches cut there) with the CPU as its
    device, through the loader's own gpu branch: the ram mode's batches, bit for bit."""
    from train.loader import GpuSource

    ids = open_store(tiny_store).case_ids
    kw = dict(modalities=("t1", "t2", "flair"), patch=(16, 16, 16), batch_size=3, workers=workers, seed=5)
    ram = _epochs(TrainLoader(tiny_store, ids, cache="ram", **kw))
    loader = TrainLoader(tiny_store, ids, cache="ram", **kw)
    shapes = [open_store(tiny_store).case(c).shape for c in ids]
    loader.source, loader.cache = GpuSource(tiny_store, ids, kw["modalities"], "cpu", shapes), "gpu"
    gpu = _epochs(loader)
    assert len(ram) == len(gpu) == 4
    for (a, b), (c, d) in zip(ram, gpu):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_unknown_modality_and_cache_mode(tiny_store):
    ids = open_store(tiny_store).case_ids
    with pytest.raises(ValueError, match="unknown modality dwi"):
        TrainLoader(tiny_store, ids, modalities=("t1", "dwi"), patch=(8, 8, 8), workers=0)
    with pytest.raises(ValueError, match="cache must be"):
        TrainLoader(tiny_store, ids, patch=(8, 8, 8), workers=0, cache="disk")
    with pytest.raises(ValueError, match="CUDA"):  # on any machine: the device asked for is the CPU
        TrainLoader(tiny_store, ids, patch=(8, 8, 8), workers=0, cache="gpu", device="cpu")


def _worker_view(_):
    info = torch.utils.data.get_worker_info()
    src = info.dataset.source
    import psutil

    return {"shared": all(v["image"].is_shared() for v in src.cached if v is not None),
            "uss": psutil.Process().memory_full_info().uss}


class _Probe(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return _worker_view(i)


def test_ram_cache_shared_with_workers_not_copied(tmp_path):
    """Under spawn, a plain cache would be pickled into every worker; the shared-memory one is not."""
    from prep.build import BuildConfig, build_store

    from .helpers import write_case

    for i in range(3):
        write_case(tmp_path / "raw", f"BraTS2021_0000{i}", shape=(100, 100, 80), seed=i)
    store = str(tmp_path / "s.zarr")
    build_store(BuildConfig(source=str(tmp_path / "raw"), store=store, workers=0), progress=False)
    src = RamSource(store, open_store(store).case_ids, ("t1", "t1ce", "t2", "flair"))
    assert src.nbytes() > 20e6
    # the whole cache, labels included, lies in shared memory before any worker exists
    assert all(v["image"].is_shared() and v["label"].is_shared() for v in src.cached)
    def run(source, workers):
        dl = torch.utils.data.DataLoader(_Probe(source), batch_size=None, num_workers=workers,
                                         multiprocessing_context="spawn")
        return list(dl)

    empty = run(SimpleNamespace(cached=[]), 1)  # a worker that holds no cache at all
    views = run(src, 2)
    assert all(x["shared"] for x in views)
    # each worker's own (unshared) memory is that of a worker without the cache, not one more copy of it
    assert max(x["uss"] for x in views) - empty[0]["uss"] < 0.5 * src.nbytes()


def test_batch_buffers_are_reused_only_once_released():
    from train.loader import _BufferPool

    pool = _BufferPool(keep=4)
    shapes, dtypes = ((2, 3), (2, 1)), (torch.float16, torch.uint8)
    a = pool.get(shapes, dtypes)
    held = a[0][1:]  # a view the caller keeps
    a[0].fill_(1)
    ptr = a[0].data_ptr()
    del a
    b = pool.get(shapes, dtypes)
    assert b[0].data_ptr() != ptr  # still referred to through ``held``: not handed out again
    del held
    c = pool.get(shapes, dtypes)
    assert c[0].data_ptr() == ptr  # released: reused
    assert pool.get(shapes, dtypes)[0].data_ptr() not in (ptr, b[0].data_ptr())
    assert pool.get(((4, 3), (4, 1)), dtypes)[0].shape == (4, 3)


_CHURN = """
import contextlib, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from train.distributed import heap_returned_to_os

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

keep = []

def decode(i):  # a case decoded chunk by chunk on a loader thread: buffers of about a MiB, freed at the end
    bufs = [np.ones(2**20 + (j % 7) * 4096, dtype=np.uint8) for j in range(16)]
    keep.append(np.ones(64))  # something small that outlives them
    return len(bufs)

scope = heap_returned_to_os() if sys.argv[1] == "scoped" else contextlib.nullcontext()
before = anon()
with scope, ThreadPoolExecutor(2) as pool:
    list(pool.map(decode, range(40)))
print((anon() - before) / 2**20)
"""


def test_filling_a_cache_leaves_no_decode_buffers_resident():
    """Each rank fills its cache on threads; the decode buffers they free must not stay resident, or every rank
    on a node pays them again beside the one shared copy of the cohort."""
    import subprocess
    import sys
    from pathlib import Path

    def grown(mode):
        r = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parents[1])
        return float(r.stdout)

    assert grown("plain") > 16  # what glibc keeps by itself: the pattern does reproduce the problem
    assert grown("scoped") < 4
