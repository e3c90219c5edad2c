"""``evaluate_split``: a trained run scored on a split of its store, as BraTS scores submissions.

Per case: the image is read from the store once; the model's probabilities become the final label map on the
source grid (the array ``--save-predictions`` writes); every score is computed from that label map against the
source seg file (read once), or on the stored grid where the source files are gone or changed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .scoring import FAMILIES as FAMILIES_DEFAULT


def _load_label(path: Path, data: bytes) -> np.ndarray:
    """A label NIfTI from bytes already read (no second read of the file)."""
    import nibabel as nib

    raw = gzip.decompress(data) if path.name.endswith(".gz") else data
    return np.asanyarray(nib.Nifti1Image.from_bytes(raw).dataobj).astype(np.uint8)


def check_run_on_store(run, store) -> str:
    """The store's label convention, once the run's model can be evaluated on it (modalities, labels)."""
    from store.conventions import compatible

    from .inference import RunError

    missing = [m for m in run.config.modalities if m not in store.modalities]
    if missing:
        raise ValueError(f"the model reads {', '.join(missing)}, which the store lacks")
    conv = store.label_convention
    trained = run.preprocessing.get("label_convention")
    if trained and not (compatible(conv, trained) or compatible(trained, conv)):
        raise RunError(f"the run was trained on {trained} labels, the store {store.path} holds {conv} labels")
    return conv


def store_case_reader(store, source_dir: str | None = None):
    """``load(case_id) -> (case, image, seg)`` for ``run_pipeline``: the store's case once, the source seg once."""

    def load(cid):
        case = store.case(cid)
        return case, case.image(), case.read_source("seg", source_dir)

    return load


def label_maps_for_scoring(case, prob: np.ndarray, seg, conv: str, names) -> tuple:
    """(prediction, reference, spacing mm, grid): the final label map on the source grid (what is written) and
    the source seg, as BraTS scores; on the store's grid where the source files are gone or changed."""
    from store.conventions import regions_to_label, relabel

    from .inference import label_map, regions_on_source, spacing_of

    if seg is not None:
        pred = label_map(regions_on_source(prob, case.geometry), conv, names)
        ref = _load_label(*seg)
        if mapping := case.meta.get("source_labels"):  # MSD's values, as the build mapped them
            ref = relabel(ref, mapping)
        return pred, ref, spacing_of(case.geometry["source_affine"]), "source"
    return regions_to_label(prob > 0.5, conv, names), case.label(), case.spacing, "store"


def evaluate_split(run_dir: str, store_path: str | None = None, split: str = "test", ensemble: bool = False,
                   save_predictions: bool = False, source_dir: str | None = None, device: str = "auto",
                   metrics=FAMILIES_DEFAULT, progress: bool = True, tta: bool = False, task: str | None = None,
                   postprocessing: bool = True) -> dict:
    """Score a run on a split of its store (see the module's docstring). ``task`` fixes the brats2023 task
    (default: each case's own, from its id); ``postprocessing`` applies RUN/postprocessing.json when present."""
    import torch
    from monai.metrics import DiceMetric
    from torch.utils.tensorboard import SummaryWriter

    from store import open_store
    from store.conventions import REGIONS, region_masks, regions_to_label
    from store.progress import progress_bar
    from train.engine import resolve_device

    from . import postprocess
    from .brats2023 import TASKS
    from .inference import load_run, predict_probabilities
    from .pictures import save_overlay
    from .pipeline import run_pipeline
    from .predictions import write_label_nifti
    from .report import paired_gains, print_table, save_score_figure, summarize, write_lesions, write_reports
    from .scoring import legacy_regions, parse_metrics, score_case, score_columns

    families = parse_metrics(metrics)
    if task is not None and task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    dev = resolve_device(device)
    run = load_run(run_dir, ensemble, dev)
    store = open_store(store_path or run.config.store)
    if split not in ("train", "val", "test"):
        raise ValueError(f"--split must be train, val or test, not {split!r}")
    ids = store.splits[split]
    if not ids:
        raise ValueError(f"the store's {split} split is empty")
    conv = check_run_on_store(run, store)
    names = tuple(run.config.regions)
    rules = postprocess.load_rules(run_dir, conv, names) if postprocessing else None
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, before, lesion_rows, grids, tasks = {}, {}, {}, set(), {}
    monai_dice = DiceMetric(include_background=True, reduction="mean")
    tb = SummaryWriter(str(out_dir / "tb"))
    model_channels = [store.modalities.index(m) for m in run.config.modalities]
    shown = "flair" if "flair" in store.modalities else run.config.modalities[0]  # the pictures' channel

    def infer(loaded):
        return predict_probabilities(run, loaded[1][model_channels], dev, tta)

    def finish(cid, loaded, prob):  # the writer thread: labels on the source grid, scores, files, pictures
        case, every, seg = loaded
        raw, gt, spacing, grid = label_maps_for_scoring(case, prob, seg, conv, names)
        pred = postprocess.apply(raw, spacing, rules, conv)  # what is written and scored
        grids.add(grid)
        tasks[cid] = task or case.task
        found = [] if "brats2023" in families else None
        scores = score_case(pred, gt, conv, spacing, families, case=cid, task=tasks[cid], lesions=found)
        p_reg, g_reg = region_masks(pred, conv), region_masks(gt, conv)
        extra = {"task": tasks[cid], "grid": grid, "voxels_gt_wt": int(g_reg[1].sum()),
                 "voxels_pred_wt": int(p_reg[1].sum())}
        rows[cid] = {"case": cid, **scores, **extra}
        if rules is not None and rules.describe():
            before[cid] = {"case": cid, **score_case(raw, gt, conv, spacing, families, case=cid, task=tasks[cid]),
                           **extra, "voxels_pred_wt": int(region_masks(raw, conv, ("WT",))[0].sum())}
        lesion_rows[cid] = [{"case": cid, "region": region, **vars(lesion)} for region, lesion in (found or [])]
        monai_dice(torch.from_numpy(p_reg[None].astype(np.float32)), torch.from_numpy(g_reg[None].astype(np.float32)))
        if save_predictions:
            write_label_nifti(pred, case.geometry["source_affine"], out_dir / f"pred{suffix}" / f"{cid}.nii.gz",
                              seg[0] if seg is not None else None)
        # pictures on the stored grid (RAS), regions of the stored-grid label map: FLAIR when the store has it
        flair = every[store.modalities.index(shown)]
        store_gt = region_masks(case.label(), conv)
        store_pred = region_masks(postprocess.apply(regions_to_label(prob > 0.5, conv, names), case.spacing, rules,
                                                    conv), conv)
        # the brain: nonzero in any channel (a voxel at its channel's mean is stored as 0, see FORMAT.md)
        save_overlay(flair, store_gt, store_pred, out_dir / f"png{suffix}" / f"{cid}.png", f"{cid} ({shown})",
                     brain=(every != 0).any(0))
        z = flair.shape[2] // 2
        for name, vol in (("input", flair), ("label_WT", store_gt[1]), ("pred_WT", prob[1])):
            sl = np.asarray(vol[:, :, z], np.float32)
            rng = float(sl.max() - sl.min()) or 1.0
            tb.add_image(f"{cid}/{name}", (sl - sl.min()) / rng, ids.index(cid), dataformats="HW")

    suffix = "-tta" if tta else ""
    bar = progress_bar(len(ids), f"evaluate {split}", "case", enabled=progress)
    failures = run_pipeline(ids, store_case_reader(store, source_dir), infer, finish, on_done=lambda *_: bar.update())
    bar.close()
    if failures:  # a case that cannot be scored is an error: the table would silently cover fewer cases
        raise failures[0][1]
    rows = [rows[c] for c in ids]
    before = [before[c] for c in ids] if before else rows
    tb.close()
    score_cols = score_columns(conv, families)
    columns = ["case", *score_cols, "task", "grid", "voxels_gt_wt", "voxels_pred_wt"]
    summary = {
        "run_dir": str(run_dir), "models": run.kind, "checkpoints": [str(p) for p in run.checkpoints],
        "split": split, "cases": len(rows), "modalities": list(run.config.modalities), "label_convention": conv,
        "test_time_augmentation": "mean of the sigmoid outputs over the 8 mirrorings of the spatial axes" if tta
        else "none",
        "metrics": list(families), "grid": grids.pop() if len(grids) == 1 else "mixed",
        "grid_note": "source: against the source seg file on its own grid, as BraTS scores; store: on the "
                     "store's grid because the source files are gone or changed",
        "tasks": {t: sum(1 for v in tasks.values() if v == t) for t in sorted(set(tasks.values()))},
        "task_source": "--task" if task else "the task the build recorded for each case, from its id (BraTS-MEN-... "
                                            "-> men; BraTS20xx, BraTS-GLI -> gli)",
        "postprocessing": (rules.describe() or ["none: no rule raised the validation score"]) if rules is not None
        else ["none: " + ("--no-postprocessing" if not postprocessing else "the run has no postprocessing.json")],
        "monai_dice_mean": float(monai_dice.aggregate()),
        "monai_dice_note": "MONAI DiceMetric(include_background=True, reduction='mean') over TC, WT, ET of the same "
                           "label maps, empty ground truth ignored, as the seed reported it",
        "scores": summarize(rows, score_cols),
    }
    stem = f"{split}{suffix}"
    if before is not rows:
        summary["scores_before_postprocessing"] = summarize(before, score_cols)
        summary["postprocessing_gain"] = paired_gains(before, rows, score_cols)
        write_reports(out_dir, f"{stem}-before-postprocessing", before, columns, None)
    write_reports(out_dir, stem, rows, columns, summary)
    if "brats2023" in families:
        write_lesions(out_dir / f"{stem}-lesions.csv", [r for c in ids for r in lesion_rows[c]])
    save_score_figure(out_dir / f"{stem}-scores.png", before, rows, families, conv)
    regions = list(legacy_regions(conv)) if "legacy" in families else list(REGIONS)
    print_table(rows, summary, regions)
    return summary
