"""Validation of a model on whole cases: MONAI's sliding window over each case, the loss and Dice per region,
reduced over every rank."""

from __future__ import annotations

import numpy as np
import torch

from store.conventions import REGIONS, region_masks

from .config import TrainConfig
from .distributed import Dist


def label_to_regions(label: torch.Tensor, convention: str, regions=REGIONS) -> torch.Tensor:
    """uint8 label (B, 1, X, Y, Z) -> float regions (B, R, X, Y, Z), by store.conventions' one rule."""
    return region_masks(label, convention, regions).float()


def sliding_window_logits(model, image: torch.Tensor, cfg: TrainConfig, autocast) -> torch.Tensor:
    """Logits (B, R, X, Y, Z) of a whole image by MONAI's sliding window: roi = patch size, the overlap and
    blending of the run's plan (``cfg.overlap``, ``cfg.blending``)."""
    from monai.inferers import sliding_window_inference

    with torch.no_grad(), autocast():
        out = sliding_window_inference(image, roi_size=cfg.patch_size, sw_batch_size=cfg.sw_batch_size,
                                       predictor=model, overlap=cfg.overlap, mode=cfg.blending)
    return out.float()


def validate(model, store, case_ids: list[str], cfg: TrainConfig, device, autocast, loss_fn,
             dist: Dist | None = None) -> dict:
    """Validation loss and Dice per region (TC, WT, ET; sigmoid above the plan's threshold), means over
    ``case_ids``.

    With several ranks each scores its share of the cases and the sums are reduced, so every rank returns the
    same figures, those one process would compute (MONAI's compute_dice per case, as DiceMetric defines it).
    ``_example`` is (image, target, prediction) of this rank's first case, or None."""
    from monai.metrics import compute_dice

    dist = dist or Dist()
    model.eval()
    names = tuple(cfg.regions)
    n = len(names)
    sums = np.zeros(2 + 2 * n)  # loss sum, case count, Dice sums, Dice counts (NaN-free cases)
    first = None
    for cid in dist.share(case_ids):
        case = store.case(cid)
        img = torch.from_numpy(case.image(cfg.modalities))[None].to(device)
        target = label_to_regions(torch.from_numpy(case.label())[None, None].to(device), store.label_convention,
                                  names)
        logits = sliding_window_logits(model, img, cfg, autocast)
        pred = (torch.sigmoid(logits) > cfg.threshold).float()
        d = compute_dice(pred, target, include_background=True, ignore_empty=False)[0].cpu().numpy()
        sums[0] += float(loss_fn(logits, target))
        sums[1] += 1
        sums[2:2 + n] += np.nan_to_num(d)
        sums[2 + n:] += ~np.isnan(d)
        if first is None:
            first = (img[0].cpu(), target[0].cpu(), pred[0].cpu())
    dist.position = dist.position.split(",")[0] + ", validation"
    total = np.asarray(dist.sum(sums, "the validation reduction", device=None))
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = total[2:2 + n] / total[2 + n:]
    out = {"val_loss": float(total[0] / total[1]), "dice": {r: float(v) for r, v in zip(names, dice)},
           "dice_mean": float(np.nanmean(dice)), "val_cases": int(total[1]), "_example": first}
    return out
