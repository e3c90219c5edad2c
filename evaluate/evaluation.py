"""``evaluate_split``: a trained run scored on a split of its store, as BraTS scores submissions.

Per case: the image is read from the store once; the model's probabilities become the final label map on the
source grid (the array ``--save-predictions`` writes); every score is computed from that label map against the
source seg file (read once), or on the stored grid where the source files are gone or changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.runfolder import eval_dir

from .scoring import FAMILIES as FAMILIES_DEFAULT

TTA_NOTE = "mean of the sigmoid outputs over the 8 mirrorings of the spatial axes"
GRID_NOTE = ("source: against the source seg file on its own grid, as BraTS scores; store: on the store's grid "
             "because the source files are gone or changed")
TASK_NOTE = ("the task the build recorded for each case, from its id (BraTS-MEN-... -> men; BraTS20xx, BraTS-GLI -> "
             "gli)")
MONAI_DICE_NOTE = ("MONAI DiceMetric(include_background=True, reduction='mean') over TC, WT, ET of the same label "
                   "maps, empty ground truth ignored, as the seed reported it")
CASE_COLUMNS = ("task", "grid", "voxels_gt_wt", "voxels_pred_wt")  # after the scores in <split>.csv


WRITTEN = ".written-by-evaluate"  # in RUN/eval/pred: the files evaluate wrote there, which it may replace


def _written_by_evaluate(folder: Path) -> set[str]:
    """The prediction files an earlier ``evaluate --save-predictions`` wrote into ``folder``: those it replaces
    (so that the files and the scores agree); any other file there is kept unless --overwrite."""
    try:
        return set((folder / WRITTEN).read_text().split())
    except OSError:
        return set()


class SplitScorer:
    """The per-case work of one evaluation, run by ``run_pipeline``: ``infer`` on the model's thread, ``finish``
    (labels on the source grid, scores, prediction file, pictures) on the writer's. It collects each case's
    scores after postprocessing (``rows``), before it (``unprocessed``, only where a rule is in force) and its
    brats2023 lesions."""

    def __init__(self, run, store, ids, dev, conv: str, families, rules, out_dir: Path, task: str | None,
                 tta: bool, save_predictions: bool, overwrite: bool = False):
        from torch.utils.tensorboard import SummaryWriter

        from .sheet import ScoreSheet

        self.run, self.store, self.ids, self.dev, self.conv = run, store, list(ids), dev, conv
        self.families, self.rules, self.out_dir, self.task = families, rules, out_dir, task
        self.tta, self.save_predictions, self.overwrite = tta, save_predictions, overwrite
        self.kept: list[Path] = []  # prediction files already there, left as they are (no --overwrite)
        self.suffix = "-tta" if tta else ""
        # what an earlier evaluate wrote into the prediction folder, read once: those files it may replace
        self.own = _written_by_evaluate(out_dir / f"pred{self.suffix}") if save_predictions else set()
        self.names = tuple(run.config.regions)
        self.model_channels = [store.modalities.index(m) for m in run.config.modalities]
        # the pictures' channel: FLAIR where the store has it
        self.picture_channel = "flair" if "flair" in store.modalities else run.config.modalities[0]
        self.sheet = ScoreSheet(order=self.ids)  # after postprocessing
        self.unprocessed = ScoreSheet(order=self.ids)  # before it, only where a rule is in force
        self.grids: set = set()
        self.tasks: dict = {}
        self.tb = SummaryWriter(str(out_dir / "tb"))

    def infer(self, loaded) -> np.ndarray:
        """Sigmoid probabilities (R, X, Y, Z) on the stored grid of a loaded (case, image, seg)."""
        from .inference import predict_probabilities

        return predict_probabilities(self.run, loaded[1][self.model_channels], self.dev, self.tta)

    def finish(self, cid: str, loaded, prob: np.ndarray) -> None:
        """The writer thread's part: the label maps on the source grid, scores, the prediction file, pictures."""
        from .cases import label_maps_for_scoring
        from .postprocess import apply

        case, image, seg = loaded
        raw, gt, spacing, grid = label_maps_for_scoring(case, prob, seg, self.conv, self.names,
                                                        self.run.config.threshold)
        pred = apply(raw, spacing, self.rules, self.conv)  # what is written and scored
        self.grids.add(grid)
        self.tasks[cid] = self.task or case.task
        self._score(cid, raw, pred, gt, spacing, grid)
        if self.save_predictions:
            from .cases import write_prediction

            path = self.out_dir / f"pred{self.suffix}" / f"{cid}.nii.gz"
            if path.exists() and not self.overwrite and path.name not in self.own:
                self.kept.append(path)
            else:
                write_prediction(pred, case.geometry["source_affine"], path, seg[0] if seg is not None else None,
                                 case.meta.get("source_labels"))
                with open(path.parent / WRITTEN, "a") as f:  # one line per file, written after the file itself
                    f.write(f"{path.name}\n")
        self._draw(cid, case, image, prob)

    def _score(self, cid: str, raw, pred, gt, spacing, grid: str) -> None:
        """Every family's scores of the postprocessed label map (and of the raw one, where a rule is in force),
        the lesions, and MONAI's Dice, onto the score sheets."""
        from .sheet import score_label_maps

        task = self.tasks[cid]
        self.sheet.add(score_label_maps(cid, pred, gt, self.conv, spacing, self.families, task, grid))
        if self.rules is not None and self.rules.describe():
            self.unprocessed.add(score_label_maps(cid, raw, gt, self.conv, spacing, self.families, task, grid))

    def _draw(self, cid: str, case, image: np.ndarray, prob: np.ndarray) -> None:
        """The overlay PNG and TensorBoard slices, on the stored grid (RAS), from the stored-grid label map."""
        from store.conventions import region_masks, regions_to_label

        from .pictures import save_overlay
        from .postprocess import apply

        picture = image[self.store.modalities.index(self.picture_channel)]
        store_gt = region_masks(case.label(), self.conv)
        store_pred = region_masks(apply(regions_to_label(prob > self.run.config.threshold, self.conv, self.names),
                                        case.spacing,
                                        self.rules, self.conv), self.conv)
        # the brain: nonzero in any channel (a voxel at its channel's mean is stored as 0, see FORMAT.md)
        save_overlay(picture, store_gt, store_pred, self.out_dir / f"png{self.suffix}" / f"{cid}.png",
                     f"{cid} ({self.picture_channel})", brain=(image != 0).any(0))
        z = picture.shape[2] // 2
        for name, vol in (("input", picture), ("label_WT", store_gt[1]), ("pred_WT", prob[1])):
            sl = np.asarray(vol[:, :, z], np.float32)
            rng = float(sl.max() - sl.min()) or 1.0
            self.tb.add_image(f"{cid}/{name}", (sl - sl.min()) / rng, self.ids.index(cid), dataformats="HW")

    def close(self) -> None:
        self.tb.close()


def _open_split(run_dir: str, store_path, split: str, ensemble, device: str, task):
    """(device, run, store, case ids, label convention) of an evaluation, its bad inputs refused."""
    from store import open_store
    from store.conventions import TASKS
    from train.device import resolve_device
    from train.runs import load_run

    from .cases import check_run_on_store

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
    return dev, run, store, ids, check_run_on_store(run, store)


def _summary(scorer: SplitScorer, run_dir: str, split: str, rows: list, score_cols: list, task, postprocessing: bool):
    """The evaluation's JSON record: what was scored, how, and the scores' statistics."""
    from .report import summarize

    run, rules, tasks = scorer.run, scorer.rules, scorer.tasks
    if rules is not None:
        shown_rules = rules.describe() or ["none: no rule raised the validation score"]
    else:
        why = "--no-postprocessing" if not postprocessing else "the run has no postprocessing.json"
        shown_rules = [f"none: {why}"]
    return {
        "run_dir": str(run_dir), "models": run.kind, "checkpoints": [str(p) for p in run.checkpoints],
        "split": split, "cases": len(rows), "modalities": list(run.config.modalities), "label_convention": scorer.conv,
        "test_time_augmentation": TTA_NOTE if scorer.tta else "none",
        "metrics": list(scorer.families), "grid": scorer.grids.pop() if len(scorer.grids) == 1 else "mixed",
        "grid_note": GRID_NOTE,
        "tasks": {t: sum(1 for v in tasks.values() if v == t) for t in sorted(set(tasks.values()))},
        "task_source": "--task" if task else TASK_NOTE,
        "postprocessing": shown_rules,
        "monai_dice_mean": scorer.sheet.monai_dice_mean(),
        "monai_dice_note": MONAI_DICE_NOTE,
        "scores": summarize(rows, score_cols),
    }


def _write_outputs(scorer: SplitScorer, stem: str, rows: list, unprocessed: list, score_cols: list,
                   summary: dict) -> None:
    """<stem>.csv and .json, the scores before postprocessing where a rule changed them, the lesions CSV and the
    before/after figure."""
    from .report import paired_gains, save_score_figure, summarize, write_lesions, write_reports

    columns = ["case", *score_cols, *CASE_COLUMNS]
    if unprocessed is not rows:
        summary["scores_before_postprocessing"] = summarize(unprocessed, score_cols)
        summary["postprocessing_gain"] = paired_gains(unprocessed, rows, score_cols)
        write_reports(scorer.out_dir, f"{stem}-before-postprocessing", unprocessed, columns, None)
    write_reports(scorer.out_dir, stem, rows, columns, summary)
    if "brats2023" in scorer.families:
        write_lesions(scorer.out_dir / f"{stem}-lesions.csv", scorer.sheet.lesions)
    save_score_figure(scorer.out_dir / f"{stem}-scores.png", unprocessed, rows, scorer.families, scorer.conv)


def evaluate_split(run_dir: str, store_path: str | None = None, split: str = "test", ensemble: bool = False,
                   save_predictions: bool = False, source_dir: str | None = None, device: str = "auto",
                   metrics=FAMILIES_DEFAULT, progress: bool = True, tta: bool = False, task: str | None = None,
                   postprocessing: bool = True, overwrite: bool = False) -> dict:
    """Score a run on a split of its store (see the module's docstring). ``task`` fixes the brats2023 task
    (default: each case's own, from its id); ``postprocessing`` applies RUN/postprocessing.json when present;
    ``overwrite`` lets ``save_predictions`` replace prediction files already there (else they are kept and named)."""
    from store.conventions import REGIONS, trainable_regions
    from store.progress import progress_bar

    from .cases import store_case_reader
    from .pipeline import run_pipeline
    from .postprocess import load_rules
    from .report import print_table
    from .scoring import parse_metrics, score_columns

    families = parse_metrics(metrics)
    dev, run, store, ids, conv = _open_split(run_dir, store_path, split, ensemble, device, task)
    rules = load_rules(run_dir, conv, tuple(run.config.regions)) if postprocessing else None
    out_dir = eval_dir(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scorer = SplitScorer(run, store, ids, dev, conv, families, rules, out_dir, task, tta, save_predictions,
                         overwrite)
    bar = progress_bar(len(ids), f"evaluate {split}", "case", enabled=progress)
    failures = run_pipeline(ids, store_case_reader(store, source_dir), scorer.infer, scorer.finish,
                            on_done=lambda *_: bar.update())
    bar.close()
    if failures:  # a case that cannot be scored is an error: the table would silently cover fewer cases
        raise failures[0][1]
    rows = scorer.sheet.rows
    unprocessed = scorer.unprocessed.rows if scorer.unprocessed else rows
    scorer.close()
    score_cols = score_columns(conv, families)
    summary = _summary(scorer, run_dir, split, rows, score_cols, task, postprocessing)
    _write_outputs(scorer, f"{split}{scorer.suffix}", rows, unprocessed, score_cols, summary)
    regions = list(trainable_regions(conv)) if "legacy" in families else list(REGIONS)
    print_table(rows, summary, regions)
    if scorer.kept:
        from .outputs import kept_note

        print(kept_note([p.name for p in scorer.kept], scorer.kept[0].parent))
    return summary
