"""``python -m train export --format brats-submission``: the build context of a BraTS 2025 submission image. The
organisers run it with ``--network none`` and a GPU, ``/input`` read-only holding the cases, and collect
``/output/<id>.nii.gz`` in BraTS 2023+ labels::

    Dockerfile     a CUDA runtime base, only the inference dependencies (torch, MONAI, nibabel, scipy,
                   pytorch-ignite, pinned to the versions that exported the model), the bundle, the entry point
    predict.py     the entry point (--input /input --output /output): MONAI's bundle runner on the bundle
    bundle/        the MONAI bundle (train.bundle), the model and its card in bundle/models/
    README.md      how to build, test and push the image

The image is one path with the bundle: the same files, the same labels (in 2023+ values).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .bundle import versions, write_bundle

ENTRY = Path(__file__).with_name("bundle_scripts") / "predict.py"
BASE = "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04"
TORCH_INDEX = "https://download.pytorch.org/whl/cu126"


def _pins() -> dict:
    """Each inference package's version here without its local build tag (2.13.0+cpu: 2.13.0), None where it is
    not installed (then unpinned)."""
    return {n: None if v == "unknown" else v.split("+")[0] for n, v in versions().items()}


def dockerfile() -> str:
    """The Dockerfile: a CUDA runtime base, a virtual environment with the inference dependencies pinned to this
    environment's versions (torch from PyTorch's CUDA index), the bundle and the entry point."""
    pins = _pins()
    others = " ".join(f"{n}=={v}" if v else n for n, v in pins.items() if n != "torch")
    return f"""# BraTS 2025 submission: docker build -t NAME . (README.md: how to test and push)
ARG BASE={BASE}
FROM ${{BASE}}
ARG TORCH_INDEX={TORCH_INDEX}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \\
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN pip install --no-cache-dir torch{'==' + pins['torch'] if pins['torch'] else ''} --index-url ${{TORCH_INDEX}} \\
    && pip install --no-cache-dir {others}
COPY bundle /opt/brats/bundle
COPY predict.py /opt/brats/predict.py
ENTRYPOINT ["python", "/opt/brats/predict.py", "--input", "/input", "--output", "/output"]
"""


README = """# BraTS 2025 submission image

Built from a brats-pipeline run ({run}); `bundle/models/model-card.json` describes the model.

## Build

    docker build -t brats-submission .

(`--build-arg BASE=...` and `--build-arg TORCH_INDEX=...` choose another CUDA base image and the matching torch
build; the default is {base} with {index}.)

## Test

As the organisers run it: no network, a GPU, the cases read-only in `/input`, the predictions in `/output`:

    docker run --rm --network none --gpus all -v /path/to/cases:/input:ro -v /path/to/out:/output brats-submission

`/input` holds `<id>-t1n.nii.gz <id>-t1c.nii.gz <id>-t2w.nii.gz <id>-t2f.nii.gz` per case, side by side or one
folder per case; `/output/<id>.nii.gz` are written in BraTS 2023+ labels (1 NETC, 2 SNFH, 3 ET; 4 RC where the
model predicts it), on each case's own grid. A case that cannot be read is named on stderr, the others are
predicted, and the exit status is 1. Without docker: `python predict.py --input CASES --output OUT` with the
packages of the Dockerfile installed.

## Push

    docker tag brats-submission REGISTRY/NAME:TAG
    docker push REGISTRY/NAME:TAG

then submit that image as the challenge's instructions say (they name the registry: Synapse's, for BraTS).
"""


def write_submission(folder: Path, write_model, card: dict) -> Path:
    """The build context in ``folder`` (made if missing; its own files replaced, anything else left): the bundle in
    ``folder/bundle`` (``write_model`` and ``card`` as for train.bundle.write_bundle), the entry point, the
    Dockerfile and the README. Returns the card's file (train.bundle.write_bundle)."""
    card_file = write_bundle(folder / "bundle", write_model, card)
    shutil.copyfile(ENTRY, folder / "predict.py")
    (folder / "Dockerfile").write_text(dockerfile())
    (folder / "README.md").write_text(README.format(run=card["run"], base=BASE, index=TORCH_INDEX))
    return card_file
