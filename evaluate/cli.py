"""``python -m evaluate``: test metrics per case and region, predictions in the source geometry, pictures.

    python -m evaluate --run-dir DIR [--store PATH] [--split test] [--ensemble] [--save-predictions]
    python -m evaluate predict --run-dir DIR --case CASE_DIR --out PRED.nii.gz
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _source_seg(store, case, source_dir: str | None) -> Path | None:
    """The case's source segmentation, if the source folder still holds the very file the store was built from."""
    from prep.preprocess import sha256_file

    root = source_dir or store.attrs.get("source")
    name = case.meta["source_files"].get("seg")
    if not root or not name:
        return None
    path = Path(root) / case.case_id / name
    if not path.exists() or sha256_file(path) != case.meta["source_sha256"].get("seg"):
        return None
    return path


def _write_nifti(label: np.ndarray, affine, path: Path, like: Path | None = None) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(label.astype(np.uint8), np.asarray(affine, float))
    codes = (1, 1)
    if like is not None and like.exists():
        ref = nib.load(str(like))
        codes = (int(ref.header["qform_code"]) or 1, int(ref.header["sform_code"]) or 1)
    img.set_qform(np.asarray(affine, float), code=codes[0])
    img.set_sform(np.asarray(affine, float), code=codes[1])
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


def evaluate_split(run_dir: str, store_path: str | None = None, split: str = "test", ensemble: bool = False,
                   save_predictions: bool = False, source_dir: str | None = None, device: str = "auto",
                   progress: bool = True) -> dict:
    import nibabel as nib
    import torch
    from monai.metrics import DiceMetric
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from store import open_store
    from store.conventions import region_masks

    from .inference import label_map, load_run, predict_probabilities, regions_on_source, spacing_of
    from .metrics import CONVENTIONS, region_metrics
    from .pictures import save_overlay

    dev = _device(device)
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
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    conv = store.label_convention
    rows, grids = [], set()
    monai_dice = DiceMetric(include_background=True, reduction="mean")
    tb = SummaryWriter(str(out_dir / "tb"))
    for step, cid in enumerate(tqdm(ids, desc=f"evaluate {split}", unit="case", disable=not progress)):
        case = store.case(cid)
        every = case.image()  # all stored channels, read once: the model's inputs and the pictures
        prob = predict_probabilities(run, every[[store.modalities.index(m) for m in run.config.modalities]], dev)
        store_gt = region_masks(case.label(), conv)
        seg = _source_seg(store, case, source_dir)
        if seg is not None:  # as BraTS scores: on the source grid against the source file
            gt = region_masks(np.asanyarray(nib.load(str(seg)).dataobj).astype(np.uint8), conv)
            pred = regions_on_source(prob, case.meta)
            spacing, grid = spacing_of(case.meta["source_affine"]), "source"
        else:
            gt, pred = store_gt, prob > 0.5
            spacing, grid = tuple(case.meta["spacing_mm"]), "store"
        grids.add(grid)
        row = {"case": cid, **region_metrics(pred, gt, spacing), "grid": grid,
               "voxels_gt_wt": int(gt[1].sum()), "voxels_pred_wt": int(pred[1].sum())}
        rows.append(row)
        monai_dice(torch.from_numpy(pred[None].astype(np.float32)), torch.from_numpy(gt[None].astype(np.float32)))
        if save_predictions:
            src_pred = pred if grid == "source" else regions_on_source(prob, case.meta)
            _write_nifti(label_map(src_pred, conv), case.meta["source_affine"], out_dir / "pred" / f"{cid}.nii.gz",
                         seg)
        # pictures on the stored grid (RAS): FLAIR when the store has it, else the model's first channel
        shown = "flair" if "flair" in store.modalities else run.config.modalities[0]
        flair = every[store.modalities.index(shown)]
        # the brain: nonzero in any channel (a voxel at its channel's mean is stored as 0, see FORMAT.md)
        save_overlay(flair, store_gt, prob > 0.5, out_dir / "png" / f"{cid}.png", f"{cid} ({shown})",
                     brain=(every != 0).any(0))
        z = flair.shape[2] // 2
        for name, vol in (("input", flair), ("label_WT", store_gt[1]), ("pred_WT", prob[1])):
            sl = np.asarray(vol[:, :, z], np.float32)
            rng = float(sl.max() - sl.min()) or 1.0
            tb.add_image(f"{cid}/{name}", (sl - sl.min()) / rng, step, dataformats="HW")
    tb.close()
    summary = {
        "run_dir": str(run_dir), "models": run.kind, "checkpoints": [str(p) for p in run.checkpoints],
        "split": split, "cases": len(rows), "modalities": list(run.config.modalities),
        "grid": grids.pop() if len(grids) == 1 else "mixed",
        "grid_note": "source: against the source seg file on its own grid, as BraTS scores; store: on the "
                     "store's grid because the source files are gone or changed",
        "conventions": CONVENTIONS,
        "monai_dice_mean": float(monai_dice.aggregate()),
        "monai_dice_note": "MONAI DiceMetric(include_background=True, reduction='mean'), empty ground truth "
                           "ignored, as the seed reported it",
        "regions": {},
    }
    for r in ("tc", "wt", "et"):
        for m in ("dice", "hd95"):
            v = np.array([row[f"{m}_{r}"] for row in rows], float)
            summary["regions"][f"{m}_{r}"] = {"mean": float(v.mean()), "std": float(v.std()),
                                              "median": float(np.median(v))}
    cols = ["case", "dice_tc", "dice_wt", "dice_et", "hd95_tc", "hd95_wt", "hd95_et", "grid", "voxels_gt_wt",
            "voxels_pred_wt"]
    with open(out_dir / f"{split}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (out_dir / f"{split}.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_table(rows, summary)
    return summary


def _print_table(rows: list[dict], summary: dict) -> None:
    head = f"{'case':<24} {'Dice TC':>8} {'Dice WT':>8} {'Dice ET':>8} {'HD95 TC':>8} {'HD95 WT':>8} {'HD95 ET':>8}"
    print(head)
    for r in rows:
        print(f"{r['case']:<24} {r['dice_tc']:8.3f} {r['dice_wt']:8.3f} {r['dice_et']:8.3f} "
              f"{r['hd95_tc']:8.2f} {r['hd95_wt']:8.2f} {r['hd95_et']:8.2f}")
    g = summary["regions"]
    print(f"{'mean':<24} {g['dice_tc']['mean']:8.3f} {g['dice_wt']['mean']:8.3f} {g['dice_et']['mean']:8.3f} "
          f"{g['hd95_tc']['mean']:8.2f} {g['hd95_wt']['mean']:8.2f} {g['hd95_et']['mean']:8.2f}")
    print(f"HD95 in mm; {summary['cases']} {summary['split']} cases on the {summary['grid']} grid; "
          f"MONAI DiceMetric mean {summary['monai_dice_mean']:.3f}; model: {summary['models']}")


def predict_case(run_dir: str, case_dir: str, out: str, ensemble: bool = False, device: str = "auto") -> Path:
    """Predict a raw case folder and write the labels in its source geometry and label convention."""
    from prep.discover import discover_case
    from prep.preprocess import preprocess

    from .inference import label_map, load_run, predict_probabilities, regions_on_source

    dev = _device(device)
    run = load_run(run_dir, ensemble, dev)
    mods = tuple(run.config.modalities)
    case = discover_case(case_dir, require_seg=False, required=mods)
    params = run.preprocessing.get("params", {})
    pre = preprocess(case, mods, with_label=False, margin=params.get("crop_margin", 2),
                     spacing=params.get("spacing_mm", (1.0, 1.0, 1.0)))
    prob = predict_probabilities(run, pre.image, dev)
    label = label_map(regions_on_source(prob, pre.geometry), case.label_convention)
    path = Path(out)
    _write_nifti(label, pre.geometry["source_affine"], path, case.images[mods[0]])
    counts = {int(v): int(c) for v, c in zip(*np.unique(label, return_counts=True)) if v}
    print(f"{case.case_id}: wrote {path} ({'x'.join(map(str, label.shape))}, {case.label_convention} labels, "
          f"voxels per label {counts})")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate",
        description="Evaluate a trained run on a split of its store: sliding-window inference, sigmoid > 0.5, Dice "
        "and HD95 (mm) per case and region (TC, WT, ET) on the source grid against the source seg file, as BraTS "
        "scores. Writes RUN/eval/<split>.csv and .json, PNG overlays under RUN/eval/png/. "
        "'python -m evaluate predict --help' predicts one raw case folder.",
    )
    _model_options(p)
    p.add_argument("--store", help="store path (default: the one the run was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default: test)")
    p.add_argument("--save-predictions", action="store_true",
                   help="write each prediction as NIfTI in the source geometry to RUN/eval/pred/<case>.nii.gz")
    p.add_argument("--source", help="the source cohort folder (default: the one the store was built from)")
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    """The flags both commands share: which run, which of its models, which device."""
    p.add_argument("--run-dir", default="runs/default", help="training run folder (default: %(default)s)")
    p.add_argument("--ensemble", action="store_true",
                   help="average the sigmoid outputs of every fold of a k-fold run (default: its best fold)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")


def build_predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate predict",
        description="Predict one raw case folder (BraTS 2021 or 2023 layout, seg not needed): the same "
        "preprocessing as build-store, inference, then back to the source grid (uncrop, inverse resampling, "
        "inverse orientation); labels in the source convention, written with the source affine and shape.",
    )
    _model_options(p)
    p.add_argument("--case", required=True, help="a case folder, e.g. data/raw/BraTS2021_00000")
    p.add_argument("--out", required=True, help="output .nii.gz")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    predict = bool(argv) and argv[0] == "predict"
    a = build_predict_parser().parse_args(argv[1:]) if predict else build_parser().parse_args(argv)
    from prep.discover import DiscoveryError
    from prep.preprocess import CaseError

    from .inference import RunError

    try:
        if predict:
            predict_case(a.run_dir, a.case, a.out, a.ensemble, a.device)
        else:
            evaluate_split(a.run_dir, a.store, a.split, a.ensemble, a.save_predictions, a.source, a.device)
    except (RunError, DiscoveryError, CaseError, FileNotFoundError, ValueError) as e:
        print(f"python -m evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0
