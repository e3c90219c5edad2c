"""The one registry of architectures and training recipes: a ``--model`` name becomes a MONAI network and its
keyword arguments, written into every checkpoint (``record``) so that evaluate, predict and ensembles rebuild
any model from the checkpoint alone (``build_from_record``). Nothing else spells architecture names.

``--channels`` sizes every model: the feature channels per level for ``unet`` and ``dynunet`` (the count is the
depth), the first level's for ``segresnet`` (each further value is one more level, channels doubling) and the
feature size of ``swinunetr`` (one value, a multiple of 12).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads inside the functions: the CLI's --help reads this registry without it
    import torch


@dataclass(frozen=True)
class ModelSpec:
    cls: str  # dotted path of the MONAI network
    default_channels: tuple[int, ...]
    patch_multiple_of: object  # channels -> the multiple every patch side must be
    min_patch: object = None  # channels -> the smallest patch side it trains on (None: the multiple)
    deep_supervision: bool = False
    # the recipe it is usually trained with (loss, optimizer, schedule, lr, deep supervision)
    recommended: dict = field(default_factory=dict)
    note: str = ""


def _levels(channels) -> int:
    return 2 ** (len(channels) - 1)


MODELS: dict[str, ModelSpec] = {
    "unet": ModelSpec("monai.networks.nets.UNet", (16, 32, 64, 128, 256), _levels,
                      recommended={"loss": "dice", "optimizer": "adamw", "schedule": "cosine-restarts"},
                      note="the seed's residual UNet"),
    "segresnet": ModelSpec("monai.networks.nets.SegResNet", (16, 32, 64, 128), _levels,
                           recommended={"loss": "dice", "optimizer": "adamw", "schedule": "cosine"},
                           note="MONAI's BraTS tutorial network"),
    "dynunet": ModelSpec("monai.networks.nets.DynUNet", (32, 64, 128, 256, 320), _levels, deep_supervision=True,
                         recommended={"loss": "dicece", "optimizer": "sgd", "schedule": "poly", "lr": 1e-2,
                                      "deep_supervision": True},
                         note="nnU-Net's U-Net as NVIDIA's BraTS 2021 entry trains it"),
    "swinunetr": ModelSpec("monai.networks.nets.SwinUNETR", (24,), lambda c: 32, min_patch=lambda c: 64,
                           recommended={"loss": "dicece", "optimizer": "adamw", "schedule": "cosine"},
                           note="Swin transformer encoder, CNN decoder"),
}
LOSSES = ("dice", "dicece", "dicefocal")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine-restarts", "poly", "cosine")


def check(cfg) -> str | None:
    """The first reason the model cannot be built or trained as configured, naming the flag and the fix."""
    spec = MODELS.get(cfg.model)
    if spec is None:
        return f"--model must be one of {', '.join(MODELS)}, not {cfg.model!r}"
    ch = tuple(cfg.channels)
    if cfg.deep_supervision and not spec.deep_supervision:
        return f"--deep-supervision: {cfg.model} has no deep supervision outputs (use --model dynunet)"
    if cfg.model == "swinunetr" and (len(ch) != 1 or ch[0] % 12):
        return f"--channels for swinunetr is one feature size, a multiple of 12 (e.g. 24), not {' '.join(map(str, ch))}"
    if cfg.model == "segresnet" and any(b != 2 * a for a, b in zip(ch, ch[1:])):
        return "--channels for segresnet double at each level (e.g. 16 32 64 128): the first is its init_filters"
    if cfg.model == "unet" and len(ch) < 2:
        return "--channels for unet needs at least two levels (e.g. 16 32 64 128 256)"
    step = spec.patch_multiple_of(ch)
    smallest = spec.min_patch(ch) if spec.min_patch else step
    if any(p % step or p < smallest for p in cfg.patch_size):
        return (f"--patch-size {' '.join(map(str, cfg.patch_size))}: {cfg.model} with these --channels needs every "
                f"side a multiple of {step}" + (f" and at least {smallest}" if smallest > step else "")
                + f" (e.g. --patch-size {max(smallest, step * 4)} {max(smallest, step * 4)} {max(smallest, step * 4)})")
    return None


def record(cfg) -> dict:
    """{"name", "class", "kwargs"}: everything needed to rebuild the network, as checkpoints store it."""
    ch = [int(c) for c in cfg.channels]
    n = len(ch)
    i, o = len(cfg.modalities), len(cfg.regions)
    if cfg.model == "unet":
        kw = {"spatial_dims": 3, "in_channels": i, "out_channels": o, "channels": ch, "strides": [2] * (n - 1),
              "dropout": cfg.dropout, "num_res_units": cfg.num_res_units, "norm": "batch"}
    elif cfg.model == "segresnet":
        kw = {"spatial_dims": 3, "init_filters": ch[0], "in_channels": i, "out_channels": o,
              "dropout_prob": cfg.dropout or None, "blocks_down": [1, 2, 2, 4, 4, 4][:n], "blocks_up": [1] * (n - 1)}
    elif cfg.model == "dynunet":
        kw = {"spatial_dims": 3, "in_channels": i, "out_channels": o, "kernel_size": [3] * n,
              "strides": [1] + [2] * (n - 1), "upsample_kernel_size": [2] * (n - 1), "filters": ch,
              "norm_name": "instance", "deep_supervision": bool(cfg.deep_supervision),
              "deep_supr_num": max(1, n - 2)}
    else:  # swinunetr
        kw = {"in_channels": i, "out_channels": o, "feature_size": ch[0], "spatial_dims": 3}
    return {"name": cfg.model, "class": MODELS[cfg.model].cls, "kwargs": kw}


def build_from_record(rec: dict) -> torch.nn.Module:
    module, _, name = rec["class"].rpartition(".")
    if rec.get("name") not in MODELS or rec["class"] != MODELS[rec["name"]].cls:
        raise ValueError(f"unknown architecture {rec.get('name')!r} ({rec.get('class')!r}) in the checkpoint")
    return getattr(importlib.import_module(module), name)(**rec["kwargs"])


def build(cfg) -> torch.nn.Module:
    return build_from_record(record(cfg))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ recipes


def make_loss(cfg):
    """The loss on sigmoid outputs per region (background channel included, smoothing 1e-5, as the seed), over
    the deep supervision outputs too when the model gives them (weights halving per level, as nnU-Net)."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss, DiceLoss

    kw = {"sigmoid": True, "include_background": True, "smooth_nr": 1e-5, "smooth_dr": 1e-5}
    base = {"dice": DiceLoss, "dicece": DiceCELoss, "dicefocal": DiceFocalLoss}[cfg.loss](**kw)
    if not cfg.deep_supervision:
        return base
    import torch

    deep = DeepSupervisionLoss(base, weight_mode="exp")  # weights 1, 1/2, 1/4, ...

    def loss(logits, target):  # training: (B, 1 + levels, R, X, Y, Z); evaluation: (B, R, X, Y, Z)
        return deep(list(torch.unbind(logits, 1)) if logits.ndim == target.ndim + 1 else logits, target)

    return loss


def make_optimizer(cfg, params):
    import torch
    if cfg.optimizer == "sgd":  # nnU-Net's: Nesterov, momentum 0.99
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg, opt, progress=None):
    """Stepped once per epoch: the seed's cosine warm restarts, nnU-Net's poly (lr x (1 - t)^0.9), or one cosine
    (eta_min + (lr - eta_min)(1 + cos(pi t)) / 2), where t = epoch / epochs, or, for a run with --time-limit, the
    share of the limit that will have passed at the end of the coming epoch when that is further along
    (``progress()``): a time-limited run's last epoch is its schedule's end."""
    import math

    import torch

    if cfg.schedule == "cosine-restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cfg.t0, eta_min=cfg.eta_min)

    def t(epoch: int) -> float:
        return min(1.0, max(epoch / cfg.epochs, progress() if progress else 0.0))

    if cfg.schedule == "poly":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: (1 - t(e)) ** 0.9)
    floor = cfg.eta_min / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: floor + (1 - floor) * (1 + math.cos(math.pi * t(e))) / 2)
