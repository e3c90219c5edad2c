"""Sliding-window probabilities of a loaded run's models for a preprocessed image, with test-time augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from train.runs import LoadedRun

# the 8 mirrorings of the three spatial axes of a (B, C, X, Y, Z) tensor, the identity first
MIRRORS: tuple[tuple[int, ...], ...] = tuple(d for k in range(4) for d in itertools.combinations((2, 3, 4), k))


def predict_probabilities(run: LoadedRun, image: np.ndarray, device, tta: bool = False) -> np.ndarray:
    """Sigmoid probabilities (R, X, Y, Z) of the run's regions (``run.config.regions``: TC, WT, ET[, RC]) for a
    preprocessed image (C, X, Y, Z), averaged over the run's models (MONAI sliding window, roi = patch size,
    overlap 0.5) and, with ``tta``, over the 8 mirrorings of the spatial axes (each output mirrored back), as
    nnU-Net's test-time augmentation."""
    from train.device import amp_context
    from train.validation import sliding_window_logits

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    mirrors = MIRRORS if tta else ((),)
    acc = None
    for m, cfg in zip(run.models, run.configs):
        autocast, _, _ = amp_context(cfg, torch.device(device))
        for dims in mirrors:
            logits = sliding_window_logits(m, torch.flip(x, dims) if dims else x, cfg, autocast)
            p = torch.sigmoid(logits)[0]
            p = torch.flip(p, [d - 1 for d in dims]) if dims else p
            acc = p if acc is None else acc.add_(p)
    return (acc / (len(run.models) * len(mirrors))).cpu().numpy()


