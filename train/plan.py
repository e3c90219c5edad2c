"""The plan: every value the recipe decides, in one record, and the invocation that ran it, in another (no torch).

A training run writes ``plan.json`` beside ``config.json``: the data (modalities, regions, label convention, the
store's spacing), the training (patch, batch, augmentation preset, loss, optimiser, schedule), the network and
inference (window, overlap, blending, threshold, test-time augmentation, and the way back to the source grid,
``store.records.SOURCE_GRID``). Validation, evaluation, prediction and export read the inference values from the
run's configuration, whose fields the plan names, and nowhere else.
``invocation.json`` records what does not change what is computed: the store's path, the run folder, the device,
the loader's workers, resume, the seed.

Both are written with ``train.runfolder.write_json``. ``python -m train plan --store S`` writes a plan for a store
(``train.planner``); ``python -m train --plan FILE`` trains it: the plan's values become the defaults of the
command's flags, so a flag given beside it still wins.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from store.records import SOURCE_GRID

from .config import TrainConfig
from .errors import ConfigError

PLAN_VERSION = 1
# the TrainConfig fields of each section of the recipe
SECTIONS = {
    "data": ("modalities", "regions"),
    "training": ("patch_size", "batch_size", "augmentation", "loss", "optimizer", "schedule", "lr", "weight_decay",
                 "fg_fraction", "t0", "eta_min", "epochs", "steps_per_epoch", "patience", "min_delta", "val_every",
                 "amp"),
    "network": ("model", "channels", "num_res_units", "dropout", "deep_supervision"),
    "inference": ("overlap", "blending", "threshold", "sw_batch_size"),
}
INVOCATION = ("store", "run_dir", "device", "workers", "cache", "cache_rate", "resume", "overwrite", "fold", "folds",
              "seed", "time_limit", "snapshot_at", "max_val_cases", "dist_timeout")


def make_plan(cfg: TrainConfig, label_convention: str | None, spacing_mm, extra: dict | None = None) -> dict:
    """The plan of ``cfg`` on a store of ``label_convention`` at ``spacing_mm``; ``extra`` adds sections (the
    planner's fingerprint and measurements)."""
    values = cfg.to_dict()
    plan: dict = {"plan_version": PLAN_VERSION}
    for section, names in SECTIONS.items():
        plan[section] = {k: values[k] for k in names}
    plan["data"].update(label_convention=label_convention, spacing_mm=[float(v) for v in spacing_mm])
    plan["inference"].update(window=list(cfg.patch_size), tta=False, to_source_grid=dict(SOURCE_GRID))
    plan["postprocessing"] = None  # none until tuned: evaluate tune-postprocessing records its rules here
    return plan | (extra or {})


POSTPROCESSING_KEYS = ("convention", "regions", "min_component_mm3", "et_relabel_below_mm3", "rules", "metric")


def record_postprocessing(run_dir: str | Path, record: dict) -> list[Path]:
    """Put the tuned rules (``record``: what postprocessing.json holds) into the postprocessing section of every
    plan of the run (the run's own, each fold's), so the plan stays the record of the whole recipe; returns the
    plans rewritten. Plans are rewritten atomically; a run trained before plans existed has none to update."""
    from .runfolder import FOLD_GLOB, PLAN, POSTPROCESSING, write_json

    run_dir = Path(run_dir)
    section = {"file": POSTPROCESSING, **{k: record.get(k) for k in POSTPROCESSING_KEYS}}
    done = []
    for path in [run_dir / PLAN, *sorted(run_dir.glob(f"{FOLD_GLOB}/{PLAN}"))]:
        if path.exists():
            plan = json.loads(path.read_text())
            plan["postprocessing"] = section
            done.append(write_json(path, plan))
    return done


def read_plan(path: str | Path) -> dict:
    """A plan file, checked for its sections; a bad file is one ConfigError line."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--plan {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--plan {path}: not a plan file (not JSON: {e})") from None
    if not isinstance(plan, dict) or plan.get("plan_version") != PLAN_VERSION or not all(
            isinstance(plan.get(s), dict) for s in SECTIONS):
        raise ConfigError(f"--plan {path}: not a plan file of version {PLAN_VERSION} (sections "
                          f"{', '.join(SECTIONS)})")
    back = plan["inference"].get("to_source_grid", SOURCE_GRID)
    if back != SOURCE_GRID:
        raise ConfigError(f"--plan {path}: the way back to the source grid is {json.dumps(SOURCE_GRID)} (the "
                          f"store's resampling inverted), not {json.dumps(back)}")
    return plan


def config_values(plan: dict) -> dict:
    """The TrainConfig fields a plan sets (lists where the parser keeps lists), for the parser's defaults."""
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for section, names in SECTIONS.items():
        for k in names:
            if k in plan[section] and k in known:
                out[k] = plan[section][k]
    return out


def mismatch(plan: dict, store) -> str | None:
    """Why ``plan`` does not fit ``store`` (modalities it lacks, another spacing or label convention), or None."""
    data = plan["data"]
    if missing := [m for m in data.get("modalities", []) if m not in store.modalities]:
        return (f"the plan's modalities {' '.join(data['modalities'])} are not all in the store ({', '.join(missing)} "
                f"missing; the store has {' '.join(store.modalities)})")
    want, have = data.get("spacing_mm"), store.params.get("spacing_mm")
    if want is not None and have is not None and any(abs(float(a) - float(b)) > 1e-3 for a, b in zip(want, have)):
        return (f"the plan is for {' x '.join(f'{v:g}' for v in want)} mm voxels, the store holds "
                f"{' x '.join(f'{float(v):g}' for v in have)} mm")
    conv = data.get("label_convention")
    if conv is not None and store.label_convention is not None and conv != store.label_convention:
        return f"the plan is for {conv} labels, the store holds {store.label_convention}"
    return None


def invocation(cfg: TrainConfig) -> dict:
    """What ran the plan: the fields of ``cfg`` that do not change what is computed."""
    values = cfg.to_dict()
    return {k: values[k] for k in INVOCATION}
