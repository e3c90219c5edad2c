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


def read_card(path: Path) -> dict:
    """The model card beside an exported model file, checked to describe that file."""
    from train.export import CARD

    card_path = path.parent / CARD
    if not path.is_file():
        raise RunError(f"--model {path}: no such file (python -m train export writes one)")
    if not card_path.is_file():
        raise RunError(f"--model {path}: no {CARD} beside it; keep the card that 'python -m train export' wrote "
                       f"with the model")
    try:
        card = json.loads(card_path.read_text())
        named, fmt = card["file"], card["format"]
        card["training"]["config"], card["preprocessing"]  # noqa: B018 (present)
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{card_path} is damaged ({type(e).__name__}: {e}): export the run again") from None
    if named != path.name:
        raise RunError(f"{card_path} describes {named}, not {path.name}: keep each model with its own card")
    if fmt not in ("onnx", "torchscript"):
        raise RunError(f"{card_path}: unknown format {fmt!r}")
    return card


def load_exported(path: str | Path, device="cpu") -> LoadedRun:
    """An exported model as a LoadedRun: one network, the training configuration and preprocessing its card
    records (float32: an exported network has no autocast)."""
    from train.config import TrainConfig

    path = Path(path)
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
                     [cfg])
