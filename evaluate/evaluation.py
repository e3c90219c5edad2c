"""``evaluate_split``: a trained run scored on a split of its store, as BraTS scores submissions.

Per case: the image is read from the store once; the model's probabilities become the final label map on the
source grid (the array ``--save-predictions`` writes); every score is computed from that label map against the
source seg file (read once), or on the stored grid where the source files are gone or changed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def _load_label(path: Path, data: bytes) -> np.ndarray:
    """A label NIfTI from bytes already read (no second read of the file)."""
    import nibabel as nib

    raw = gzip.decompress(data) if path.name.endswith(".gz") else data
    return np.asanyarray(nib.Nifti1Image.from_bytes(raw).dataobj).astype(np.uint8)


def evaluate_split(run_dir: str, store_path: str | None = None, split: str = "test", ensemble: bool = False,
                   save_predictions: bool = False, source_dir: str | None = None, device: str = "auto",
                   metrics: str = "both", progress: bool = True, tta: bool = False) -> dict:
    import torch
    from monai.metrics import DiceMetric
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from store import open_store
    from store.conventions import REGIONS, compatible, region_masks, regions_to_label
    from train.engine import resolve_device

    from .inference import RunError, label_map, load_run, predict_probabilities, regions_on_source, spacing_of
    from .pictures import save_overlay
    from .pipeline import run_pipeline
    from .predictions import write_label_nifti
    from .report import print_table, summarize, write_reports
    from .scoring import legacy_regions, parse_metrics, score_case, score_columns

    families = parse_metrics(metrics)
    dev = resolve_device(device)
    run = load_run(run_dir, ensemble, dev)
    store = open_store(store_path or run.config.store)
    if split not in ("train", "val", "test"):
        raise ValueError(f"--split must be train, val or test, not {split!r}")
    ids = store.splits[split]
    if not ids:
        raise ValueError(f"the store's {split} split is empty")
    missing = [m for m in run.config.modalities if m not in store.modalities]
    if missing:
        raise ValueError(f"the model reads {', '.join(missing)}, which the store lacks")
    conv = store.label_convention
    trained = run.preprocessing.get("label_convention")
    if trained and not (compatible(conv, trained) or compatible(trained, conv)):
        raise RunError(f"the run was trained on {trained} labels, the store {store.path} holds {conv} labels")
    names = tuple(run.config.regions)
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, grids = {}, set()
    monai_dice = DiceMetric(include_background=True, reduction="mean")
    tb = SummaryWriter(str(out_dir / "tb"))
    model_channels = [store.modalities.index(m) for m in run.config.modalities]
    shown = "flair" if "flair" in store.modalities else run.config.modalities[0]  # the pictures' channel

    def load(cid):  # the loader thread: the store's case once, the source seg once
        case = store.case(cid)
        return case, case.image(), case.read_source("seg", source_dir)

    def infer(loaded):
        return predict_probabilities(run, loaded[1][model_channels], dev, tta)

    def finish(cid, loaded, prob):  # the writer thread: labels on the source grid, scores, files, pictures
        case, every, seg = loaded
        on_source = label_map(regions_on_source(prob, case.geometry), conv, names)  # what is written
        if seg is not None:  # as BraTS scores: on the source grid against the source file
            pred, gt = on_source, _load_label(*seg)
            spacing, grid = spacing_of(case.geometry["source_affine"]), "source"
        else:
            pred, gt = regions_to_label(prob > 0.5, conv, names), case.label()
            spacing, grid = case.spacing, "store"
        grids.add(grid)
        scores = score_case(pred, gt, conv, spacing, families, case=cid)
        p_reg, g_reg = region_masks(pred, conv), region_masks(gt, conv)
        rows[cid] = {"case": cid, **scores, "grid": grid, "voxels_gt_wt": int(g_reg[1].sum()),
                     "voxels_pred_wt": int(p_reg[1].sum())}
        monai_dice(torch.from_numpy(p_reg[None].astype(np.float32)), torch.from_numpy(g_reg[None].astype(np.float32)))
        if save_predictions:
            write_label_nifti(on_source, case.geometry["source_affine"], out_dir / f"pred{suffix}" / f"{cid}.nii.gz",
                              seg[0] if seg is not None else None)
        # pictures on the stored grid (RAS), regions of the stored-grid label map: FLAIR when the store has it
        flair = every[store.modalities.index(shown)]
        store_gt = region_masks(case.label(), conv)
        store_pred = region_masks(regions_to_label(prob > 0.5, conv, names), conv)
        # the brain: nonzero in any channel (a voxel at its channel's mean is stored as 0, see FORMAT.md)
        save_overlay(flair, store_gt, store_pred, out_dir / f"png{suffix}" / f"{cid}.png", f"{cid} ({shown})",
                     brain=(every != 0).any(0))
        z = flair.shape[2] // 2
        for name, vol in (("input", flair), ("label_WT", store_gt[1]), ("pred_WT", prob[1])):
            sl = np.asarray(vol[:, :, z], np.float32)
            rng = float(sl.max() - sl.min()) or 1.0
            tb.add_image(f"{cid}/{name}", (sl - sl.min()) / rng, ids.index(cid), dataformats="HW")

    suffix = "-tta" if tta else ""
    bar = tqdm(total=len(ids), desc=f"evaluate {split}", unit="case", disable=not progress)
    failures = run_pipeline(ids, load, infer, finish, on_done=lambda *_: bar.update())
    bar.close()
    if failures:  # a case that cannot be scored is an error: the table would silently cover fewer cases
        raise failures[0][1]
    rows = [rows[c] for c in ids]
    tb.close()
    score_cols = score_columns(conv, families)
    summary = {
        "run_dir": str(run_dir), "models": run.kind, "checkpoints": [str(p) for p in run.checkpoints],
        "split": split, "cases": len(rows), "modalities": list(run.config.modalities), "label_convention": conv,
        "test_time_augmentation": "mean of the sigmoid outputs over the 8 mirrorings of the spatial axes" if tta
        else "none",
        "metrics": list(families), "grid": grids.pop() if len(grids) == 1 else "mixed",
        "grid_note": "source: against the source seg file on its own grid, as BraTS scores; store: on the "
                     "store's grid because the source files are gone or changed",
        "monai_dice_mean": float(monai_dice.aggregate()),
        "monai_dice_note": "MONAI DiceMetric(include_background=True, reduction='mean') over TC, WT, ET of the same "
                           "label maps, empty ground truth ignored, as the seed reported it",
        "scores": summarize(rows, score_cols),
    }
    write_reports(out_dir, f"{split}{suffix}", rows, ["case", *score_cols, "grid", "voxels_gt_wt", "voxels_pred_wt"],
                  summary)
    regions = list(legacy_regions(conv)) if "legacy" in families else list(REGIONS)
    print_table(rows, summary, regions)
    return summary
