"""``python -m train export``'s command line, apart from the export itself (train.export), so that its ``--help``
answers without importing torch."""

from __future__ import annotations

import argparse

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
# formats written as a folder (default RUN/export/<name>): a MONAI bundle, a BraTS 2025 submission's build context
FOLDER_FORMATS = {"bundle": "bundle", "brats-submission": "brats-submission"}


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train export",
        description="Export a trained run's network as ONNX (onnxruntime, any ONNX runtime) or TorchScript (torch "
        "alone), with model-card.json beside it: the modalities in order, spacing, orientation, normalisation, "
        "patch size, regions, label convention, postprocessing, every step from source files to labels, the "
        "scorer's figures from RUN/eval, the training configuration and the project version. 'python -m evaluate "
        "predict --model FILE' predicts with it, postprocessing included. --format bundle writes a MONAI bundle "
        "that 'python -m monai.bundle run' predicts with where this project is not installed; --format "
        "brats-submission the build context of a BraTS 2025 submission image (Dockerfile, entry point, bundle).")
    p.add_argument("--run-dir", required=True, help="the trained run folder")
    p.add_argument("--format", required=True, choices=sorted([*FORMATS, *FOLDER_FORMATS]),
                   help="onnx (needs the onnx extra to run it with onnxruntime), torchscript, bundle (a MONAI bundle "
                   "folder: configs/, models/model.ts, scripts/, docs/, LICENSE) or brats-submission (a folder to "
                   "'docker build': Dockerfile, predict.py, the bundle; its README.md says how to build, test, push)")
    p.add_argument("--ensemble", action="store_true", help="a k-fold run's folds as one network (the logit of "
                   "their mean probability); default: its best fold, or a single run's best.pt")
    p.add_argument("--out", help="onnx, torchscript: a folder for the model and its card (default: RUN/export), or a "
                   "model file name (m.onnx, m.ts), its card m-card.json beside it; bundle, brats-submission: the "
                   "folder to write (default: RUN/export/bundle, RUN/export/brats-submission; other files in it are "
                   "left)")
    p.add_argument("--overwrite", action="store_true", help="replace the export's files where they are already "
                   "there (by default an export never replaces a file)")
    return p
