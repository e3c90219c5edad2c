"""Exported models (``python -m train export``) as a loaded run: ``evaluate predict --model FILE`` predicts with an
ONNX file through onnxruntime (the ``onnx`` extra) or a TorchScript file through torch, with the preprocessing,
sliding window, postprocessing and mapping back to the source that its ``model-card.json`` records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from train.runs import LoadedRun, RunError

ONNX_HINT = "pip install -e '.[onnx]' (onnxruntime)"


class OnnxNet(torch.nn.Module):
    """An ONNX network run by onnxruntime on the CPU, called as a torch module (tensors in and out)."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunError(f"{path}: an ONNX model needs onnxruntime: {ONNX_HINT}") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.session.run(None, {self.input: x.detach().to("cpu", torch.float32).numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(y)).to(x.device)


def resolve_model(path: Path) -> Path:
    """``--model``: a model file as given; a folder: the one exported model inside it (a model file with its card
    beside it), or an error naming what the folder holds."""
    from train.export import SUFFIXES, card_path

    if not path.is_dir():
        return path
    models = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    carded = [p for p in models if card_path(p).is_file()]
    if len(carded) == 1:
        return carded[0]
    found = ", ".join(p.name + ("" if p in carded else " (no card)") for p in models) or "no model file"
    raise RunError(f"--model {path} is a folder holding {found}: name the model file")


def read_card(path: Path) -> dict:
    """The model card beside an exported model file (train.export.card_path), checked to describe that file."""
    from train.export import card_path

    card_file = card_path(path)
    if not path.is_file():
        raise RunError(f"--model {path}: no such file (python -m train export writes one)")
    if not card_file.is_file():
        raise RunError(f"--model {path}: no {card_file.name} beside it; keep the card that 'python -m train export' "
                       f"wrote with the model")
    try:
        card = json.loads(card_file.read_text())
        named, fmt = card["file"], card["format"]
        card["training"]["config"], card["preprocessing"]  # noqa: B018 (present)
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{card_file} is damaged ({type(e).__name__}: {e}): export the run again") from None
    if named != path.name:
        raise RunError(f"{card_file} describes {named}, not {path.name}: keep each model with its own card")
    if fmt not in ("onnx", "torchscript"):
        raise RunError(f"{card_file}: unknown format {fmt!r}")
    return card


def load_exported(path: str | Path, device="cpu") -> LoadedRun:
    """An exported model as a LoadedRun: one network, the training configuration and preprocessing its card
    records (float32: an exported network has no autocast)."""
    from train.config import TrainConfig

    path = resolve_model(Path(path))
    card = read_card(path)
    cfg = TrainConfig.from_dict({**card["training"]["config"], "amp": False})
    if card["format"] == "onnx":
        if torch.device(device).type != "cpu":
            raise RunError(f"--model {path}: ONNX models run on the CPU here (onnxruntime); pass --device cpu, or "
                           f"export with --format torchscript for a GPU")
        net = OnnxNet(path)
    else:
        net = torch.jit.load(str(path), map_location=device).eval()
    return LoadedRun([net], cfg, [path], card["preprocessing"], f"exported {card['format']} model ({path.name})",
                     [cfg], card)


def card_rules(run: LoadedRun, convention: str, regions):
    """The postprocessing an exported model's card carries (None: it has none). A postprocessing.json beside the
    model that differs from it is an error naming both: the card's rules are the model's."""
    from train.export import card_path

    from .postprocess import FILE, rules_from

    model = run.checkpoints[0]
    record, beside = run.card.get("postprocessing"), model.parent / FILE
    if beside.exists():
        try:
            other = json.loads(beside.read_text())
        except ValueError:
            other = None
        if other != record:
            raise RunError(f"{beside} differs from the postprocessing in {card_path(model)}: the card's rules are the "
                           f"model's; remove {beside.name} or export the run again")
    return rules_from(record, card_path(model), convention, regions) if record else None
