"""Run folders, which training writes: what marks a folder as holding a run, moving an earlier run aside, and
loading a run's trained models (``load_run``) for evaluation, prediction and export."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .runfolder import BEST, FOLD_GLOB, KFOLD, LAST, METRICS, PLAN, PREPROCESSING, fold_name

RUN_FILES = (LAST, BEST, METRICS, KFOLD)


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds (part of) a training run: checkpoints, metrics, or k-fold folders."""
    return any((run_dir / f).exists() for f in RUN_FILES) or any(
        (d / f).exists() for d in run_dir.glob(FOLD_GLOB) for f in RUN_FILES)


def move_aside(run_dir: Path) -> Path:
    """Rename an earlier run's folder to ``<run_dir>.old-N`` (the first free N): nothing is deleted."""
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.old-{n}")).exists():
        n += 1
    os.replace(run_dir, aside)
    return aside


class RunError(ValueError):
    """A run folder that cannot be evaluated; the message says what is missing."""


@dataclass
class LoadedRun:
    models: list[torch.nn.Module]
    config: object  # TrainConfig of the first model: modalities, regions
    checkpoints: list[Path]
    preprocessing: dict  # {"params": store params, "label_convention": ...}
    kind: str  # "single", "best fold K", "ensemble of N folds"
    configs: list  # each model's own TrainConfig (its patch size and precision for the sliding window)
    card: dict | None = None  # an exported model's card (evaluate.exported), None for a run folder
    folder: Path | None = None  # the run folder it was loaded from
    plan: dict | None = None  # the first model's plan (train.plan): plan.json, or made from its config


def load_run(run_dir: str | Path, ensemble=False, device: str | torch.device = "cpu") -> LoadedRun:
    """The model(s) of a run: its best.pt; for a k-fold run the best fold, or every fold with ``ensemble=True``.
    ``ensemble`` may also list other run folders: every run's models (its best.pt, or every fold of a k-fold run)
    are averaged, refused in one line when the runs' regions, modalities or preprocessing differ."""
    others = list(ensemble) if isinstance(ensemble, (list, tuple)) else []
    run = _load_one(run_dir, Path(run_dir, KFOLD).exists() if others else bool(ensemble), device)
    for other in others:
        more = _load_one(other, Path(other, KFOLD).exists(), device)
        for what, a, b in (("regions", run.config.regions, more.config.regions),
                           ("modalities", run.config.modalities, more.config.modalities),
                           ("preprocessing", run.preprocessing.get("params"), more.preprocessing.get("params")),
                           ("label convention", run.preprocessing.get("label_convention"),
                            more.preprocessing.get("label_convention"))):
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):  # tuples and lists alike
                raise RunError(f"--ensemble {other}: its {what} ({_shown(b)}) differ from {run_dir}'s ({_shown(a)}); "
                               f"an ensemble averages runs trained with the same {what}")
        run = LoadedRun(run.models + more.models, run.config, run.checkpoints + more.checkpoints, run.preprocessing,
                        "", run.configs + more.configs, folder=run.folder, plan=run.plan)
    if others:
        names = sorted({c.model for c in run.configs})
        run.kind = f"ensemble of {len(run.models)} models ({', '.join(names)})"
    return run


def _shown(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _load_one(run_dir: str | Path, ensemble: bool, device) -> LoadedRun:
    from .checkpoints import CheckpointError, load_checkpoint
    from .config import TrainConfig
    from .models import build, build_from_record

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    kfold = run_dir / KFOLD
    if kfold.exists():
        report = json.loads(kfold.read_text())
        # every fold relative to this run folder (older reports recorded absolute paths): a moved or copied
        # run folder keeps working
        folds = [run_dir / fold_name(f["fold"]) for f in report["folds"]]
        if ensemble:
            paths, kind = [f / BEST for f in folds], f"ensemble of {len(folds)} folds"
        else:
            paths, kind = [run_dir / fold_name(report["best_fold"]) / BEST], f"best fold {report['best_fold']}"
    else:
        if ensemble:
            raise RunError(f"--ensemble needs a k-fold run ({KFOLD}) in {run_dir}")
        paths, kind = [run_dir / BEST], "single model"
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RunError(f"no checkpoint {missing[0]} in run folder {run_dir} (train it first)")
    models, configs = [], []
    for p in paths:
        try:
            ck = load_checkpoint(p)
        except CheckpointError as e:
            raise RunError(str(e)) from None
        cfg = TrainConfig.from_dict(ck["config"])
        if configs and tuple(cfg.modalities) != tuple(configs[0].modalities):
            raise RunError(f"fold models of {run_dir} read different modalities")
        configs.append(cfg)
        # the checkpoint says how to rebuild its network; older checkpoints hold the config only
        m = build_from_record(ck["architecture"]) if "architecture" in ck else build(cfg)
        m.load_state_dict(ck["model"])
        models.append(m.to(device).eval())
    prep_file = paths[0].parent / PREPROCESSING
    if not prep_file.exists():
        prep_file = run_dir / PREPROCESSING
    preprocessing = json.loads(prep_file.read_text()) if prep_file.exists() else {}
    return LoadedRun(models, configs[0], paths, preprocessing, kind, configs, folder=run_dir,
                     plan=_plan_of(paths[0].parent, configs[0], preprocessing))


def _plan_of(model_dir: Path, cfg, preprocessing: dict) -> dict:
    """The plan a model was trained with: its plan.json, or (runs trained before plans were written) the plan its
    config and preprocessing give."""
    from .plan import make_plan

    path = model_dir / PLAN
    if path.exists():
        return json.loads(path.read_text())
    return make_plan(cfg, preprocessing.get("label_convention"), preprocessing.get("params", {}).get("spacing_mm", ()))
