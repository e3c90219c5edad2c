"""``python -m train export --format bundle``: a trained run as a MONAI bundle, laid out as MONAI's bundle
specification and the model zoo have it, which MONAI's own runner predicts with where this project is not
installed::

    configs/metadata.json    the specification's fields: versions, inputs and outputs, label meanings, scores
    configs/inference.json   preprocessing, sliding-window inferer and postprocessing, all MONAI components, but
                             for scripts/brats.py: the cases of a folder, regions -> BraTS labels with the rules
    models/model.ts          the network (TorchScript), with model-card.json beside it (``evaluate predict --model``)
    scripts/brats.py         numpy, nibabel, scipy, torch and MONAI only
    docs/README.md, LICENSE

``python -m monai.bundle run --config_file BUNDLE/configs/inference.json --dataset_dir IN --output_dir OUT``, from
any folder, writes ``OUT/<case-id>.nii.gz``; ``--labels brats2023`` writes BraTS 2023+ label values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SCRIPT = Path(__file__).with_name("bundle_scripts") / "brats.py"
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
MODALITY_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
REGION_NAMES = {"TC": "tumour core", "WT": "whole tumour", "ET": "enhancing tumour", "RC": "resection cavity"}


def _step(card: dict, name: str) -> dict:
    return next(s for s in card["recipe"] if s["step"] == name)


def inference_config(card: dict) -> dict:
    """``configs/inference.json`` from a model card: the card's recipe as MONAI components."""
    from store.records import SOURCE_GRID

    sw, spacing = _step(card, "sliding window"), _step(card, "spacing")
    return {
        "imports": ["$import scripts"],
        # the folder scripts/ was imported from (MONAI's runner puts the bundle's folder on the path), so that
        # the runner finds the model wherever it is started
        "bundle_root": "$__import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath("
                       "scripts.__file__)))",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/output'",
        "modalities": card["input"]["modalities"],
        "regions": card["output"]["regions"],
        "labels": card["output"]["label_convention"] or "brats2021",
        "rules": card.get("postprocessing"),
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "network": "$@network_def.eval()",
        "overwrite": False,
        "datalist": "$scripts.brats.cases(@dataset_dir, @modalities, @output_dir, @overwrite)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "ensure_channel_first": True, "dtype": "$numpy.float32"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": _step(card, "orientation")["what"]},
            {"_target_": "Spacingd", "keys": "image", "pixdim": spacing["mm"], "mode": spacing["interpolation"],
             "padding_mode": spacing.get("padding_mode", SOURCE_GRID["padding_mode"])},  # Invertd pads back so
            {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
             "select_fn": "$lambda x: x != 0", "margin": _step(card, "crop")["crop_margin"], "allow_smaller": True},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": sw["roi_size"],
                    "sw_batch_size": sw["sw_batch_size"], "overlap": sw["overlap"], "mode": sw["mode"],
                    "padding_mode": sw["padding_mode"], "cval": sw["cval"]},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": _step(card, "threshold")["value"]},
            {"_target_": "scripts.brats.BraTSLabelsd", "keys": "pred", "regions": "@regions", "labels": "@labels",
             "rules": "@rules"},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
             "separate_folder": False, "output_dtype": "$numpy.uint8", "resample": False, "squeeze_end_dims": True,
             "output_name_formatter": "$scripts.brats.output_name", "print_log": False},
        ]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "amp": False},
        "run": ["$@evaluator.run()", "$scripts.brats.finish()"],
    }


INFERENCE_PACKAGES = ("monai", "torch", "numpy", "nibabel", "scipy", "pytorch-ignite")


def versions() -> dict:
    """Each inference package's version here ("unknown" where it is not installed): the bundle's metadata and the
    submission image's pins."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in INFERENCE_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _label_classes(card: dict) -> str:
    from store.conventions import LABEL_CONVENTIONS

    conv = card["output"]["label_convention"] or "brats2021"
    labels = LABEL_CONVENTIONS[conv]["labels"]
    return f"one label map in {conv} values: 0 background, " + ", ".join(f"{k} {v}" for k, v in labels.items())


def metadata(card: dict) -> dict:
    """``configs/metadata.json``: the bundle specification's fields, filled from the model card."""
    v = versions()
    mods, regions = card["input"]["modalities"], card["output"]["regions"]
    spacing = card["input"]["spacing_mm"] or [1.0, 1.0, 1.0]
    patch = card["input"]["patch_size"]
    scores = {f"{split}_{name}": value for split, s in (card.get("scores") or {}).items()
              for name, value in (s.get("means") or {}).items() if isinstance(value, (int, float))}
    return {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by brats-pipeline {card['project_version']} from {card['run']}"},
        "monai_version": v["monai"], "pytorch_version": v["torch"], "numpy_version": v["numpy"],
        "optional_packages_version": {"nibabel": v["nibabel"], "scipy": v["scipy"],
                                      "pytorch-ignite": v["pytorch-ignite"]},
        "task": "Glioma segmentation of multimodal brain MRI (BraTS): tumour core, whole tumour, enhancing tumour",
        "description": f"A {', '.join(card['architectures'])} ({card['kind']}) trained with brats-pipeline on "
                       f"{', '.join(MODALITY_NAMES.get(m, m) for m in mods)} at {'x'.join(map(str, spacing))} mm; "
                       f"sliding-window inference on the whole image, labels written on each case's source grid",
        "authors": "brats-pipeline",
        "copyright": "The model's trainer; the code in configs/ and scripts/: Apache-2.0 (LICENSE)",
        "data_source": card["run"],
        "data_type": "nibabel",
        "image_classes": f"{len(mods)} channel data, " + ", ".join(MODALITY_NAMES.get(m, m) for m in mods) +
                         f", resampled to {'x'.join(map(str, spacing))} mm RAS, z-scored over each channel's nonzero "
                         f"voxels",
        "label_classes": _label_classes(card),
        "pred_classes": f"{len(regions)} channels, " + ", ".join(f"{k} {REGION_NAMES.get(r, r)}" for k, r in
                                                                 enumerate(regions)) +
                        f" (sigmoid > {_step(card, 'threshold')['value']:g}, overlapping: ET inside TC inside WT); "
                        "saved as " + _label_classes(card),
        "eval_metrics": scores,
        "intended_use": "Research; not for diagnostic use",
        "references": ["Baid U. et al. The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and "
                       "Radiogenomic Classification. arXiv:2107.02314"],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": len(mods),
                "spatial_shape": list(patch), "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(k): MODALITY_NAMES.get(m, m) for k, m in enumerate(mods)}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": len(regions),
                "spatial_shape": list(patch), "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {str(k): REGION_NAMES.get(r, r) for k, r in enumerate(regions)}}},
        },
    }


README = """# BraTS glioma segmentation ({architectures})

Exported by brats-pipeline {version} from `{run}` ({kind}).

## Input

One folder per case, or every case's files side by side: `<id>_t1.nii.gz, <id>_t1ce.nii.gz, <id>_t2.nii.gz,
<id>_flair.nii.gz` (BraTS 2021) or `<id>-t1n.nii.gz, <id>-t1c.nii.gz, <id>-t2w.nii.gz, <id>-t2f.nii.gz` (BraTS
2023+). This model reads {modalities}, skull-stripped, each case's images on one grid.

## Run

With MONAI, nibabel, scipy and pytorch-ignite installed, from this folder or from any other with the
configuration's path (MONAI's runner puts this folder on the import path, and the files are found from there):

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT

writes `OUT/<id>.nii.gz` on each case's source grid, in {labels} label values; `--labels brats2023` (or
`brats2021`) writes another numbering. Every case is read and checked before inference: a case that cannot be
read (a modality missing, a truncated or damaged file, a 4D image, images on different grids) is named on stderr,
the others are predicted, and the run ends with status 1. Files already in OUT are left as they are and named
(`--overwrite True` replaces them); an OUT inside IN, or one that cannot be written, is one line before any case
is read.

## Steps

`models/model-card.json` lists every step; in short: RAS, {spacing} mm (bilinear), crop to the voxels nonzero
in any modality plus {margin} voxels, z-score over nonzero voxels per channel, sliding window of
{roi} (overlap {overlap}, {blending} blending), sigmoid, probabilities resampled back to the source grid
(MONAI's Invertd, bilinear), threshold {threshold}, regions nested as BraTS labels, then the postprocessing
rules the card records ({rules}).

## Scores

{scores}
"""

LICENSE = """The configuration and scripts of this bundle (configs/, scripts/, docs/) were written by brats-pipeline
and are licensed under the Apache License, Version 2.0: https://www.apache.org/licenses/LICENSE-2.0

The model weights (models/) were trained by whoever ran the training named in configs/metadata.json, on data
with its own terms (the BraTS data's terms of use, for BraTS data): they set the terms of the weights.
"""


def _readme(card: dict) -> str:
    sw = _step(card, "sliding window")
    rules = card.get("postprocessing")
    scores = "\n".join(f"- {split} ({s.get('cases')} cases): " + ", ".join(
        f"{k} {v:.3f}" for k, v in (s.get("means") or {}).items() if isinstance(v, (int, float)))
        for split, s in (card.get("scores") or {}).items()) or "No evaluation was recorded with the run."
    return README.format(
        architectures=", ".join(card["architectures"]), version=card["project_version"], run=card["run"],
        kind=card["kind"], modalities=", ".join(card["input"]["modalities"]),
        labels=card["output"]["label_convention"] or "brats2021", margin=card["input"]["crop_margin"],
        spacing="x".join(map(str, card["input"]["spacing_mm"] or [1, 1, 1])), roi="x".join(map(str, sw["roi_size"])),
        overlap=sw["overlap"], blending=sw["mode"], threshold=_step(card, "threshold")["value"],
        rules=json.dumps({k: v for k, v in rules.items() if k in ("min_component_mm3", "et_relabel_below_mm3")})
        if rules else "none", scores=scores)


def write_bundle(folder: Path, write_model, card: dict) -> Path:
    """The bundle in ``folder`` (made if missing; its own files replaced, anything else left): ``write_model(path)``
    writes the TorchScript network, ``card`` is its model card (train.export.model_card). Returns the card's file,
    ``models/model-card.json``."""
    for sub in ("configs", "models", "scripts", "docs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    write_model(folder / "models" / "model.ts")
    card_file = folder / "models" / "model-card.json"
    card_file.write_text(json.dumps(card, indent=2) + "\n")
    (folder / "configs" / "inference.json").write_text(json.dumps(inference_config(card), indent=2) + "\n")
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata(card), indent=2) + "\n")
    shutil.copyfile(SCRIPT, folder / "scripts" / "brats.py")
    (folder / "scripts" / "__init__.py").write_text("from . import brats  # noqa: F401 (scripts.brats)\n")
    (folder / "docs" / "README.md").write_text(_readme(card))
    (folder / "LICENSE").write_text(LICENSE)
    return card_file
