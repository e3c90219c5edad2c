"""``python -m evaluate``: the command line over evaluate.evaluation (scores per case and region) and
evaluate.predictions (labels for raw case folders).

    python -m evaluate --run-dir DIR [--store PATH] [--split test] [--ensemble] [--save-predictions]
    python -m evaluate predict --run-dir DIR --source COHORT_DIR --out PRED_DIR [--tta] [--ensemble]
    python -m evaluate predict --run-dir DIR --case CASE_DIR --out PRED.nii.gz
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate",
        description="Evaluate a trained run on a split of its store: sliding-window inference, sigmoid > 0.5, the "
        "final label map on the source grid (what --save-predictions writes), then from that label map against the "
        "source seg file, as the BraTS challenge scores: legacy Dice and HD95 (mm) per region (TC, WT, ET, and RC "
        "for BraTS 2024 labels) and lesion-wise Dice and HD95 with matched, missed and spurious lesion counts. "
        "Writes RUN/eval/<split>.csv and .json (conventions stated), PNG overlays under RUN/eval/png/. "
        "'python -m evaluate predict --help' predicts one raw case folder.",
    )
    _model_options(p)
    p.add_argument("--store", help="store path (default: the one the run was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default: test)")
    p.add_argument("--save-predictions", action="store_true",
                   help="write each prediction as NIfTI in the source geometry to RUN/eval/pred/<case>.nii.gz")
    p.add_argument("--source", help="the source cohort folder (default: the one the store was built from)")
    p.add_argument("--metrics", default="both", choices=["legacy", "lesionwise", "both"],
                   help="legacy: Dice and HD95 per region over the whole case (BraTS 2017-2021); lesionwise: the "
                   "BraTS 2023+ ranking metrics (each lesion matched, missed and spurious lesions penalised, with "
                   "panoptica); both (default)")
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    """The flags both commands share: which run, which of its models, which device."""
    p.add_argument("--run-dir", default="runs/default", help="training run folder (default: %(default)s)")
    p.add_argument("--ensemble", action="store_true",
                   help="average the sigmoid outputs of every fold of a k-fold run (default: its best fold)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the sigmoid outputs over the 8 mirrorings of the three "
                   "spatial axes (as nnU-Net does); about 8x the inference time")


def build_predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluate predict",
        description="Predict raw case folders (BraTS 2021, 2023 or 2024 layout, seg not needed): the same "
        "preprocessing as build-store, inference, then back to the source grid (uncrop, inverse resampling, "
        "inverse orientation); labels in the source convention, written with the source affine and shape. "
        "--source DIR predicts every case of a cohort into --out DIR as <case-id>.nii.gz (as challenge "
        "submissions are named), reading and writing in threads while the model works; cases already written "
        "are skipped, so a killed run resumes; a bad case is reported and the others are predicted (exit 1 if "
        "any failed).",
    )
    _model_options(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", help="a cohort folder: every case folder in it is predicted")
    g.add_argument("--case", help="one case folder, e.g. data/raw/BraTS2021_00000")
    p.add_argument("--out", required=True, help="with --source: the output folder (outside the cohort); with "
                   "--case: the output .nii.gz")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    predict = bool(argv) and argv[0] == "predict"
    a = build_predict_parser().parse_args(argv[1:]) if predict else build_parser().parse_args(argv)
    from prep.discover import DiscoveryError
    from prep.preprocess import CaseError
    from store import FormatError

    from .evaluation import evaluate_split
    from .inference import RunError
    from .predictions import predict_case, predict_folder

    try:
        if predict and a.case:
            predict_case(a.run_dir, a.case, a.out, a.ensemble, a.device, a.tta)
        elif predict:
            rep = predict_folder(a.run_dir, a.source, a.out, a.ensemble, a.device, a.tta)
            print(f"predicted {len(rep['written'])}, skipped {len(rep['skipped'])} already written, failed "
                  f"{len(rep['failed'])} -> {a.out}")
            for reason in sorted(rep["failed"].values()):
                print(f"  {reason}", file=sys.stderr)
            if rep["failed"]:
                return 1
        else:
            evaluate_split(a.run_dir, a.store, a.split, a.ensemble, a.save_predictions, a.source, a.device,
                           a.metrics, tta=a.tta)
    except (RunError, DiscoveryError, CaseError, FormatError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"python -m evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0
