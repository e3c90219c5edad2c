"""Put on PYTHONPATH for nnU-Net's commands only (``benchmarks.peers``), never imported by the project.

PyPI's torchvision wheels are built against CUDA torch. Beside a CPU build of torch their compiled operators do not
load, and ``import torchvision`` then fails on its two unguarded fake-kernel registrations (``torchvision::nms``,
``torchvision::qnms``): "operator torchvision::nms does not exist". nnU-Net's trainer lookup imports every trainer
module, one of them timm, and timm imports torchvision's Python layers (never nms). Where the compiled operators do
not load, the two schemas are declared here so the import succeeds; calling them would still fail, loudly.
"""

import importlib.util

try:
    _spec = importlib.util.find_spec("torchvision")
    if _spec is not None and _spec.submodule_search_locations:
        from pathlib import Path

        import torch

        _lib = next(Path(list(_spec.submodule_search_locations)[0]).glob("_C*.so"), None)
        try:
            if _lib is None:
                raise OSError("no compiled torchvision operators")
            torch.ops.load_library(str(_lib))
        except OSError:
            for _op in ("nms", "qnms"):
                torch.library.define(f"torchvision::{_op}",
                                     "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:  # never stop an interpreter from starting
    pass
