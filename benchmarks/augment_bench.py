"""``python -m benchmarks augment``: augmented 4-channel samples per second with nnU-Net's default chain, every arm
in one run on the same cores, on the benchmark's full-size cases (the patch and its enlarged read as nnU-Net sizes
them: 205^3 for 128^3).

- nnU-Net's own data path (``benchmarks.nnunet_path``): its ``nnUNetDataLoader`` over the cases in its
  preprocessed format, with ``get_training_transforms``, in its multi-process augmenter with one process per core,
  timed from the augmenter's start (each repeat starts a fresh one, so no batch made beforehand is counted);
- batchgeneratorsv2, one process: nnU-Net's own transforms (built as ``nnUNetTrainer.get_training_transforms``
  builds them, from batchgeneratorsv2's classes) applied sample by sample to enlarged regions already in memory:
  the augmentation alone, as one of nnU-Net's augmentation processes does it;
- batchgeneratorsv2, one process per core: the same, in a process pool (nnU-Net runs ``nnUNet_n_proc_DA``
  augmentation processes; each sample's tensors come back to the parent, as its batches do);
- MONAI, one process: MONAI's nearest transforms per sample (RandAffined rotation and scaling, RandGaussianNoised,
  RandGaussianSmoothd, RandScaleIntensityd, RandAdjustContrastd, RandSimulateLowResolutiond, RandFlipd on each axis);
- ours, for each cache mode: this project's loader reading the enlarged region and ``--augmentation nnunet``'s
  batched chain on the device, as the trainer runs them.
Without nnU-Net installed (the ``peers`` extra) the first arm is reported as not measured.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from . import nnunet_path
from .cohort import bench_inputs
from .report import bar_chart, summarize, write_result

BATCH = 2


def nnunet_chain(patch):
    """nnU-Net v2.8.1's default 3d_fullres training transforms, from batchgeneratorsv2 (its trainer's code, for a
    3D patch without dummy 2D augmentation, BraTS regions, every channel masked outside the brain)."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

    rot = (-30.0 / 360 * 2 * math.pi, 30.0 / 360 * 2 * math.pi)
    return ComposeTransforms([
        SpatialTransform(patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0, p_rotation=0.2,
                         rotation=rot, p_scaling=0.2, scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1,
                         bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None, allowed_channels=None,
                                                       p_per_channel=0.5), apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
        MaskImageTransform(apply_to_channels=[0, 1, 2, 3], channel_idx_in_seg=0, set_outside_to=0),
        RemoveLabelTransform(-1, 0),
        ConvertSegmentationToRegionsTransform(regions=list(nnunet_path.REGIONS), channel_in_seg=0),
    ])


def monai_chain(keys=("image", "label")):
    """MONAI's nearest per-sample transforms, at nnU-Net's probabilities and ranges where MONAI has the knob."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandSimulateLowResolutiond,
    )

    rot = math.radians(30)
    return Compose([
        RandAffined(keys=list(keys), prob=0.36, rotate_range=(rot, rot, rot), scale_range=(0.3, 0.3, 0.3),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianNoised(keys="image", prob=0.1, std=0.1),
        RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1), sigma_y=(0.5, 1), sigma_z=(0.5, 1)),
        RandScaleIntensityd(keys="image", prob=0.15, factors=0.25),
        RandSimulateLowResolutiond(keys="image", prob=0.25, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        RandFlipd(keys=list(keys), prob=0.5, spatial_axis=0), RandFlipd(keys=list(keys), prob=0.5, spatial_axis=1),
        RandFlipd(keys=list(keys), prob=0.5, spatial_axis=2),
    ])


_POOL_STATE: dict = {}


def _pool_init(regions, patch, seed):
    import numpy as np
    import torch

    torch.set_num_threads(1)
    np.random.seed(seed + os.getpid() % 1000)
    _POOL_STATE.update(regions=regions, chain=nnunet_chain(patch))


def _pool_sample(i: int):
    img, seg = _POOL_STATE["regions"][i % len(_POOL_STATE["regions"])]
    out = _POOL_STATE["chain"](image=img.clone(), segmentation=seg.clone())
    return out["image"], out["segmentation"]


def _regions(store_path, ids, read, n):
    """``n`` enlarged regions (image (4, *read) float32, seg (1, *read) int16 with -1 outside the brain), each
    read from the store around a case's centre (padded where the case is smaller), as nnU-Net's loader gives them."""
    import torch

    from store import open_store
    from train.sampling import crop_pad

    s = open_store(store_path)
    out = []
    for k in range(n):
        case = s.case(ids[k % len(ids)])
        img, lab = torch.from_numpy(case.image()), torch.from_numpy(case.label())[None]
        start = [sh // 2 - r // 2 for sh, r in zip(case.shape, read)]
        img, lab = crop_pad(img, start, read), crop_pad(lab, start, read)
        seg = lab.to(torch.int16)
        seg[~(img != 0).any(0, keepdim=True)] = -1
        out.append((img.float(), seg))
    return out


def _rate(fn, samples: int) -> float:
    t0 = time.perf_counter()
    fn(samples)
    return samples / (time.perf_counter() - t0)


def _ratios(res: dict, modes, cores: int) -> dict:
    """Ours per cache mode over nnU-Net's data path (where measured), batchgeneratorsv2's pool and one process."""

    def over(arm):
        return {m: res[f"ours, --cache {m}"]["median"] / res[arm]["median"] for m in modes}

    nnunet_arm = f"nnU-Net's data path, {cores} processes"
    return {"ours_over_batchgeneratorsv2_pool": over(f"batchgeneratorsv2, {cores} processes"),
            "ours_over_batchgeneratorsv2_one_process": over("batchgeneratorsv2, 1 process"),
            "ours_over_nnunet_data_path": over(nnunet_arm) if nnunet_arm in res else f"not measured: "
                                                                                     f"{nnunet_path.HINT}"}


def run(out_dir: Path, work: Path, size: str = "full", repeats: int | None = None) -> dict:
    import multiprocessing

    import numpy as np
    import torch

    from store import open_store
    from train.loader import TrainLoader
    from train.nnunet_augment import NnunetBatchAugment, input_size

    from .loader_bench import _time_ours

    b = bench_inputs(work, size)
    patch = b.patch
    read = input_size(patch)
    ids = open_store(b.store).case_ids
    reps = repeats or (3 if size == "full" else 1)
    per_arm = {"full": 8, "quick": 4, "tiny": 2}[size]
    cores = os.cpu_count() or 1
    regions = _regions(b.store, ids, read, min(len(ids), 4))
    chain = nnunet_chain(patch)
    monai = monai_chain()
    np.random.seed(0)
    monai.set_random_state(0)

    def bg_one(n):
        for i in range(n):
            img, seg = regions[i % len(regions)]
            chain(image=img.clone(), segmentation=seg.clone())

    def monai_one(n):
        for i in range(n):
            img, seg = regions[i % len(regions)]
            monai({"image": img.clone(), "label": seg.clamp_min(0).clone()})

    ctx = multiprocessing.get_context("fork")
    nnunet_arm = f"nnU-Net's data path, {cores} processes"
    nnunet = nnunet_path.available()
    arms: dict[str, list] = {**({nnunet_arm: []} if nnunet else {}), "batchgeneratorsv2, 1 process": [],
                             f"batchgeneratorsv2, {cores} processes": [], "MONAI, 1 process": []}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = ["ram", "none"] + (["gpu"] if device.type == "cuda" else [])
    for m in modes:
        arms[f"ours, --cache {m}"] = []
    loaders = {m: TrainLoader(b.store, ids, patch=read, batch_size=BATCH, cache=m, workers=2, device=device, seed=0)
               for m in modes}
    with ctx.Pool(cores, initializer=_pool_init, initargs=(regions, patch, 0)) as pool:
        pool.map(_pool_sample, range(cores))  # warm-up: each process builds its chain
        if nnunet:
            folder = nnunet_path.prepare(Path(work), b.store, ids, patch)
        for _ in range(reps):
            if nnunet:
                with nnunet_path.augmenter(folder, ids, patch, read, BATCH, cores, device.type == "cuda") as gen:
                    arms[nnunet_arm].append(nnunet_path.rate(gen, per_arm * cores, BATCH))
            arms["batchgeneratorsv2, 1 process"].append(_rate(bg_one, per_arm))
            arms[f"batchgeneratorsv2, {cores} processes"].append(
                _rate(lambda n: pool.map(_pool_sample, range(n)), per_arm * cores))
            arms["MONAI, 1 process"].append(_rate(monai_one, per_arm))
            for m, loader in loaders.items():
                augment = NnunetBatchAugment(patch, seed=0)
                _time_ours(loader, augment, BATCH, device)  # warm-up
                arms[f"ours, --cache {m}"].append(_time_ours(loader, augment, 4 * per_arm, device))
    for loader in loaders.values():
        loader.close()
    res = {k: summarize(v) for k, v in arms.items()}
    payload = {"size": size, "cases": len(ids), "patch": list(patch), "read": list(read), "batch": BATCH,
               "device": str(device), "channels": 4, "samples_per_s": res, **_ratios(res, modes, cores),
               "cores": cores,
               "goals": {"ours --cache ram / nnU-Net's data path": ">= 5x", "ours --cache none": ">= 3x"}}
    write_result(out_dir, "augment", payload)
    bar_chart(Path(out_dir) / "augment.png", f"nnU-Net's augmentation: samples/s ({'x'.join(map(str, patch))} from "
              f"{'x'.join(map(str, read))}, 4 channels, {device})", "samples / s", res)
    for k, v in res.items():
        print(f"{k:32s} {v['median']:8.2f} samples/s")
    return payload
