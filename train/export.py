"""``python -m train export``: a trained run as a file that runs without this project's training code (ONNX for
onnxruntime and any ONNX runtime, or TorchScript for torch alone), with ``model-card.json`` beside it saying
what it expects and what it gives.

The exported network takes a batch of preprocessed patches (B, C, X, Y, Z) of the run's patch size, float32, and
gives logits (B, R, X, Y, Z) of the run's regions (sigmoid > 0.5 is a region). An ensemble (``--ensemble``: the
folds of a k-fold run) is exported as one network whose output is the logit of its members' mean probability, so
the sigmoid of the output is what ``evaluate --ensemble`` averages. ``evaluate predict --model FILE`` predicts raw
cases with it: the same preprocessing, sliding window and mapping back to the source as a run folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .export_cli import FOLDER_FORMATS, FORMATS  # noqa: F401 (the formats, named where the parser is)
from .options import training_command
from .runfolder import read_evaluations, read_rules

SUFFIXES = {".onnx": "onnx", ".ts": "torchscript", ".pt": "torchscript"}  # an --out that names a model file
CARD_VERSION = 1


class ExportError(ValueError):
    """A run that cannot be exported, or an exported model that cannot be used; the message says why."""


class EnsembleNet(torch.nn.Module):
    """Several networks as one: the logit of their mean sigmoid probability (one network: its own logits)."""

    def __init__(self, models):
        super().__init__()
        self.members = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        p = torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(0).clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)


def card_path(model: str | Path) -> Path:
    """The card of an exported model file: ``<stem>-card.json`` beside it (model.onnx: model-card.json)."""
    model = Path(model)
    return model.with_name(f"{model.stem}-card.json")


def _destination(out: str | None, run_dir: Path, fmt: str) -> Path:
    """The model file to write: ``--out`` itself where it names a model file (an .onnx, .ts or .pt name that is
    not a folder), else the format's file name inside the ``--out`` folder (default RUN/export)."""
    if out and Path(out).suffix in SUFFIXES and not Path(out).is_dir():
        path = Path(out)
        if SUFFIXES[path.suffix] != fmt:
            raise ExportError(f"--out {out}: a {path.suffix} file is {SUFFIXES[path.suffix]}, not --format {fmt}; "
                              f"name it {path.stem}{Path(FORMATS[fmt]).suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    folder = Path(out) if out else run_dir / "export"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / FORMATS[fmt]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("brats-pipeline")
    except PackageNotFoundError:
        return "unknown"


def _scores(run_dir: Path) -> dict:
    """The scorer's means from the run's evaluations (train.runfolder.read_evaluations), per evaluation."""
    return {stem: {"cases": data.get("cases"), "model": data.get("models"),
                   "means": {k: v.get("mean") if isinstance(v, dict) else v for k, v in data["scores"].items()}}
            for stem, data in read_evaluations(run_dir).items()}


def recipe(cfg, params: dict, convention: str | None, rules: dict | None) -> list[dict]:
    """Every step from the source files to the label map, as 'evaluate predict --model' takes them, with the
    libraries' own names for each: what a predictor written from the card alone must do."""
    from store.conventions import LABEL_CONVENTIONS
    from store.records import SOURCE_GRID

    conv, pad = LABEL_CONVENTIONS.get(convention or "", {}), SOURCE_GRID["padding_mode"]
    return [
        {"step": "read", "what": "one 3D NIfTI per modality of input.modalities, in that order, on one grid (the same "
                                 "shape and affine); zero is background (skull-stripped)"},
        {"step": "orientation", "what": "RAS", "library": "monai.transforms.Orientation(axcodes='RAS')"},
        {"step": "spacing", "mm": params.get("spacing_mm"), "interpolation": "bilinear", "padding_mode": pad,
         "library": f"monai.transforms.Spacing(pixdim=mm, mode='bilinear', padding_mode='{pad}')"},
        {"step": "crop", "what": "the resampled image, to the bounding box of the voxels nonzero in any modality, "
                                 "widened by crop_margin voxels on each side within the grid (where the source is "
                                 "axis-aligned at the spacing, orientation and spacing only permute and flip it: the "
                                 "same box cropped on the source grid first gives the same image)",
         "crop_margin": params.get("crop_margin"),
         "library": "monai.transforms.CropForeground(select_fn=lambda x: x != 0, margin=crop_margin, "
                    "allow_smaller=True)"},
        {"step": "normalisation", "what": "per channel, z-score over its nonzero voxels (population std; a std of 0 "
                                          "counts as 1); zero voxels stay 0",
         "library": "monai.transforms.NormalizeIntensity(nonzero=True, channel_wise=True)"},
        {"step": "sliding window", "roi_size": list(cfg.patch_size), "overlap": cfg.overlap, "mode": cfg.blending,
         "padding_mode": "constant", "cval": 0.0, "sw_batch_size": cfg.sw_batch_size,
         "library": "monai.inferers.sliding_window_inference (its defaults otherwise)"},
        {"step": "activation", "what": "sigmoid of each output channel (regions, which overlap: not a softmax)"},
        {"step": "test-time augmentation", "what": "none by default; with evaluate predict --tta the mean of the "
                                                   "probabilities over the 8 mirrorings of the three spatial axes"},
        {"step": "to the source grid", "what": "the probabilities uncropped into the resampled grid (0 outside the "
                                               "crop), then resampled onto the source affine and shape, "
                                               "padded as the spacing step pads (the spacing and orientation steps "
                                               "inverted, as MONAI's Invertd inverts them)",
         "interpolation": SOURCE_GRID["interpolation"], "padding_mode": pad,
         "library": f"monai.transforms.SpatialResample(mode='{SOURCE_GRID['interpolation']}', padding_mode='{pad}')"},
        {"step": "threshold", "value": cfg.threshold,
         "what": f"a voxel is in a region where its probability is above {cfg.threshold:g}"},
        {"step": "labels", "what": "nested as BraTS defines them: WT voxels get the oedema value, then TC voxels the "
                                   "necrosis value, then ET voxels the enhancing value (ET inside TC inside WT)",
         "values": {k: conv[k] for k in ("edema", "necrosis", "enhancing", "cavity") if k in conv},
         "label_convention": convention},
        {"step": "postprocessing", "rules": (rules or {}).get("rules", []),
         "what": "per region (WT, TC, ET, outer first), predicted 26-connected components under min_component_mm3 "
                 "removed from it and the regions inside it, never a case's largest; then ET under "
                 "et_relabel_below_mm3 in total relabelled as necrosis (non-enhancing core)"},
    ]


def model_card(run_dir: Path, run, fmt: str, file_name: str, ensemble: bool) -> dict:
    """What the exported model expects (modalities in order, spacing, orientation, normalisation, patch size) and
    gives (regions, label convention), with the run's scores, postprocessing, command and the project version."""
    cfg = run.config
    params = run.preprocessing.get("params", {})
    rules = read_rules(run_dir)
    command = training_command(run.configs[0])
    return {
        "card_version": CARD_VERSION, "format": fmt, "file": file_name, "project_version": _version(),
        "run": str(run_dir), "kind": run.kind, "architectures": sorted({c.model for c in run.configs}),
        "input": {"name": "image", "modalities": list(cfg.modalities), "layout": "B, C, X, Y, Z (float32)",
                  "patch_size": list(cfg.patch_size), "spacing_mm": params.get("spacing_mm"),
                  "orientation": params.get("orientation", "RAS"), "normalization": params.get("normalization"),
                  "crop_margin": params.get("crop_margin")},
        "output": {"name": "logits", "regions": list(cfg.regions),
                   "layout": f"B, R, X, Y, Z (float32, sigmoid > {cfg.threshold:g})",
                   "label_convention": run.preprocessing.get("label_convention")},
        "inference": {"sliding_window_overlap": cfg.overlap, "blending": cfg.blending, "threshold": cfg.threshold,
                      "sw_batch_size": cfg.sw_batch_size, "ensemble": ensemble},
        "preprocessing": run.preprocessing,
        "postprocessing": rules,
        "recipe": recipe(cfg, params, run.preprocessing.get("label_convention"), rules),
        "plan": run.plan,
        "scores": _scores(run_dir),
        "training": {"command": command, "config": {**cfg.to_dict(), "amp": False}},
    }


def write_network(net: torch.nn.Module, channels: int, patch, path: Path, fmt: str) -> Path:
    """``net`` (on the CPU) as ``fmt`` at ``path``, written aside then renamed: input "image" (B, channels,
    *patch) float32 with B free, output "logits"."""
    net = net.eval()
    x = torch.zeros(1, channels, *patch)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad():
            if fmt == "torchscript":
                torch.jit.trace(net, x, check_trace=False).save(str(tmp))
            else:
                torch.onnx.export(net, (x,), str(tmp), input_names=["image"], output_names=["logits"],
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        tmp.replace(path)
    finally:  # a failed export leaves nothing half-written
        tmp.unlink(missing_ok=True)
    return path


def _staged(folder: Path, overwrite: bool, write) -> Path:
    """Run ``write(staging_folder)``, then move what it wrote into ``folder``: a file already there is replaced only
    with ``overwrite`` (else an ExportError naming it, and nothing moved), files of other names are left; the
    staging folder is removed on every exit path. Returns ``write``'s result, as a path inside ``folder``."""
    import shutil
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
    try:
        result = write(stage)
        files = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
        there = [folder / f for f in files if (folder / f).exists()]
        if there and not overwrite:
            raise ExportError(f"--out {folder}: {there[0]}" + (f" and {len(there) - 1} more" if len(there) > 1 else "")
                              + " already there; pass --overwrite to replace the export's files")
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            (stage / f).replace(folder / f)
        return folder / Path(result).relative_to(stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export_run(run_dir: str, fmt: str, ensemble: bool = False, out: str | None = None,
               overwrite: bool = False) -> tuple[Path, Path]:
    """Write the run's network (``fmt``: onnx or torchscript) and its model card: into the folder ``out`` (default
    RUN/export), or as the file ``out`` names (its card beside it, card_path); returns (model file, card). The
    card carries the run's postprocessing, which 'evaluate predict --model' applies. ``fmt`` bundle or
    brats-submission: that folder (``out``, default RUN/export/<fmt>; train.bundle, train.submission), returned
    as (folder, the card of the TorchScript network inside it). A file already there is replaced only with
    ``overwrite`` (checked before anything is written: ``ExportError``)."""
    from .runs import RunError, load_run

    if fmt not in FORMATS and fmt not in FOLDER_FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join([*FORMATS, *FOLDER_FORMATS])}")
    if fmt in FOLDER_FORMATS and out and Path(out).suffix in SUFFIXES:
        raise ExportError(f"--out {out}: --format {fmt} writes a folder; name a folder, not a {Path(out).suffix} file")
    run_dir = Path(run_dir)
    try:
        run = load_run(run_dir, ensemble, "cpu")
    except RunError as e:
        raise ExportError(f"cannot export: {e}") from None
    patches = {tuple(c.patch_size) for c in run.configs}
    if len(patches) != 1:
        raise ExportError(f"--ensemble of models with different patch sizes {sorted(patches)} cannot be one network: "
                          f"export each run by itself")

    def write_model(path: Path, kind: str = "torchscript") -> Path:
        return write_network(EnsembleNet(run.models), len(run.config.modalities), run.config.patch_size, path, kind)

    if fmt in FOLDER_FORMATS:
        from .bundle import write_bundle
        from .submission import write_submission

        folder = Path(out) if out else run_dir / "export" / FOLDER_FORMATS[fmt]
        card = model_card(run_dir, run, "torchscript", "model.ts", bool(ensemble))
        writer = write_bundle if fmt == "bundle" else write_submission
        return folder, _staged(folder, overwrite, lambda stage: writer(stage, write_model, card))
    path = _destination(out, run_dir, fmt)
    card = card_path(path)
    if not overwrite and (there := [p for p in (path, card) if p.exists()]):
        raise ExportError(f"--out: {there[0]} already exists; pass --overwrite to replace it")
    write_model(path, fmt)
    card.write_text(json.dumps(model_card(run_dir, run, fmt, path.name, bool(ensemble)), indent=2) + "\n")
    return path, card


def run_command(a) -> int:
    """``python -m train export`` with its parsed arguments (train.export_cli): the export, its one line."""
    try:
        path, card = export_run(a.run_dir, a.format, a.ensemble, a.out, a.overwrite)
    except (ExportError, FileNotFoundError) as e:
        print(f"python -m train export: error: {e}", file=sys.stderr)
        return 2
    if a.format == "bundle":
        print(f"exported {a.run_dir} -> MONAI bundle {path} (model card {card}); predict with: cd {path} && python -m "
              f"monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT")
    elif a.format == "brats-submission":
        print(f"exported {a.run_dir} -> BraTS submission build context {path}: docker build -t NAME {path} "
              f"({path / 'README.md'} says how to test and push it)")
    else:
        print(f"exported {a.run_dir} -> {path} ({path.stat().st_size / 2**20:.1f} MiB), model card {card}")
    return 0
