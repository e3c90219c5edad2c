"""Models from a run folder, sliding-window probabilities, and the way back to the source grid."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from store.conventions import REGIONS, regions_to_label


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


def load_run(run_dir: str | Path, ensemble=False, device: str | torch.device = "cpu") -> LoadedRun:
    """The model(s) of a run: its best.pt; for a k-fold run the best fold, or every fold with ``ensemble=True``.
    ``ensemble`` may also list other run folders: every run's models (its best.pt, or every fold of a k-fold run)
    are averaged, refused in one line when the runs' regions, modalities or preprocessing differ."""
    others = list(ensemble) if isinstance(ensemble, (list, tuple)) else []
    run = _load_one(run_dir, Path(run_dir, "kfold.json").exists() if others else bool(ensemble), device)
    for other in others:
        more = _load_one(other, Path(other, "kfold.json").exists(), device)
        for what, a, b in (("regions", run.config.regions, more.config.regions),
                           ("modalities", run.config.modalities, more.config.modalities),
                           ("preprocessing", run.preprocessing.get("params"), more.preprocessing.get("params")),
                           ("label convention", run.preprocessing.get("label_convention"),
                            more.preprocessing.get("label_convention"))):
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):  # tuples and lists alike
                raise RunError(f"--ensemble {other}: its {what} ({_shown(b)}) differ from {run_dir}'s ({_shown(a)}); "
                               f"an ensemble averages runs trained with the same {what}")
        run = LoadedRun(run.models + more.models, run.config, run.checkpoints + more.checkpoints, run.preprocessing,
                        "", run.configs + more.configs)
    if others:
        names = sorted({c.model for c in run.configs})
        run.kind = f"ensemble of {len(run.models)} models ({', '.join(names)})"
    return run


def _shown(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _load_one(run_dir: str | Path, ensemble: bool, device) -> LoadedRun:
    from train.config import TrainConfig
    from train.engine import build_model, load_checkpoint
    from train.models import build_from_record

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    kfold = run_dir / "kfold.json"
    if kfold.exists():
        report = json.loads(kfold.read_text())
        # every fold relative to this run folder (older reports recorded absolute paths): a moved or copied
        # run folder keeps working
        folds = [run_dir / f"fold-{f['fold']}" for f in report["folds"]]
        if ensemble:
            paths, kind = [f / "best.pt" for f in folds], f"ensemble of {len(folds)} folds"
        else:
            paths, kind = [run_dir / f"fold-{report['best_fold']}" / "best.pt"], f"best fold {report['best_fold']}"
    else:
        if ensemble:
            raise RunError(f"--ensemble needs a k-fold run (kfold.json) in {run_dir}")
        paths, kind = [run_dir / "best.pt"], "single model"
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RunError(f"no checkpoint {missing[0]} in run folder {run_dir} (train it first)")
    from train.engine import CheckpointError
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
        m = build_from_record(ck["architecture"]) if "architecture" in ck else build_model(cfg)
        m.load_state_dict(ck["model"])
        models.append(m.to(device).eval())
    prep_file = paths[0].parent / "preprocessing.json"
    if not prep_file.exists():
        prep_file = run_dir / "preprocessing.json"
    preprocessing = json.loads(prep_file.read_text()) if prep_file.exists() else {}
    return LoadedRun(models, configs[0], paths, preprocessing, kind, configs)


# the 8 mirrorings of the three spatial axes of a (B, C, X, Y, Z) tensor, the identity first
MIRRORS: tuple[tuple[int, ...], ...] = tuple(d for k in range(4) for d in itertools.combinations((2, 3, 4), k))


def predict_probabilities(run: LoadedRun, image: np.ndarray, device, tta: bool = False) -> np.ndarray:
    """Sigmoid probabilities (R, X, Y, Z) of the run's regions (``run.config.regions``: TC, WT, ET[, RC]) for a
    preprocessed image (C, X, Y, Z), averaged over the run's models (MONAI sliding window, roi = patch size,
    overlap 0.5) and, with ``tta``, over the 8 mirrorings of the spatial axes (each output mirrored back), as
    nnU-Net's test-time augmentation."""
    from train.engine import amp_context, sliding_window_logits

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


def regions_on_source(prob: np.ndarray, geometry: dict) -> np.ndarray:
    """Probabilities (R, X, Y, Z) on the stored grid -> boolean regions on the source grid.

    Resampled linearly, then thresholded at 0.5: smoother than nearest-neighbour labels on anisotropic or
    oblique sources, and exact on 1 mm axis-aligned ones (prep.preprocess.to_source_grid).
    """
    from prep.preprocess import to_source_grid

    return to_source_grid(prob.astype(np.float32), geometry, mode="bilinear") > 0.5


def label_map(regions: np.ndarray, convention: str, names=REGIONS) -> np.ndarray:
    """Boolean regions (R, ...) named ``names`` -> the final uint8 label map in the convention: what is written
    as NIfTI and what every score is computed from."""
    return regions_to_label(regions, convention, names)


def spacing_of(affine) -> tuple[float, float, float]:
    """Voxel size in mm of each voxel axis (column norms of the affine)."""
    a = np.asarray(affine, float)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(a, axis=0))
