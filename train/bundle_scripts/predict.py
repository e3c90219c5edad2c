"""The BraTS 2025 submission's entry point: every case in the input folder (flat ``<id>-t1n.nii.gz``,
``<id>-t1c.nii.gz``, ``<id>-t2w.nii.gz``, ``<id>-t2f.nii.gz`` files, or one folder per case) predicted into
``<output>/<id>.nii.gz`` in BraTS 2023+ label values (1 NETC, 2 SNFH, 3 ET; 4 RC where the model predicts the
resection cavity), by the MONAI bundle beside this file. Uses the GPU when there is one, needs no network, and
writes only into the output folder, never over a file already there (``--overwrite`` replaces them). Every case is
read and checked before inference: a case that cannot be read is named on stderr, the others are predicted, and
the exit status is 1; an output folder inside the input or one that cannot be written is one line before any
case is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent / "bundle"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", default="/input", help="the cases (default /input; only read)")
    p.add_argument("--output", default="/output", help="where <id>.nii.gz are written (default /output; outside "
                   "the input; files already there are left as they are)")
    p.add_argument("--overwrite", action="store_true", help="replace <id>.nii.gz files already in the output")
    a = p.parse_args(argv)
    config = BUNDLE / "configs" / "inference.json"
    regions = json.loads(config.read_text())["regions"]
    sys.path.insert(0, str(BUNDLE))  # the bundle's scripts package
    # MONAI imports matplotlib and (some versions) onnxruntime where they are installed; on import matplotlib writes
    # a font cache under HOME, and onnxruntime a device id under HOME and a file in TMPDIR. Nothing here draws or
    # runs ONNX, and the submission writes only into its output folder.
    for optional in ("matplotlib", "onnxruntime"):
        sys.modules.setdefault(optional, None)
    from monai.bundle import run

    try:
        run(config_file=str(config), bundle_root=str(BUNDLE), dataset_dir=a.input, output_dir=a.output,
            labels="brats2024" if "RC" in regions else "brats2023", overwrite=a.overwrite)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
