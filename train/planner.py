"""``python -m train plan --store S``: a plan (train.plan) sized to a store and a device by measurement.

From the store's fingerprint (every case's stored shape and the spacing), as nnU-Net's planner derives them:
- the patch starts as the cube of 256^3 voxels' worth of millimetres (at the store's spacing), capped at the median
  case's shape on each axis;
- the network's depth: halve the patch on every axis while its feature maps stay at least 4 voxels a side (at most
  six levels); each side is rounded up to a multiple of 2^(levels - 1); channels start at 16 and double per level
  up to 256 (this project's UNet, the seed's widths).

Then the batch, by a trial training step (forward, loss, backward, optimiser step; twice, so that the optimiser's
state is there) of the planned network on random data, each in a child process of its own: its peak memory is
measured, not estimated (on a GPU the peak allocated by torch; on the CPU the child's peak resident memory, torch
and MONAI imported, as a training process has them). The batch is the largest from 2 (nnU-Net's least) whose peak
fits the budget, at most what covers 5% of the cohort's voxels per step (nnU-Net's cap); where batch 2 does not fit,
the patch shrinks on the axis largest against the median shape in steps of 2^(levels - 1), the largest that fits
found by bisection over those steps. A budget below the smallest patch's peak is one line naming that peak; the
first patch is one that fits whole in at least one training case (the trainer samples inside a case).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from .errors import ConfigError

FEATURE_MIN = 4  # nnU-Net's UNet_featuremap_min_edge_length
MAX_LEVELS = 6
MIN_BATCH = 2  # nnU-Net's UNet_min_batch_size
DATASET_SHARE = 0.05  # nnU-Net's max_dataset_covered


def fingerprint(store, modalities, ids=None) -> dict:
    """The store's cases (``ids``: its training cases) as the planner sees them: their stored shapes, the median,
    the spacing."""
    shapes = [list(store.case(c).shape) for c in (ids or store.case_ids)]
    if not shapes:
        raise ConfigError(f"store {store.path} holds no cases to plan for")
    return {"cases": len(shapes), "shapes": shapes,
            "median_shape": [int(v) for v in np.median(np.array(shapes), axis=0)],
            "spacing_mm": [float(v) for v in store.params.get("spacing_mm", (1.0, 1.0, 1.0))],
            "voxels": int(sum(math.prod(s) for s in shapes)), "modalities": list(modalities),
            "label_convention": store.label_convention}


def topology(patch, levels_cap: int = MAX_LEVELS) -> tuple[list[int], int]:
    """(patch rounded up to a multiple of 2^(levels - 1), levels): levels while every side's feature map stays at
    least FEATURE_MIN voxels, at most ``levels_cap``."""
    levels = 1
    while levels < levels_cap and min(patch) / 2 ** levels >= FEATURE_MIN:
        levels += 1
    step = 2 ** (levels - 1)
    return [int(math.ceil(p / step) * step) for p in patch], levels


def initial_patch(median_shape, spacing) -> tuple[list[int], int]:
    """nnU-Net's starting patch (256^3 voxels' worth of mm at this spacing, capped at the median shape) and depth."""
    inv = 1 / np.asarray(spacing, float)
    start = [round(v) for v in inv * (256 ** 3 / np.prod(inv)) ** (1 / 3)]
    return topology([int(min(a, b)) for a, b in zip(start, median_shape)])


def channels_for(levels: int) -> list[int]:
    return [min(16 * 2 ** k, 256) for k in range(levels)]


def _trial_step(cfg_values: dict, batch: int, device: str) -> dict:
    """One child's work: two training steps of the planned network on random data; its peak on a GPU."""
    import torch

    from .config import TrainConfig
    from .device import amp_context, resolve_device
    from .engine import train_step
    from .models import build, make_loss, make_optimizer

    cfg = TrainConfig.from_dict({**cfg_values, "batch_size": batch})
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = build(cfg).to(dev)
    loss_fn, opt = make_loss(cfg), make_optimizer(cfg, model.parameters())
    autocast, scaler, _ = amp_context(cfg, dev)
    x = torch.randn(batch, len(cfg.modalities), *cfg.patch_size, device=dev)
    y = (torch.rand(batch, len(cfg.regions), *cfg.patch_size, device=dev) > 0.5).float()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(2):
        train_step(model, opt, loss_fn, autocast, scaler, x, y)
    out = {"device": dev.type}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        out["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return out


def measure(cfg_values: dict, batch: int, device: str) -> float:
    """Peak memory (MB) of a training step at ``batch`` in a child process (fork; the parent holds no torch
    threads or CUDA context)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        try:
            payload = _trial_step(cfg_values, batch, device)
        except Exception as e:  # out of memory on the device, or anything else: the parent reports it
            payload = {"error": f"{type(e).__name__}: {e}"}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(payload))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status, usage = os.wait4(pid, 0)
    payload = json.loads(text) if text else {"error": f"the trial process ended with status {status}"}
    if "error" in payload:
        if "out of memory" in payload["error"].lower():
            return math.inf
        raise RuntimeError(f"the trial training step failed: {payload['error']}")
    return payload.get("peak_mb", usage.ru_maxrss / 1024)


def plan_for_store(store, budget_gb: float, device: str = "cpu", modalities=None, model: str = "unet",
                   amp: bool = False, progress: bool = True) -> dict:
    """A plan (train.plan) for ``store`` whose measured training-step peak fits ``budget_gb`` on ``device``."""
    from .config import TrainConfig
    from .plan import make_plan

    mods = tuple(modalities or store.modalities)
    if missing := [m for m in mods if m not in store.modalities]:
        raise ConfigError(f"unknown modality {', '.join(missing)}; the store has {', '.join(store.modalities)}")
    fp = fingerprint(store, mods, store.splits.get("train"))
    # imported once here, so that each forked trial starts with them (as a training process has them) instead of
    # importing them again (5 s a trial on 2 cores); importing starts neither torch's threads nor a CUDA context
    import monai.losses  # noqa: F401
    import monai.networks.nets  # noqa: F401
    import torch.optim  # noqa: F401

    from . import engine, models  # noqa: F401
    patch, levels = initial_patch(fp["median_shape"], fp["spacing_mm"])
    patch[0] = patch[1] = max(patch[:2])  # the seed's augmentation (the default) rotates in the first two axes' plane
    step = 2 ** (levels - 1)
    budget_mb = budget_gb * 1024
    trials: list[dict] = []

    def values(p, b):
        return TrainConfig(modalities=mods, patch_size=tuple(p), batch_size=b, model=model, amp=amp,
                           channels=tuple(channels_for(levels)), device=device).to_dict()

    def trial(p, b) -> float:
        peak = measure(values(p, b), b, device)
        trials.append({"patch_size": list(p), "batch_size": b, "peak_mb": round(peak, 1)})
        if progress:
            print(f"plan: patch {'x'.join(map(str, p))}, batch {b}: peak {peak:.0f} MB (budget {budget_mb:.0f} MB)",
                  file=sys.stderr)
        return peak

    def shrunk(p) -> list[int] | None:
        """One step off the axis largest against the median shape (both of the first two together), or None."""
        ratios = [v / m for v, m in zip(p, fp["median_shape"])]
        axes = [int(a) for a in np.argsort(ratios)[::-1] if p[a] - step >= step * 2]
        if not axes:
            return None
        return [v - step if a in ((0, 1) if axes[0] in (0, 1) else axes[:1]) else v for a, v in enumerate(p)]

    # every patch from the fingerprint's down to the smallest, each one step smaller than the one before; the
    # trainer samples patches inside a case, so the first must fit whole in at least one training case
    sequence = [patch]
    while (smaller := shrunk(sequence[-1])) is not None:
        sequence.append(smaller)
    sequence = [p for p in sequence if any(all(s >= v for s, v in zip(shape, p)) for shape in fp["shapes"])]
    # the largest that fits the budget at batch 2, by bisection over the sequence (the peak grows with the patch)
    if trial(sequence[0], MIN_BATCH) <= budget_mb:
        patch = sequence[0]
    elif len(sequence) == 1 or trial(sequence[-1], MIN_BATCH) > budget_mb:
        raise ConfigError(f"--memory {budget_gb:g} GB is too small: the smallest patch "
                          f"({'x'.join(map(str, sequence[-1]))}, batch {MIN_BATCH}) peaks at "
                          f"{trials[-1]['peak_mb'] / 1024:.2f} GB measured on {device}")
    else:
        lo, hi = 0, len(sequence) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if trial(sequence[mid], MIN_BATCH) <= budget_mb else (mid, hi)
        patch = sequence[hi]
    cap = max(MIN_BATCH, int(fp["voxels"] * DATASET_SHARE / math.prod(patch)))
    batch = MIN_BATCH
    while batch < cap and trial(patch, batch + 1) <= budget_mb:
        batch += 1
    peak = next(t["peak_mb"] for t in trials if t["patch_size"] == patch and t["batch_size"] == batch)
    cfg = TrainConfig.from_dict(values(patch, batch))
    fp.pop("shapes")
    return make_plan(cfg, store.label_convention, fp["spacing_mm"], extra={
        "fingerprint": fp,
        "sizing": {"device": device, "budget_gb": budget_gb, "peak_mb": peak, "levels": levels,
                   "batch_cap": cap, "trials": trials,
                   "how": "peak of two training steps on random data, measured in a child process (GPU: torch's "
                          "peak allocation; CPU: the child's peak resident memory)"}})
