"""The trainer: one model trained into a run folder by the seed's recipe (MONAI UNet, DiceLoss, AdamW, cosine warm
restarts per epoch, early stopping on validation loss) or the one its config names, with mixed precision,
augmentation on the device, resumable checkpoints, TensorBoard and DistributedDataParallel (``Trainer``). Its
pieces live beside it: input checks (checks.py), checkpoint files (checkpoints.py), device and precision
(device.py), validation (validation.py), run folders (runs.py)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import snapshots
from .checkpoints import load_checkpoint, save_atomic, sweep_temporary
from .checks import check_cache_memory, check_gpu_ranks, check_inputs
from .config import TrainConfig
from .device import amp_context, resolve_device
from .distributed import Dist
from .errors import ConfigError
from .models import record as model_record
from .plan import invocation, make_plan
from .runfolder import BEST, CONFIG, INVOCATION, LAST, METRICS, PLAN, PREPROCESSING, write_json
from .validation import label_to_regions, validate

# ------------------------------------------------------------------------------------------------ pieces


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


def steps_per_epoch(cfg: TrainConfig, n_train: int, world: int) -> int:
    """Optimizer steps per epoch, the same on every rank: ``--steps-per-epoch``, else enough for each training
    case to be seen about once per epoch over all ranks."""
    return cfg.steps_per_epoch or max(1, math.ceil(n_train / (world * cfg.batch_size)))


# ------------------------------------------------------------------------------------------------ training


def train_step(model, opt, loss_fn, autocast, scaler, img: torch.Tensor, target: torch.Tensor) -> float:
    """One optimizer step on a batch ``img`` (B, C, X, Y, Z) against the float regions ``target`` (B, R, X, Y, Z);
    returns the loss (reading it waits for the device, so step timings are honest)."""
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


class Trainer:
    """One model trained into ``run_dir``; ``fit`` reads as the recipe:

    setup -> for each epoch: train_epoch -> (validate) -> log -> save_checkpoint -> early stopping.

    Distributed concerns live in ``Dist`` (train/distributed.py): every rank runs ``steps`` optimizer steps
    per epoch and one validation reduction, and only the writer (rank 0) touches the run folder."""

    def __init__(self, cfg: TrainConfig, train_ids: list[str], val_ids: list[str], run_dir: Path,
                 dist: Dist | None = None, progress: bool = True, store=None):
        self.cfg, self.train_ids, self.val_ids, self.run_dir = cfg, list(train_ids), list(val_ids), Path(run_dir)
        self.store = store  # the opened store (store.open_store), or None: opened in setup
        self.dist = dist or Dist()
        self.progress = progress and self.dist.is_writer
        self.history: list[dict] = []
        self.start_epoch = 0
        self.summary = {"best_val_loss": math.inf, "best_epoch": None, "best_dice": None}
        self.wall_before = 0.0  # a resumed run's wall seconds before this process
        # with --time-limit: the share of it that will have passed at the end of the coming epoch (rank 0's clock),
        # which a poly or cosine schedule follows, and the seconds a validation takes (measured before the first)
        self.time_share = 0.0
        self.val_seconds = 0.0
        self.clock = time.perf_counter  # seconds; the wall time, the time limit and validations are timed by it

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        from store import open_store

        cfg, dist = self.cfg, self.dist
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            check_gpu_ranks(cfg, dist, torch.cuda.device_count())
            if dist.enabled:
                self.device = torch.device("cuda", dist.local_rank)
                torch.cuda.set_device(self.device)
        if self.store is None:
            self.store = open_store(cfg.store)
        check_inputs(cfg, self.store, self.train_ids, self.val_ids)
        state = self._read_resume_state()
        self._prepare_run_dir(state)
        self._build_model()
        if state is not None:
            self._restore(state)
        self._build_loader()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tb")) if dist.is_writer else None
        if self.progress:
            print(f"training {len(self.train_ids)} cases ({dist.world} process(es), {self.steps} steps of "
                  f"{cfg.batch_size} per epoch on each), validating {len(self.val_ids)}; "
                  f"{'+'.join(cfg.modalities)} -> {', '.join(cfg.regions)}; {self.device}, {self.amp_desc}, "
                  f"cache {cfg.cache}; run folder {self.run_dir}")

    def _read_resume_state(self) -> dict | None:
        last = self.run_dir / LAST
        if not (self.cfg.resume and last.exists()):
            return None
        state = load_checkpoint(last)
        diff = self.cfg.differences(TrainConfig.from_dict(state["config"]))
        if diff:
            raise ConfigError("--resume into a run made with another config: " + ", ".join(
                f"{k} was {b!r}, now {a!r}" for k, (a, b) in sorted(diff.items())))
        return state

    def _prepare_run_dir(self, state: dict | None) -> None:
        """The writer makes the folder and records the config; a used folder was refused or moved aside before
        (``prepare_run_folder``), so nothing is deleted here but a killed save's temporary files."""
        if not self.dist.is_writer:
            return
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        sweep_temporary(run_dir)
        self.cfg.save(run_dir / CONFIG)
        write_json(run_dir / PLAN, make_plan(self.cfg, self.store.label_convention,
                                             self.store.params.get("spacing_mm", ())))
        write_json(run_dir / INVOCATION, invocation(self.cfg))
        # how the inputs were made, so `evaluate predict` preprocesses a new case the same way
        prep = {"params": self.store.params, "label_convention": self.store.label_convention}
        (run_dir / PREPROCESSING).write_text(json.dumps(prep, indent=2) + "\n")

    def _build_model(self) -> None:
        from .augment import make_augment
        from .models import build, make_loss, make_optimizer, make_schedule

        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)
        self.core = build(cfg).to(self.device)
        self.model = self.core
        if dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.core, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss_fn = make_loss(cfg)
        self.opt = make_optimizer(cfg, self.model.parameters())
        self.sched = make_schedule(cfg, self.opt, progress=lambda: self.time_share)
        self.autocast, self.scaler, self.amp_desc = amp_context(cfg, self.device)
        self.stopper = EarlyStopping(cfg.patience, cfg.min_delta)
        self.augment = make_augment(cfg.augmentation, cfg.patch_size, cfg.seed * 1000 + dist.rank)

    def _restore(self, state: dict) -> None:
        self.core.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(state["early_stopping"])
        _set_rng_state(state["rng"], self.augment)
        self.start_epoch = int(state["epoch"]) + 1
        self.history = json.loads(state["history"])
        for h in self.history:
            if h.get("is_best"):
                self.summary.update(best_val_loss=h["val_loss"], best_epoch=h["epoch"], best_dice=h["dice"])

    def _build_loader(self) -> None:
        from .distributed import available_memory_bytes, resident_bytes
        from .loader import TrainLoader

        cfg, dist = self.cfg, self.dist
        # every rank reports what it sees before any rank caches, so all take the same decision
        seen = [0.0] * dist.world
        seen[dist.rank] = float(available_memory_bytes() or 0)
        seen = dist.sum(seen, "the memory check")
        node_seen = [seen[r] for r in dist.node_ranks if seen[r] > 0]
        check_cache_memory(cfg, self.store, self.train_ids, dist, int(min(node_seen)) if node_seen else None)
        self.steps = steps_per_epoch(cfg, len(self.train_ids), dist.world)
        import monai.data  # noqa: F401 (loaded before the baseline: the cache's memory is what is measured)

        # one small read before the baseline, so the libraries a first read loads (codecs, zarr's I/O thread) are
        # counted in the process's own baseline, not in what the cache adds
        self.store.case(self.train_ids[0]).image(self.cfg.modalities[:1], region=(slice(0, 1),) * 3)
        rss = resident_bytes()
        self.loader = TrainLoader(cfg.store, dist.shard(self.train_ids), cfg.modalities,
                                  self.augment.read_size(cfg.patch_size),
                                  cfg.batch_size, cfg.cache, cfg.cache_rate, cfg.workers, self.device,
                                  seed=cfg.seed * 1000 + dist.rank, fg_fraction=cfg.fg_fraction,
                                  progress=self.progress, steps=self.steps, store=self.store)
        cached = getattr(self.loader.source, "nbytes", lambda: 0)()
        nodes = max(1, dist.world // dist.local_world)
        total = dist.sum([cached, max(resident_bytes() - rss, 0)], "the cache report")
        self.cache_report = {"cache_bytes_per_node": total[0] / nodes, "cache_rss_added_per_node": total[1] / nodes}

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to ``cfg.epochs``, early stopping or ``cfg.time_limit``; returns the best validation loss, Dice
        and epoch."""
        self.t_start = self.clock()  # wall time counts the set-up (cache fill) too
        self.setup()
        # a resumed run's clock goes on from where it stopped
        self.wall_before = float(self.history[-1].get("wall_s", 0.0)) if self.history else 0.0
        try:
            if self.cfg.time_limit is not None or self.cfg.snapshot_at:
                self.val_seconds = self._validation_seconds()
            for epoch in range(self.start_epoch, self.cfg.epochs):
                t_epoch = self.clock()
                record = self.train_epoch(epoch)
                out_of_time, snaps = self._look_ahead(self.clock() - t_epoch, epoch)
                # once per epoch, no loss argument (the cosine schedule takes epochs), after the time-limit decision:
                # a time-limited schedule follows the share of the limit at the end of the coming epoch
                self.sched.step()
                if (epoch + 1) % self.cfg.val_every == 0 or epoch + 1 == self.cfg.epochs or out_of_time or snaps:
                    t_val = self.clock()
                    record.update(self.validate(epoch))
                    self.val_seconds = record["val_s"] = self.clock() - t_val
                if out_of_time or self.stopper.should_stop or epoch + 1 == self.cfg.epochs:
                    snaps = self._pending_snapshots()  # the run ends: every snapshot still due is this state
                record["wall_s"] = self.wall_seconds()
                if snaps:
                    record["snapshots"] = snaps
                self.history.append(record)
                self.log(record)
                self.save_checkpoint(epoch)
                for minutes in snaps if self.dist.is_writer else ():
                    snapshots.take(self.run_dir, minutes, epoch, record["wall_s"])
                if out_of_time:
                    self.summary["stopped"] = f"time limit of {self.cfg.time_limit:g} min"
                    if self.progress:
                        print(f"time limit: the next epoch would pass {self.cfg.time_limit:g} min "
                              f"({record['wall_s']:.0f} s so far); stopped after epoch {epoch + 1}")
                    break
                if self.stopper.should_stop:
                    if self.progress:
                        print(f"early stopping: no better validation loss for {self.cfg.patience} validations")
                    break
        finally:
            self.loader.close()
            if self.writer:
                self.writer.close()
        self.summary["wall_s"] = self.wall_seconds()
        return self.summary

    def wall_seconds(self) -> float:
        """Seconds since training started (set-up included), across resumes."""
        return self.wall_before + self.clock() - self.t_start

    def _validation_ids(self) -> list[str]:
        """The cases a validation scores: the validation split, the first ``--max-val-cases`` of it when given."""
        return self.val_ids[: self.cfg.max_val_cases] if self.cfg.max_val_cases else self.val_ids

    def _validation_seconds(self) -> float:
        """What a validation costs, for the time-limit decision before the first one: the last recorded one of a
        resumed run, else one validation case timed here and scaled to this rank's share of the cases."""
        recorded = [r["val_s"] for r in self.history if "val_s" in r]
        if recorded:
            return float(recorded[-1])
        ids = self._validation_ids()
        t0 = self.clock()
        validate(self.core, self.store, ids[:1], self.cfg, self.device, self.autocast, self.loss_fn, self.dist)
        return (self.clock() - t0) * math.ceil(len(ids) / self.dist.world)

    def _pending_snapshots(self) -> list[float]:
        taken = {m for r in self.history for m in r.get("snapshots", ())}
        return [m for m in self.cfg.snapshot_at if m not in taken]

    def _look_ahead(self, train_seconds: float, epoch: int) -> tuple[bool, list[float]]:
        """Where going on would end: this epoch's validation where one is due, then another epoch like this one and
        its validation (any epoch may be the last, which validates). Returns whether that passes ``--time-limit``
        and the ``--snapshot-at`` minutes it passes (this epoch is the last before them, and validates); sets
        ``time_share`` to the share of the limit at the end of that next epoch. The same answer on every rank
        (rank 0's clock decides)."""
        pending = self._pending_snapshots()
        if (self.cfg.time_limit is None and not pending) or epoch + 1 >= self.cfg.epochs:
            return False, []
        validates_now = (epoch + 1) % self.cfg.val_every == 0
        end_of_next = self.wall_seconds() + (self.val_seconds if validates_now else 0.0) + train_seconds \
            + self.val_seconds
        (end_of_next,) = self.dist.sum([end_of_next if self.dist.rank == 0 else 0.0], "the time-limit decision")
        snaps = snapshots.due(pending, end_of_next)
        if snaps and not validates_now:  # the snapshot's validation comes now
            end_of_next += self.val_seconds
        if self.cfg.time_limit is None:
            return False, snaps
        limit = 60 * self.cfg.time_limit
        self.time_share = min(1.0, end_of_next / limit)
        return end_of_next > limit, snaps

    def train_epoch(self, epoch: int) -> dict:
        """``steps`` optimizer steps; the epoch's mean loss over every rank, throughput and data-wait share."""
        from store.progress import progress_bar

        cfg, dist = self.cfg, self.dist
        self.model.train()
        t_epoch = time.perf_counter()
        wait = compute = 0.0
        losses = []
        # in a log, no bar: the epoch's own line (printed after it) carries its figures
        bar = progress_bar(self.steps, f"epoch {epoch + 1}/{cfg.epochs}", "step", enabled=self.progress, lines=False,
                           leave=False)
        it = self.loader.epoch(epoch)
        global_step = epoch * self.steps
        for step in range(self.steps):
            dist.position = f"epoch {epoch + 1}, step {step + 1}/{self.steps}"
            t0 = time.perf_counter()
            img, lab = next(it)
            t1 = time.perf_counter()
            # float16 in, float32 out; the loader's batch is ours until we drop it (its pool reuses it only then)
            img, lab = self.augment.step(img, lab)
            lv = train_step(self.model, self.opt, self.loss_fn, self.autocast, self.scaler, img,
                            label_to_regions(lab, self.store.label_convention, cfg.regions))
            t2 = time.perf_counter()
            wait += t1 - t0
            compute += t2 - t1
            losses.append(lv)
            if self.writer:
                self.writer.add_scalar("train/batch_loss", lv, global_step + step)
            bar.update()
            bar.set_postfix(loss=f"{lv:.4f}", samples_s=f"{len(losses) * cfg.batch_size / (t2 - t_epoch):.2f}")
        bar.close()
        it.close()
        lr = self.opt.param_groups[0]["lr"]
        dist.position = f"epoch {epoch + 1}, end"
        total_loss, = dist.sum([sum(losses)], "the epoch's loss reduction")
        busy = max(wait + compute, 1e-9)
        return {"epoch": epoch, "train_loss": total_loss / (len(losses) * dist.world), "lr": lr,
                "seconds": time.perf_counter() - t_epoch, "steps": self.steps, "ranks": dist.world,
                "samples_per_s": len(losses) * cfg.batch_size * dist.world / busy, "data_wait_share": wait / busy,
                **self.cache_report}

    def validate(self, epoch: int) -> dict:
        """Validation on every rank (each its share of the cases), early stopping on the reduced figures."""
        cfg = self.cfg
        ids = self._validation_ids()
        v = validate(self.core, self.store, ids, cfg, self.device, self.autocast, self.loss_fn, self.dist)
        example = v.pop("_example")
        is_best = self.stopper.step(v["val_loss"])
        if is_best:
            self.summary.update(best_val_loss=v["val_loss"], best_epoch=epoch, best_dice=v["dice"])
            if self.dist.is_writer:
                save_atomic({"model": self.core.state_dict(), "config": cfg.to_dict(), "epoch": epoch,
                             "architecture": model_record(cfg), "val_loss": v["val_loss"], "dice": v["dice"]},
                            self.run_dir / BEST)
        if self.writer and example is not None:
            img0, tgt0, pred0 = example
            self.writer.add_image("val/input", _middle(img0[0]), epoch, dataformats="HW")
            self.writer.add_image("val/label_WT", _middle(tgt0[1]), epoch, dataformats="HW")
            self.writer.add_image("val/prediction_WT", _middle(pred0[1]), epoch, dataformats="HW")
        return {**v, "is_best": is_best}

    # ------------------------------------------------------------------------------------------ outputs

    def log(self, record: dict) -> None:
        """metrics.jsonl, TensorBoard and one line on the console; the writer rank only."""
        if not self.dist.is_writer:
            return
        epoch = record["epoch"]
        if self.writer:
            for key in ("train_loss", "lr", "samples_per_s", "data_wait_share"):
                self.writer.add_scalar(f"train/{'epoch_loss' if key == 'train_loss' else key}", record[key], epoch)
            if "val_loss" in record:
                self.writer.add_scalar("val/loss", record["val_loss"], epoch)
                self.writer.add_scalar("val/dice_mean", record["dice_mean"], epoch)
                # the same against wall seconds since the start of training, to compare runs at equal time
                self.writer.add_scalar("val_by_second/dice_mean", record["dice_mean"], round(record["wall_s"]))
                for r, d in record["dice"].items():
                    self.writer.add_scalar(f"val/dice_{r}", d, epoch)
            self.writer.flush()
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.progress:
            msg = f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, {record['samples_per_s']:.2f} " \
                  f"samples/s, data wait {100 * record['data_wait_share']:.0f}%"
            if "val_loss" in record:
                msg += f"; val loss {record['val_loss']:.4f}, Dice " + ", ".join(
                    f"{r} {d:.3f}" for r, d in record["dice"].items()) + ("  (best)" if record["is_best"] else "")
            print(msg)

    def save_checkpoint(self, epoch: int) -> None:
        """last.pt: everything --resume needs to continue exactly; the writer rank only."""
        if not self.dist.is_writer:
            return
        save_atomic({
            "model": self.core.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "epoch": epoch,
            "early_stopping": self.stopper.state_dict(), "rng": _rng_state(self.augment),
            "config": self.cfg.to_dict(), "architecture": model_record(self.cfg), "history": json.dumps(self.history),
        }, self.run_dir / LAST)


def train_run(cfg: TrainConfig, train_ids: list[str], val_ids: list[str], run_dir: Path,
              progress: bool = True, dist: Dist | None = None, store=None) -> dict:
    """Train one model into ``run_dir``; returns its summary (best validation loss, Dice, epoch). ``store``: the
    store already opened (every fold of a k-fold run trains from the one opened store)."""
    return Trainer(cfg, train_ids, val_ids, run_dir, dist, progress, store).fit()
