"""``python -m evaluate``: the command line over evaluate.evaluation (scores per case and region) and
evaluate.predictions (labels for raw case folders).

    python -m evaluate --run-dir DIR [--store PATH] [--split test] [--ensemble] [--save-predictions]
    python -m evaluate tune-postprocessing --run-dir DIR [--metric brats2023|legacy]
    python -m evaluate score --pred PRED_DIR --ref COHORT_DIR [--labels nnunet] [--out DIR] [--only-predicted]
    python -m evaluate predict --run-dir DIR --source COHORT_DIR --out PRED_DIR [--tta] [--ensemble]
    python -m evaluate predict --run-dir DIR --case CASE_DIR --out PRED.nii.gz
    python -m evaluate report --run-dir DIR
"""

from __future__ import annotations

import argparse
import sys

from store.conventions import NUMBERINGS, TASKS

from .scoring import FAMILIES, REGISTRY  # numpy and the conventions only: --help stays fast


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate",
        description="Evaluate a trained run on a split of its store: sliding-window inference, sigmoid > 0.5, the "
        "final label map on the source grid (what --save-predictions writes), then from that label map against the "
        "source seg file, in three families, each equal to the scorer it is named after (--metrics). Applies "
        "RUN/postprocessing.json when present (see 'python -m evaluate tune-postprocessing --help'). Writes "
        "RUN/eval/<split>.csv and .json (conventions, task and postprocessing stated), <split>-lesions.csv (every "
        "reference and predicted lesion), <split>-scores.png (case scores before and after postprocessing), PNG "
        "overlays under RUN/eval/png/. 'python -m evaluate predict --help' predicts raw case folders; 'python -m "
        "evaluate score --help' scores a folder of predictions.",
    )
    _model_options(p)
    _store_options(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default: test)")
    p.add_argument("--save-predictions", action="store_true",
                   help="write each prediction as NIfTI in the source geometry to RUN/eval/pred/<case>.nii.gz, "
                   "replacing what an earlier evaluate wrote there; a file evaluate did not write is kept and named, "
                   "unless --overwrite")
    _overwrite_option(p, "with --save-predictions: replace every prediction file already in RUN/eval/pred")
    p.add_argument("--metrics", nargs="+", default=list(FAMILIES), choices=FAMILIES, metavar="FAMILY",
                   help="any of: " + "; ".join(f"{f.name} ({f.description})" for f in REGISTRY.values())
                   + ". Default: all three")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="the BraTS task whose brats2023 dilation and volume threshold apply (gli, ssa, ped, goat: 3 "
                   "voxels, 50 mm^3; men: 1, 50 mm^3; met: 1, 2 mm^3). Default: each case's own, as the build "
                   "recorded it from its id (BraTS-MEN-... -> men; BraTS20xx_..., BraTS19_... and BraTS-GLI-... -> "
                   "gli)")
    _postprocessing_option(p)
    return p


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store path (default: the one the run was trained on)")
    p.add_argument("--source", help="the source cohort folder (default: the one the store was built from)")


def _run_and_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="runs/default", help="training run folder (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")


def _overwrite_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"{what} (by default nothing already there is "
                   "replaced)")


def _postprocessing_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-postprocessing", action="store_true",
                   help="do not apply RUN/postprocessing.json (applied by default when the run has one)")


def build_tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate tune-postprocessing",
        description="Learn postprocessing on validation, as nnU-Net and the BraTS 2023 winners do: predict the run's "
        "validation cases (a k-fold run: each fold's model on its own validation cases, out-of-fold), then search, "
        "per region (WT, TC, ET, and RC where trained), the removal of predicted components under k mm^3, and the "
        "relabelling of ET under v mm^3 in total as non-enhancing core; a removal never takes a case's largest "
        "component of the region. A rule is kept only when the lower bound of the paired bootstrap 95% interval of "
        "its per-case gain over the validation cases is above zero. Refuses fewer than --min-cases validation cases. "
        "Writes RUN/postprocessing.json, which 'python -m evaluate' and 'python -m evaluate predict' then apply.",
    )
    _run_and_device(p)
    p.add_argument("--metric", choices=["brats2023", "legacy"], default="brats2023",
                   help="the score to raise: the mean over ET, TC, WT of the brats2023 lesion-wise Dice, or of the "
                   "legacy Dice (default: %(default)s)")
    _store_options(p)
    p.add_argument("--tta", action="store_true", help="predict the validation cases with the 8 mirrorings, as "
                   "evaluate --tta does (tune with the inference you will evaluate with)")
    p.add_argument("--min-cases", type=int, default=10, metavar="N", help="the fewest validation cases tuned on; a "
                   "k-fold run's out-of-fold cases all count (default: %(default)s)")
    p.add_argument("--or-skip", action="store_true", help="with fewer than --min-cases validation cases, say that "
                   "tuning is skipped and why and exit 0, writing nothing (the demo's 2 validation cases)")
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    """The flags both commands share: which run, which of its models, which device."""
    _run_and_device(p)
    p.add_argument("--ensemble", nargs="*", metavar="RUN", default=None,
                   help="alone: average the sigmoid outputs of every fold of a k-fold run (default: its best fold); "
                   "with run folders: average --run-dir's models with theirs (any architectures; each k-fold run "
                   "gives every fold), refused when their regions, modalities or preprocessing differ")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the sigmoid outputs over the 8 mirrorings of the three "
                   "spatial axes (as nnU-Net does); about 8x the inference time")


def build_predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate predict",
        description="Predict raw case folders (BraTS 2018-2024 layouts at any depth, or an MSD Task01 folder with "
        "its imagesTs; seg not needed): the same preprocessing as build-store, inference, then back to the source "
        "grid (uncrop, inverse resampling, inverse orientation); labels in the source convention (MSD's values for "
        "MSD cohorts), written with the source affine and shape. "
        "--source DIR predicts every case of a cohort into --out DIR as <case-id>.nii.gz (as challenge "
        "submissions are named), reading and writing in threads while the model works; cases already written "
        "are skipped, so a killed run resumes; a bad case is reported and the others are predicted (exit 1 if "
        "any failed).",
    )
    _model_options(p)
    p.add_argument("--model", metavar="FILE", help="an exported model (python -m train export: model.onnx through "
                   "onnxruntime, the onnx extra, or model.ts through torch) instead of --run-dir; its "
                   "model card beside it (model-card.json, or m-card.json for m.onnx) says how to preprocess, and "
                   "its rules how to postprocess; a postprocessing.json beside it that differs from the card's rules "
                   "is an error")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", help="a cohort folder: every case folder in it is predicted")
    g.add_argument("--case", help="one case folder, e.g. data/raw/BraTS2021_00000")
    p.add_argument("--out", required=True, help="with --source: the output folder (outside the cohort; files "
                   "already in it are kept, so a killed run resumes), or an object-storage prefix s3://bucket/path "
                   "(the s3 extra; credentials from the standard AWS environment); with --case: the output .nii.gz "
                   "(outside the case folder)")
    _overwrite_option(p, "replace prediction files already at --out")
    _postprocessing_option(p)
    _cluster_options(p, "predict", "model's and the cohort's")
    return p


def build_score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate score",
        description="Score a folder of predictions (this project's, nnU-Net's, a challenge submission's) against a "
        "cohort's segmentations with the scorers of 'python -m evaluate': every <case-id>.nii.gz in --pred, on its "
        "reference's own grid, in every family of --metrics. Writes predictions.csv, predictions.json (conventions "
        "stated, one line per case that could not be scored), predictions-lesions.csv and predictions-scores.png "
        "into --out. A missing prediction, one that cannot be read (truncated, not gzip, not NIfTI), one that is "
        "not a label map (non-integer or NaN values), one on another grid, one with labels outside its numbering, "
        "an uncompressed .nii where the .nii.gz is missing, or one with no reference case is one line naming the "
        "file; the other cases are scored (exit 1 if any was not). The cohort's label convention is decided as "
        "build-store decides it: by the file names and the label values together (a 2023-named cohort whose segs "
        "hold 4, the resection cavity, is BraTS 2024).",
    )
    p.add_argument("--pred", required=True, help="the folder of predictions, <case-id>.nii.gz each")
    p.add_argument("--ref", required=True, help="the cohort folder with the reference segs (any layout 'python -m "
                   "prep build-store' reads: BraTS 2018-2024 at any depth, MSD Task01)")
    p.add_argument("--metrics", nargs="+", default=list(FAMILIES), choices=FAMILIES, metavar="FAMILY",
                   help="any of legacy, brats2023, brats2025 (see 'python -m evaluate --help'; default: all three)")
    p.add_argument("--task", choices=TASKS, default=None, help="the BraTS task whose brats2023 parameters apply "
                   "(default: each case's own, from its id)")
    p.add_argument("--labels", choices=NUMBERINGS, default=None,
                   help="the predictions' numbering, mapped to the cohort's: brats2021 (1 NCR, 2 ED, 4 ET), brats2023 "
                   "(1 NETC, 2 SNFH, 3 ET, 4 RC), brats2024 (the same values: 2023's with RC), nnunet (nnU-Net's "
                   "consecutive labels 0, 1, 2, ... in the convention's order), msd (1 oedema, 2 non-enhancing, 3 "
                   "enhancing). Default: the numbering of the reference files")
    p.add_argument("--out", help="the folder for the reports (default: <pred>-scores beside --pred; outside --pred "
                   "and --ref)")
    _overwrite_option(p, "replace the reports of an earlier score in --out")
    p.add_argument("--store", help="with --split: the store whose split names the cases to score")
    p.add_argument("--split", choices=["train", "val", "test"], help="score only this split's cases of --store "
                   "(their predictions missing still count); predictions of other cases are left out")
    p.add_argument("--only-predicted", action="store_true", help="score only the cases that have a prediction in "
                   "--pred (as nnU-Net's -chill); by default a missing prediction is a case not scored")
    _cluster_options(p, "score", "score")
    return p


def _cluster_options(p: argparse.ArgumentParser, what: str, needs: str) -> None:
    """--workers N | --scheduler ADDRESS: the cases on a Dask cluster (evaluate.cluster), predict and score alike."""
    c = p.add_mutually_exclusive_group()
    c.add_argument("--workers", type=int, default=0, metavar="N",
                   help=f"{what} on a local Dask cluster of N one-thread worker processes"
                   + (", each loading the model once" if what == "predict" else "") + " (default 0: in this process)")
    c.add_argument("--scheduler", metavar="ADDRESS", help=f"{what} on the Dask cluster whose scheduler is at ADDRESS "
                   f"(tcp://host:8786); its workers need this project and the {needs} files at the same paths")


def _cluster(a, parser):
    """The cluster runner --workers/--scheduler ask for (None: this process)."""
    if a.workers < 0:
        parser.error(f"--workers must be 0 or more, not {a.workers}")
    if not (a.scheduler or a.workers):
        return None
    from functools import partial

    from .cluster import run_on_cluster

    return partial(run_on_cluster, scheduler=a.scheduler, workers=a.workers)


def build_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate report",
        description="Write RUN/report.html: one self-contained page (no server, no network; figures embedded) with "
        "the run's training curves per region, learning rate, time per epoch and data wait; every evaluation's "
        "scores per family as tables sortable in the page, with means and their bootstrap 95%% intervals; every "
        "scored case's overlay (the three planes through the tumour), worst first; the recipe (plan.json, the "
        "model card's steps, config.json) and the postprocessing rules with what they changed. 'python -m evaluate' "
        "refreshes it after scoring a split. A run with no evaluation yet gets a page that says so. Writes nothing "
        "else, and refuses to replace a report.html it did not write.",
    )
    p.add_argument("--run-dir", required=True, help="the run folder (a k-fold run: every fold's curves)")
    return p


def _report(run_dir) -> int:
    from .html_report import write_report

    print(f"report: {write_report(run_dir)}")
    return 0


def _score(a) -> int:
    from .folders import score_folder

    if (a.split is None) != (a.store is None):
        build_score_parser().error("--split and --store go together: the store's split names the cases")
    summary = score_folder(a.pred, a.ref, a.metrics, a.task, a.labels, a.out, overwrite=a.overwrite,
                           store=a.store, split=a.split, only_predicted=a.only_predicted,
                           cluster=_cluster(a, build_score_parser()))
    for reason in summary["problems"].values():
        print(f"  {reason}", file=sys.stderr)
    print(f"scored {summary['cases']} cases, {len(summary['problems'])} not scored")
    return 1 if summary["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("predict", "tune-postprocessing", "score", "report") else None
    parser = {"predict": build_predict_parser, "tune-postprocessing": build_tune_parser,
              "score": build_score_parser, "report": build_report_parser}.get(command, build_parser)
    a = parser().parse_args(argv[1:] if command else argv)
    if hasattr(a, "ensemble"):  # None: the run's best model; []: every fold; [RUN ...]: those runs' models too
        a.ensemble = False if a.ensemble is None else (a.ensemble or True)
    predict = command == "predict"
    from prep.discover import DiscoveryError
    from prep.preprocess import CaseError
    from store import FormatError
    from train.runs import RunError

    from .evaluation import evaluate_split
    from .html_report import ReportError
    from .predictions import predict_case, predict_folder
    from .tuning import TooFewCases, tune_postprocessing

    try:
        if command == "score":
            return _score(a)
        if command == "report":
            return _report(a.run_dir)
        if command == "tune-postprocessing":
            if a.min_cases < 1:
                parser().error(f"--min-cases must be at least 1, not {a.min_cases}")
            try:
                tune_postprocessing(a.run_dir, a.metric, a.store, a.source, a.device, a.tta, min_cases=a.min_cases)
            except TooFewCases as e:
                if not a.or_skip:
                    raise
                print(f"python -m evaluate tune-postprocessing: skipped: {e}")
        elif predict and a.case and (a.workers or a.scheduler):
            parser().error("--workers and --scheduler go with --source (a cohort), not --case")
        elif predict and a.case:
            predict_case(a.run_dir, a.case, a.out, a.ensemble, a.device, a.tta, not a.no_postprocessing, a.model,
                         overwrite=a.overwrite)
        elif predict:
            cluster = _cluster(a, parser())
            rep = predict_folder(a.run_dir, a.source, a.out, a.ensemble, a.device, a.tta,
                                 postprocessing=not a.no_postprocessing, model=a.model, overwrite=a.overwrite,
                                 cluster=cluster)
            print(f"predicted {len(rep['written'])}, skipped {len(rep['skipped'])} already written, failed "
                  f"{len(rep['failed'])} -> {a.out}")
            if rep["skipped"]:
                from .outputs import kept_note

                print(kept_note([f"{c}.nii.gz" for c in rep["skipped"]], a.out))
            for reason in sorted(rep["failed"].values()):
                print(f"  {reason}", file=sys.stderr)
            if rep["failed"]:
                return 1
        else:
            evaluate_split(a.run_dir, a.store, a.split, a.ensemble, a.save_predictions, a.source, a.device,
                           a.metrics, tta=a.tta, task=a.task, postprocessing=not a.no_postprocessing,
                           overwrite=a.overwrite)
            try:  # the run's page shows the new scores
                _report(a.run_dir)
            except ReportError as e:
                print(f"python -m evaluate: the report was not refreshed: {e}", file=sys.stderr)
    except (RunError, DiscoveryError, CaseError, FormatError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"python -m evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0
