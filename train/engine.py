"""Training: the seed's recipe (MONAI UNet, DiceLoss, AdamW, cosine warm restarts per epoch, early stopping
on validation loss) with mixed precision, device augmentation, atomic resumable checkpoints, TensorBoard,
k-fold and DistributedDataParallel."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from store.conventions import LABEL_CONVENTIONS, REGIONS

from .config import TrainConfig


class ConfigError(ValueError):
    """Bad input found before any work starts."""


# ------------------------------------------------------------------------------------------------ pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=len(cfg.modalities), out_channels=len(REGIONS),
                channels=tuple(cfg.channels), strides=(2,) * (len(cfg.channels) - 1), dropout=cfg.dropout,
                num_res_units=cfg.num_res_units, norm="batch")


def label_to_regions(label: torch.Tensor, convention: str) -> torch.Tensor:
    """uint8 label (B, 1, X, Y, Z) -> float regions (B, 3, X, Y, Z) in the order TC, WT, ET."""
    conv = LABEL_CONVENTIONS[convention]
    et = label == conv["enhancing"]
    tc = (label == conv["necrosis"]) | et
    wt = tc | (label == conv["edema"])
    return torch.cat([tc, wt, et], dim=1).float()


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated
    and several times slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_context(cfg: TrainConfig, device: torch.device):
    """(autocast context factory, GradScaler or None, description)."""
    if not cfg.amp:
        return contextlib.nullcontext, None, "float32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None, "bf16 autocast (CUDA)"
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda"), \
            "fp16 autocast + GradScaler (CUDA)"
    if cpu_has_bf16():
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None, "bf16 autocast (CPU)"
    return contextlib.nullcontext, None, "float32: --amp asked for, but this CPU has no native bf16"


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a checkpoint is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


class EarlyStopping:
    """Stop when the validation loss has not improved by more than ``min_delta`` for ``patience`` validations."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad = 0

    def step(self, loss: float) -> bool:
        """Record a validation loss; True when it is a new best."""
        if loss < self.best - self.min_delta or self.best == math.inf:
            self.best, self.bad = loss, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad, "patience": self.patience}

    def load_state_dict(self, s: dict) -> None:
        self.best, self.bad = float(s["best"]), int(s["bad"])


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------ validation


def sliding_window_logits(model, image: torch.Tensor, cfg: TrainConfig, autocast) -> torch.Tensor:
    """Logits (B, 3, X, Y, Z) of a whole image by MONAI's sliding window (roi = patch size, overlap 0.5)."""
    from monai.inferers import sliding_window_inference

    with torch.no_grad(), autocast():
        out = sliding_window_inference(image, roi_size=cfg.patch_size, sw_batch_size=cfg.sw_batch_size,
                                       predictor=model, overlap=0.5)
    return out.float()


def validate(model, store, case_ids: list[str], cfg: TrainConfig, device, autocast, loss_fn) -> dict:
    """Validation loss and Dice per region (TC, WT, ET; sigmoid > 0.5), mean over cases.

    MONAI's compute_dice per case (DiceMetric's definition) averaged here: DiceMetric's buffers all-gather
    across ranks when torch.distributed is up, and only rank 0 validates."""
    from monai.metrics import compute_dice

    model.eval()
    dices = []
    losses = []
    first = None
    for cid in case_ids:
        case = store.case(cid)
        img = torch.from_numpy(case.image(cfg.modalities))[None].to(device)
        target = label_to_regions(torch.from_numpy(case.label())[None, None].to(device), store.label_convention)
        logits = sliding_window_logits(model, img, cfg, autocast)
        losses.append(float(loss_fn(logits, target)))
        pred = (torch.sigmoid(logits) > 0.5).float()
        dices.append(compute_dice(pred, target, include_background=True, ignore_empty=False)[0].cpu().numpy())
        if first is None:
            first = (img[0].cpu(), target[0].cpu(), pred[0].cpu())
    dice = np.nanmean(np.stack(dices), axis=0)
    out = {"val_loss": float(np.mean(losses)), "dice": {r: float(d) for r, d in zip(REGIONS, dice)}}
    out["dice_mean"] = float(np.mean(dice))
    out["_example"] = first
    return out


# ------------------------------------------------------------------------------------------------ training


def train_step(model, opt, loss_fn, autocast, scaler, img: torch.Tensor, target: torch.Tensor) -> float:
    """One optimizer step; returns the loss (reading it waits for the device, so step timings are honest)."""
    opt.zero_grad(set_to_none=True)
    with autocast():
        logits = model(img)
    loss = loss_fn(logits.float(), target)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return float(loss.detach())


def _rng_state(augment) -> dict:
    s = {"torch": torch.get_rng_state(), "augment": augment.generator.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict, augment) -> None:
    torch.set_rng_state(s["torch"])
    augment.generator.set_state(s["augment"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _middle(volume: torch.Tensor) -> np.ndarray:
    """Middle axial slice (X, Y) of a (X, Y, Z) volume scaled to [0, 1] for TensorBoard."""
    v = volume[:, :, volume.shape[2] // 2].float().numpy()
    lo, hi = float(v.min()), float(v.max())
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def check_inputs(cfg: TrainConfig, store, train_ids: list[str], val_ids: list[str]) -> None:
    """Every bad input named by the CLI contract, before any work starts."""
    from .loader import CACHE_MODES, modality_error

    if err := modality_error(store, cfg.modalities):
        raise ConfigError(err)
    if not train_ids:
        raise ConfigError("no training cases in this split")
    if not val_ids:
        raise ConfigError("no validation cases in this split (the store's 'val' is empty); use --fold K")
    unlabelled = [c for c in train_ids + val_ids if not store.case(c).has_label]
    if unlabelled:
        raise ConfigError(f"the store holds no labels for {len(unlabelled)} training/validation cases "
                          f"(e.g. {unlabelled[0]}); training needs labels")
    shapes = [store.case(c).shape for c in train_ids]
    if not any(all(s >= p for s, p in zip(shape, cfg.patch_size)) for shape in shapes):
        largest = max(shapes, key=lambda s: np.prod(s))
        raise ConfigError(f"--patch-size {' '.join(map(str, cfg.patch_size))} is larger than every training case "
                          f"(largest {'x'.join(map(str, largest))}); choose a smaller patch")
    if cfg.cache not in CACHE_MODES:
        raise ConfigError(f"--cache must be ram, none or gpu, not {cfg.cache!r}")
    if any(p % (2 ** (len(cfg.channels) - 1)) for p in cfg.patch_size):
        raise ConfigError(f"--patch-size must be divisible by {2 ** (len(cfg.channels) - 1)} for this UNet")


def train_run(cfg: TrainConfig, train_ids: list[str], val_ids: list[str], run_dir: Path,
              progress: bool = True) -> dict:
    """Train one model into ``run_dir``; returns its summary (best validation loss, Dice, epoch)."""
    from monai.losses import DiceLoss
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from store import open_store

    from .augment import BatchAugment
    from .loader import TrainLoader

    rank, world = _dist()
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    store = open_store(cfg.store)
    check_inputs(cfg, store, train_ids, val_ids)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    state = None
    if cfg.resume and last_path.exists():
        state = load_checkpoint(last_path)
        old = TrainConfig.from_dict(state["config"])
        diff = cfg.differences(old)
        if diff:
            raise ConfigError("--resume into a run made with another config: " + ", ".join(
                f"{k} was {b!r}, now {a!r}" for k, (a, b) in sorted(diff.items())))
    if rank == 0 and state is None and (last_path.exists() or (run_dir / "metrics.jsonl").exists()):
        # a fresh run into a used folder starts over; --resume continues instead
        import shutil

        for old in ("last.pt", "best.pt", "metrics.jsonl", "tb"):
            p = run_dir / old
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        if progress:
            print(f"{run_dir} held an earlier run: starting over (pass --resume to continue it)")
    if rank == 0:
        cfg.save(run_dir / "config.json")
        # how the inputs were made, so `evaluate predict` preprocesses a new case the same way
        prep = {"params": store.params, "label_convention": store.label_convention}
        (run_dir / "preprocessing.json").write_text(json.dumps(prep, indent=2) + "\n")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.module if world > 1 else model
    loss_fn = DiceLoss(sigmoid=True, include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cfg.t0, eta_min=cfg.eta_min)
    autocast, scaler, amp_desc = amp_context(cfg, device)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    augment = BatchAugment(seed=cfg.seed * 1000 + rank)
    start_epoch, history = 0, []
    if state is not None:
        core.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        stopper.load_state_dict(state["early_stopping"])
        _set_rng_state(state["rng"], augment)
        start_epoch = int(state["epoch"]) + 1
        history = json.loads(state["history"])
    my_ids = train_ids[rank::world]
    loader = TrainLoader(cfg.store, my_ids, cfg.modalities, cfg.patch_size, cfg.batch_size, cfg.cache,
                         cfg.cache_rate, cfg.workers, device, seed=cfg.seed * 1000 + rank,
                         fg_fraction=cfg.fg_fraction, progress=progress and rank == 0)
    writer = SummaryWriter(str(run_dir / "tb")) if rank == 0 else None
    if rank == 0 and progress:
        print(f"training {len(train_ids)} cases ({world} process(es)), validating {len(val_ids)}; "
              f"{'+'.join(cfg.modalities)} -> TC, WT, ET; {device}, {amp_desc}; run folder {run_dir}")
    val_ids_used = val_ids[: cfg.max_val_cases] if cfg.max_val_cases else val_ids
    global_step = start_epoch * len(loader)
    summary = {"best_val_loss": stopper.best, "best_epoch": None, "best_dice": None}
    for h in history:
        if h.get("is_best"):
            summary.update(best_val_loss=h["val_loss"], best_epoch=h["epoch"], best_dice=h["dice"])
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t_epoch = time.perf_counter()
        wait = compute = 0.0
        losses = []
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not progress or rank != 0, leave=False)
        it = loader.epoch(epoch)
        aug_out = None
        while True:
            t0 = time.perf_counter()
            try:
                img, lab = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            # float16 in, float32 out into one buffer reused every step; the loader's batch is ours until we
            # drop it (its pool reuses it only then): augmented in place, no copy
            aug_out = augment.buffer_for(img, aug_out)
            img, lab = augment(img, lab, inplace=True, out=aug_out)
            lv = train_step(model, opt, loss_fn, autocast, scaler, img,
                            label_to_regions(lab, store.label_convention))
            t2 = time.perf_counter()
            wait += t1 - t0
            compute += t2 - t1
            losses.append(lv)
            if writer:
                writer.add_scalar("train/batch_loss", lv, global_step)
            global_step += 1
            bar.update()
            bar.set_postfix(loss=f"{lv:.4f}", samples_s=f"{len(losses) * cfg.batch_size / (t2 - t_epoch):.2f}")
        bar.close()
        lr = opt.param_groups[0]["lr"]
        sched.step()  # once per epoch, no loss argument: the cosine schedule takes epochs
        epoch_loss = float(np.mean(losses)) if losses else float("nan")
        if world > 1:
            t = torch.tensor([epoch_loss], device=device)
            torch.distributed.all_reduce(t)
            epoch_loss = float(t) / world
        seconds = time.perf_counter() - t_epoch
        record = {"epoch": epoch, "train_loss": epoch_loss, "lr": lr, "seconds": seconds,
                  "samples_per_s": len(losses) * cfg.batch_size * world / max(wait + compute, 1e-9),
                  "data_wait_share": wait / max(wait + compute, 1e-9)}
        validate_now = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        stop = False
        if validate_now and rank == 0:
            v = validate(core, store, val_ids_used, cfg, device, autocast, loss_fn)
            example = v.pop("_example")
            is_best = stopper.step(v["val_loss"])
            record.update(v, is_best=is_best)
            if is_best:
                summary.update(best_val_loss=v["val_loss"], best_epoch=epoch, best_dice=v["dice"])
                save_atomic({"model": core.state_dict(), "config": cfg.to_dict(), "epoch": epoch,
                             "val_loss": v["val_loss"], "dice": v["dice"]}, best_path)
            stop = stopper.should_stop
            if writer:
                writer.add_scalar("val/loss", v["val_loss"], epoch)
                writer.add_scalar("val/dice_mean", v["dice_mean"], epoch)
                for r, d in v["dice"].items():
                    writer.add_scalar(f"val/dice_{r}", d, epoch)
                img0, tgt0, pred0 = example
                writer.add_image("val/input", _middle(img0[0]), epoch, dataformats="HW")
                writer.add_image("val/label_WT", _middle(tgt0[1]), epoch, dataformats="HW")
                writer.add_image("val/prediction_WT", _middle(pred0[1]), epoch, dataformats="HW")
        if world > 1:
            flag = [stop]
            torch.distributed.broadcast_object_list(flag, src=0)
            stop = bool(flag[0])
        if rank == 0:
            history.append(record)
            if writer:
                writer.add_scalar("train/epoch_loss", epoch_loss, epoch)
                writer.add_scalar("train/lr", lr, epoch)
                writer.add_scalar("train/samples_per_s", record["samples_per_s"], epoch)
                writer.add_scalar("train/data_wait_share", record["data_wait_share"], epoch)
                writer.flush()
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_atomic({
                "model": core.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "epoch": epoch,
                "early_stopping": stopper.state_dict(), "rng": _rng_state(augment), "config": cfg.to_dict(),
                "history": json.dumps(history),
            }, last_path)
            if progress:
                msg = f"epoch {epoch + 1}: train loss {epoch_loss:.4f}, {record['samples_per_s']:.2f} samples/s, " \
                      f"data wait {100 * record['data_wait_share']:.0f}%"
                if "val_loss" in record:
                    msg += f"; val loss {record['val_loss']:.4f}, Dice " + ", ".join(
                        f"{r} {d:.3f}" for r, d in record["dice"].items()) + ("  (best)" if record["is_best"] else "")
                print(msg)
        if stop:
            if rank == 0 and progress:
                print(f"early stopping: no better validation loss for {cfg.patience} validations")
            break
    if writer:
        writer.close()
    return summary
