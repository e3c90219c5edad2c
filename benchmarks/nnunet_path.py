"""nnU-Net v2's own training data path, the first arm of ``python -m benchmarks augment``.

What nnU-Net's trainer builds in ``get_dataloaders``, for a 3D patch with BraTS regions:
- its preprocessed cases: the store's cases (1 mm, z-scored inside the brain, as nnU-Net's preprocessing leaves
  BraTS) cropped to their nonzero region by nnU-Net's ``crop_to_nonzero`` (the label -1 outside the brain), their
  foreground locations drawn by its preprocessor's sampler for the regions, and saved by
  ``nnUNetDatasetBlosc2.save_case`` with the blosc2 chunks and blocks its preprocessor picks for the patch;
- its ``nnUNetDataLoader`` over them (a third of each batch forced to hold foreground, the enlarged region read and
  cropped per sample), applying ``nnUNetTrainer.get_training_transforms`` (the rotation and mirroring of
  ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``; no deep-supervision targets, so that the chain is
  the one every other arm runs);
- its ``NonDetMultiThreadedAugmenter`` with ``nnUNet_n_proc_DA`` processes.

nnU-Net is an optional peer (``pip install -e '.[peers]'``): without it this arm is reported as not measured.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import time
from pathlib import Path

REGIONS = ((1, 2, 4), (1, 4), (4,))  # WT, TC, ET in BraTS 2021's values, as every arm converts them
LABELS = {"background": 0, **{name: list(r) for name, r in zip(("whole tumor", "tumor core", "enhancing tumor"),
                                                                   REGIONS)}}
HINT = "needs nnU-Net v2 (pip install -e '.[peers]')"


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("nnunetv2", "blosc2", "acvl_utils"))


def _quiet_paths(work: Path) -> None:
    """nnU-Net reads its three folders from the environment at import and warns when they are unset."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(name, str(work / name))


def label_manager():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    return LabelManager(LABELS, regions_class_order=[1, 2, 3])


def write_preprocessed(store_path, ids, folder: Path, patch) -> list[str]:
    """The store's cases ``ids`` in nnU-Net's preprocessed format in ``folder``, written by nnU-Net's own code."""
    import numpy as np
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    from store import open_store

    folder.mkdir(parents=True, exist_ok=True)
    store = open_store(store_path)
    regions = label_manager().foreground_regions
    for cid in ids:
        case = store.case(cid)
        data, seg, bbox = crop_to_nonzero(case.image(), case.label()[None].astype(np.int16))
        props = {"spacing": list(case.spacing), "bbox_used_for_cropping": bbox,
                 "class_locations": DefaultPreprocessor._sample_foreground_locations(seg, regions)}
        blocks, chunks = comp_blosc2_params(data.shape, tuple(patch), data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(patch), seg.itemsize)
        nnUNetDatasetBlosc2.save_case(np.ascontiguousarray(data, np.float32), seg, props, str(folder / cid),
                                      chunks=chunks, blocks=blocks, chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    return list(ids)


def training_transforms(patch):
    """``nnUNetTrainer.get_training_transforms`` as its trainer calls it for a 3D patch: rotation +-30 degrees,
    mirroring on every axis, the image masked outside the brain in every channel, BraTS regions."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    rot = (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi)
    lm = label_manager()
    return nnUNetTrainer.get_training_transforms(
        tuple(patch), rot, None, (0, 1, 2), False, use_mask_for_norm=[True] * 4, is_cascaded=False,
        foreground_labels=lm.foreground_labels, regions=lm.foreground_regions, ignore_label=None)


@contextlib.contextmanager
def augmenter(folder: Path, ids, patch, read, batch: int, processes: int, pin_memory: bool = False):
    """nnU-Net's training batches: its loader over ``folder``'s cases in its multi-process augmenter."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dl = nnUNetDataLoader(nnUNetDatasetBlosc2(str(folder), list(ids)), batch, tuple(read), tuple(patch),
                          label_manager(), oversample_foreground_percent=0.33, sampling_probabilities=None,
                          pad_sides=None, transforms=training_transforms(patch), probabilistic_oversampling=False)
    gen = NonDetMultiThreadedAugmenter(data_loader=dl, transform=None, num_processes=processes,
                                       num_cached=max(6, processes // 2), seeds=None, pin_memory=pin_memory,
                                       wait_time=0.002)
    try:
        yield gen
    finally:
        gen._finish()


def rate(gen, samples: int, batch: int) -> float:
    """Augmented samples per second from nnU-Net's augmenter, over whole batches."""
    t0 = time.perf_counter()
    for _ in range(max(1, samples // batch)):
        next(gen)
    return max(1, samples // batch) * batch / (time.perf_counter() - t0)


def prepare(work: Path, store_path, ids, patch) -> Path:
    """Cases written once per work folder (the store's ids and patch name it)."""
    _quiet_paths(work)
    folder = Path(work) / f"nnunet-preprocessed-{'x'.join(map(str, patch))}"
    done = folder / ".complete"
    if not done.exists() or done.read_text() != " ".join(ids):
        write_preprocessed(store_path, ids, folder, patch)
        done.write_text(" ".join(ids))
    return folder
