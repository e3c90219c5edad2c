"""Training runs as the CLI describes them: flag checks, the store's splits, one run or k folds (library code
that the CLI, the benchmarks and the tests call alike)."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .runfolder import CONFIG, KFOLD, fold_name, write_json


def splits_for(store, fold: int | None) -> tuple[list[str], list[str]]:
    """The train and validation case ids of the store's split, or of its fold ``fold``."""
    sp = store.splits
    if fold is None:
        return sp["train"], sp["val"]
    if not 0 <= fold < len(sp["folds"]):
        raise ConfigError(f"--fold {fold}: the store has {len(sp['folds'])} folds")
    return sp["folds"][fold]["train"], sp["folds"][fold]["val"]


def check_flags(cfg) -> None:
    """Flags that make no sense whatever the store holds, refused before any work."""
    from store.conventions import REGIONS

    from .models import check as model_problem

    checks = [
        (cfg.epochs >= 1, f"--epochs must be at least 1, not {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, not {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be positive, not {cfg.lr:g}"),
        (cfg.steps_per_epoch is None or cfg.steps_per_epoch >= 1,
         f"--steps-per-epoch must be at least 1, not {cfg.steps_per_epoch}"),
        (cfg.dist_timeout > 0, f"--dist-timeout must be a positive number of seconds, not {cfg.dist_timeout:g}"),
        (len(set(cfg.modalities)) == len(cfg.modalities),
         f"--modalities names a modality twice: {' '.join(cfg.modalities)}"),
        (tuple(cfg.regions[:3]) == REGIONS and len(set(cfg.regions)) == len(cfg.regions),
         f"--regions must start with TC WT ET (the BraTS regions), then extras such as RC, not "
         f"{' '.join(cfg.regions)}"),
        (cfg.time_limit is None or cfg.time_limit > 0,
         f"--time-limit must be a positive number of minutes, not {cfg.time_limit:g}" if cfg.time_limit is not None
         else ""),
        (all(m > 0 for m in cfg.snapshot_at) and len(set(cfg.snapshot_at)) == len(cfg.snapshot_at),
         "--snapshot-at takes distinct positive numbers of minutes, not "
         + " ".join(f"{m:g}" for m in cfg.snapshot_at)),
        (cfg.augmentation != "seed" or cfg.patch_size[0] == cfg.patch_size[1],
         f"--augmentation seed rotates patches by 90 degrees in the plane of the first two axes, so they must be "
         f"square there: --patch-size {' '.join(map(str, cfg.patch_size))}"),
        (0 <= cfg.overlap < 1 and 0 < cfg.threshold < 1 and cfg.blending in ("constant", "gaussian"),
         f"the plan's inference needs an overlap in [0, 1), a threshold in (0, 1) and constant or gaussian blending, "
         f"not {cfg.overlap:g}, {cfg.threshold:g}, {cfg.blending}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if reason := model_problem(cfg):
        raise ConfigError(reason)


def prepare_run_folder(run_dir: Path, resume: bool, overwrite: bool, is_writer: bool = True) -> None:
    """A folder holding a run is continued (``--resume``), moved aside (``--overwrite``), or refused: a run is
    never overwritten."""
    from .runs import holds_run, move_aside

    if resume or not holds_run(run_dir):
        return
    if not overwrite:
        raise ConfigError(f"{run_dir} holds an earlier run: pass --resume to continue it, --overwrite to move it "
                          f"aside ({run_dir.name}.old-N) and start over, or choose another --run-dir")
    if is_writer:
        aside = move_aside(run_dir)
        print(f"{run_dir} held an earlier run: moved to {aside}")


def run(cfg, dist=None, plan: dict | None = None) -> dict:
    """Train as configured; returns the summary (one run) or the k-fold report (written by rank 0 only). ``plan``:
    the plan the configuration came from (``--plan``), refused in one line where it was made for another store
    (modalities it lacks, another spacing or label convention), before the run folder is touched."""
    from dataclasses import replace

    from store import open_store

    from .distributed import Dist
    from .engine import train_run
    from .plan import mismatch

    dist = dist or Dist()
    check_flags(cfg)
    store = open_store(cfg.store)  # once: the loader, the splits and the plan's check all ask this one
    if plan is not None and (problem := mismatch(plan, store)):
        raise ConfigError(f"--plan: {problem}")
    run_dir = Path(cfg.run_dir)
    prepare_run_folder(run_dir, cfg.resume, cfg.overwrite, dist.is_writer)
    if cfg.folds is None:
        train_ids, val_ids = splits_for(store, cfg.fold)
        return train_run(cfg, train_ids, val_ids, run_dir, dist=dist, store=store)
    if cfg.folds > len(store.splits["folds"]):
        raise ConfigError(f"--folds {cfg.folds}: the store has {len(store.splits['folds'])} folds")
    report = {"folds": []}
    for k in range(cfg.folds):
        train_ids, val_ids = splits_for(store, k)
        fold_cfg = replace(cfg, fold=k, folds=None, run_dir=str(run_dir / fold_name(k)))
        s = train_run(fold_cfg, train_ids, val_ids, run_dir / fold_name(k), dist=dist, store=store)
        # relative to the run folder, so a moved or copied run folder keeps working
        report["folds"].append({"fold": k, "run_dir": fold_name(k), **s})
    best = min(report["folds"], key=lambda f: f["best_val_loss"])
    report["best_fold"] = best["fold"]
    report["selection"] = "lowest best validation loss (the seed's choice)"
    if dist.is_writer:
        cfg.save(run_dir / CONFIG)
        write_json(run_dir / KFOLD, report)
        print(f"k-fold: best fold {best['fold']} (validation loss {best['best_val_loss']:.4f}); "
              f"{run_dir / KFOLD}")
    return report
