"""``python -m evaluate score``: a folder of predictions (this project's, nnU-Net's, a challenge submission's) scored
against a cohort's segmentations by the same scorers as ``evaluate``.

Every ``<case-id>.nii.gz`` of the folder is read as a label map on its reference's own grid (shape and affine),
its values mapped from the stated numbering (``--labels``: BraTS 2021, BraTS 2023+, nnU-Net's consecutive labels,
MSD's; default: the numbering of the reference files themselves) to the cohort's convention, and scored against
the reference seg in every family asked for. A case that cannot be scored is one line naming the file; the other
cases are scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scoring import FAMILIES

STEM = "predictions"  # <out>/predictions.csv, .json, -lesions.csv, -scores.png


class ScoreError(ValueError):
    """Inputs that cannot be scored at all (no reference cases, no prediction folder); the message names them."""


def _load(path: Path):
    """(voxels, affine) of a NIfTI file; a ValueError naming the file where it cannot be read (truncated, not
    gzip, not NIfTI, empty), whatever the reader raised."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), np.asarray(img.affine, float)
    except Exception as e:  # noqa: BLE001 (gzip, zlib, nibabel and OS errors alike: one line naming the file)
        raise ValueError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from None


def _label_map(pred: np.ndarray, path: Path) -> np.ndarray:
    """The prediction as integers; a ValueError naming the file where it holds NaN or non-integer values (a
    probability map, say), which a cast would silently truncate."""
    if pred.dtype.kind == "f":
        if np.isnan(pred).any():
            raise ValueError(f"{path}: holds NaN values; a prediction must be a label map of integers")
        if (frac := pred[pred != np.round(pred)]).size:
            raise ValueError(f"{path}: holds non-integer values ({float(frac.flat[0]):g} among them); a prediction "
                             f"must be a label map of integers, not probabilities")
    elif pred.dtype.kind not in "iub":
        raise ValueError(f"{path}: holds {pred.dtype} values; a prediction must be a label map of integers")
    return pred


def _mapping(case, convention: str, labels: str | None) -> dict:
    """Prediction value -> the cohort convention's value: the stated numbering, or the reference files' own."""
    from store.conventions import label_values, numbering_to

    if labels is not None:
        return numbering_to(convention, labels)
    if getattr(case, "source_labels", None):  # MSD's own values, as the build maps them
        return {int(k): int(v) for k, v in case.source_labels.items()}
    return {v: v for v in label_values(convention)}


def _read_pair(case, pred_path: Path, convention: str, labels: str | None):
    """(prediction, reference, spacing mm) of one case in ``convention``; a ValueError naming the file where the
    prediction is on another grid or holds values outside its numbering."""
    from store.conventions import relabel

    from .cases import spacing_of
    from .scoring import present_values

    pred, pred_affine = _load(pred_path)
    pred = _label_map(pred, pred_path)
    ref, ref_affine = _load(case.seg)
    same_affine = np.allclose(pred_affine, ref_affine, atol=1e-3)
    if pred.shape != ref.shape or not same_affine:
        raise ValueError(f"{pred_path}: its grid (shape {'x'.join(map(str, pred.shape))}) is not that of its "
                         f"reference {case.seg} (shape {'x'.join(map(str, ref.shape))}, affines "
                         f"{'equal' if same_affine else 'differ'})")
    mapping = _mapping(case, convention, labels)
    found = present_values(pred)
    if stray := sorted(found - set(mapping)):  # values above 255 or below 0 included: no cast has hidden them
        raise ValueError(f"{pred_path}: label values {stray} are not in the {labels or 'reference files'} numbering "
                         f"{sorted(mapping)}")
    ref = np.asarray(ref).astype(np.uint8)
    if getattr(case, "source_labels", None):
        ref = relabel(ref, case.source_labels)
    return relabel(np.asarray(pred).astype(np.uint8), mapping), ref, spacing_of(ref_affine)


def _predictions_in(pred_dir: Path, ending: str = ".nii.gz") -> dict:
    """case id -> its prediction file ``<case-id><ending>`` in ``pred_dir`` (hidden files left out)."""
    return {p.name[: -len(ending)]: p for p in sorted(pred_dir.glob(f"*{ending}")) if not p.name.startswith(".")}


def score_file(case, pred_path: str | Path, convention: str, families=FAMILIES, labels: str | None = None,
               task: str | None = None):
    """One case (prep.discover.CaseFiles with its seg) scored from its prediction file: its CaseScores
    (evaluate.sheet). A prediction that cannot be scored raises ValueError or OSError naming the file. Runs in this
    process or on a cluster's worker alike."""
    from .sheet import score_label_maps

    pred_path = Path(pred_path)
    try:
        pred, ref, spacing = _read_pair(case, pred_path, convention, labels)
        return score_label_maps(case.case_id, pred, ref, convention, spacing, families, task or case.task, "source")
    except (ValueError, OSError) as e:
        raise type(e)(str(e) if str(pred_path) in str(e) else f"{pred_path}: {e}") from None


def score_predictions(pred_dir: str | Path, cases, convention: str, families=FAMILIES, labels: str | None = None,
                      task: str | None = None, ignore=(), cluster=None):
    """Every case of ``cases`` (prep.discover.CaseFiles with segs, one label convention) scored from
    ``pred_dir/<case-id>.nii.gz`` into a ScoreSheet (evaluate.sheet); predictions of no case in ``cases`` (but
    those of ``ignore``, cases left out on purpose) and cases without a prediction are problems. ``labels``: the
    predictions' numbering (None: the reference files'); ``task``: the brats2023 task (default: each case's own);
    ``cluster``: None (this process) or a callable that runs (fn, args) tasks on a Dask cluster
    (evaluate.cluster.run_on_cluster with its address bound)."""
    from .sheet import ScoreSheet

    pred_dir = Path(pred_dir)
    found = _predictions_in(pred_dir)
    uncompressed = _predictions_in(pred_dir, ".nii")
    refs = {c.case_id: c for c in cases}
    sheet = ScoreSheet()
    for cid in sorted(set(found) - set(refs) - set(ignore)):
        sheet.problems[cid] = f"{found[cid]}: a prediction with no reference case"
    tasks = {}
    for cid, case in refs.items():
        if cid not in found:
            sheet.problems[cid] = f"case {cid}: no prediction {pred_dir / f'{cid}.nii.gz'}" + (
                f"; {uncompressed[cid].name} is there: predictions are read as .nii.gz (gzip it)"
                if cid in uncompressed else "")
            continue
        tasks[cid] = (score_file, (case, str(found[cid]), convention, tuple(families), labels, task))
    if cluster is None:
        done, failed = {}, {}
        for cid, (fn, args) in tasks.items():
            try:
                done[cid] = fn(*args)
            except (ValueError, OSError) as e:
                failed[cid] = str(e)
    else:
        done, failed = cluster(tasks, "score")
    for cid in sorted(done):
        sheet.add(done[cid])
    sheet.problems.update(failed)
    return sheet


def score_folder(pred_dir: str | Path, ref_dir: str | Path, metrics=FAMILIES, task: str | None = None,
                 labels: str | None = None, out_dir: str | Path | None = None, overwrite: bool = False,
                 store: str | None = None, split: str | None = None, only_predicted: bool = False,
                 cluster=None) -> dict:
    """Score ``pred_dir`` against the cohort at ``ref_dir`` (any layout discovery reads) and write, into ``out_dir``
    (default ``<pred_dir>-scores`` beside it), what ``evaluate`` writes: predictions.csv, .json, -lesions.csv and
    -scores.png. ``store`` and ``split``: only that split's cases; ``only_predicted``: only the cases with a
    prediction; ``cluster``: score on a Dask cluster (``score_predictions``). ``out_dir`` is checked before any
    scoring: outside both inputs, writable, and holding no earlier reports unless ``overwrite``. Returns the
    summary, its ``problems`` one line per case that could not be scored."""
    from prep.discover import discover
    from store.conventions import TASKS

    from .outputs import refuse_existing, refuse_inside, writable_folder
    from .scoring import parse_metrics

    families = parse_metrics(metrics)
    if task is not None and task not in TASKS:
        raise ScoreError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise ScoreError(f"--pred {pred_dir}: no such folder")
    out = Path(out_dir) if out_dir else pred_dir.with_name(f"{pred_dir.name}-scores")
    refuse_inside(out, "--out", {"--pred": pred_dir, "--ref": ref_dir})
    if not overwrite:
        refuse_existing([out / f"{STEM}{end}" for end in REPORT_ENDINGS], "--out")
    writable_folder(out, "--out")
    cohort = discover(ref_dir, require_seg=True)
    if not cohort.cases and not cohort.problems:
        raise ScoreError(f"--ref {ref_dir}: no case folders in it")
    cases, problems, ignore = _chosen_cases(cohort, pred_dir, store, split, only_predicted)
    convention = _convention(cohort.label_convention or "brats2021", cases)
    scored = score_predictions(pred_dir, cases, convention, families, labels, task, ignore, cluster)
    scored.problems = {**problems, **scored.problems}
    return _write(scored, out, pred_dir, convention, families, task)


REPORT_ENDINGS = (".csv", ".json", "-lesions.csv", "-scores.png")  # after STEM: what a score writes


def _chosen_cases(cohort, pred_dir: Path, store: str | None, split: str | None, only_predicted: bool):
    """(the cases to score, {case: problem} of the cohort's own, case ids left out on purpose): every case of the
    cohort, or those of ``store``'s ``split`` (a split case missing from the cohort is a problem), or those with a
    prediction."""
    cases, problems = list(cohort.cases), dict(cohort.problems)
    every = {c.case_id for c in cases} | set(problems)
    if split is not None:
        from store import open_store

        wanted = set(open_store(store).splits[split])
        for cid in sorted(wanted - every):
            problems[cid] = f"case {cid} of the {split} split of {store}: not in the cohort"
        cases = [c for c in cases if c.case_id in wanted]
        problems = {k: v for k, v in problems.items() if k in wanted}
    if only_predicted:
        predicted = set(_predictions_in(pred_dir))
        cases = [c for c in cases if c.case_id in predicted]
        problems = {k: v for k, v in problems.items() if k in predicted}
    return cases, problems, every - {c.case_id for c in cases}


def _convention(named: str, cases) -> str:
    """The cohort's label convention as build-store decides it: the file names' (``named``), or the one that
    supersedes it where a reference's values need it (2023 names with 4, the resection cavity: BraTS 2024)."""
    from store.conventions import SUPERSEDED_BY, convention_for_labels

    from .scoring import present_values

    if named not in SUPERSEDED_BY:
        return named
    for case in cases:
        try:
            if convention_for_labels(named, present_values(_load(case.seg)[0])) != named:
                return SUPERSEDED_BY[named]
        except ValueError:
            continue  # an unreadable reference, or one with stray values, is named when its case is scored
    return named


def _write(scored, out: Path, pred_dir: Path, convention: str, families, task) -> dict:
    """The reports of a scored folder (a ScoreSheet), as ``evaluate`` writes them, and the console table."""
    from store.conventions import REGIONS, trainable_regions

    from .evaluation import CASE_COLUMNS, MONAI_DICE_NOTE, TASK_NOTE
    from .report import print_table, save_score_figure, summarize, write_lesions, write_reports
    from .scoring import score_columns

    rows = scored.rows
    score_cols = score_columns(convention, families)
    tasks = [r["task"] for r in rows]
    summary = {
        "predictions": str(pred_dir), "models": f"the predictions in {pred_dir}", "split": "predicted",
        "cases": len(rows), "label_convention": convention, "metrics": list(families), "grid": "source",
        "tasks": {t: tasks.count(t) for t in sorted(set(tasks))}, "task_source": "--task" if task else TASK_NOTE,
        "postprocessing": ["none: the predictions as found"],
        "monai_dice_mean": scored.monai_dice_mean(),
        "monai_dice_note": MONAI_DICE_NOTE, "scores": summarize(rows, score_cols),
        "problems": dict(sorted(scored.problems.items())),
    }
    write_reports(out, STEM, rows, ["case", *score_cols, *CASE_COLUMNS], summary)
    if "brats2023" in families:
        write_lesions(out / f"{STEM}-lesions.csv", scored.lesions)
    if rows:
        save_score_figure(out / f"{STEM}-scores.png", rows, rows, families, convention)
        print_table(rows, summary, list(trainable_regions(convention)) if "legacy" in families else list(REGIONS))
    return summary
