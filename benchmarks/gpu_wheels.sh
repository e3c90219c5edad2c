#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu.sh installs on a GPU machine without one
# (Python 3.12, x86-64, which already has torch, tensorboard, tqdm and scikit-learn).
# Usage: bash benchmarks/gpu_wheels.sh [DIR]   (default .whl)
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
pkgs=(monai nibabel "zarr>=3" numcodecs donfig google-crc32c "dask[distributed]" distributed cloudpickle fsspec
      partd locket toolz pyyaml click importlib_metadata zipp msgpack psutil sortedcontainers tblib tornado zict
      jinja2 markupsafe urllib3 packaging typing_extensions matplotlib contourpy cycler fonttools kiwisolver
      pillow pyparsing python-dateutil six scipy nilearn joblib lxml pandas requests charset_normalizer idna
      certifi narwhals)
for p in "${pkgs[@]}"; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dir" "$p" -q
done
ls "$dir" | wc -l
