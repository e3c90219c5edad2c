#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu.sh installs on a GPU machine without one.
# That machine runs Python 3.12 on x86-64 and already has torch, numpy, scipy, pandas, scikit-learn, matplotlib,
# psutil, tensorboard and tqdm, so only what it lacks is fetched, at the versions this project is tested with.
# Usage: bash benchmarks/gpu_wheels.sh [DIR]   (default .whl)
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
pkgs=(monai==1.6.1 nibabel==5.4.2 nilearn==0.14.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
      google-crc32c==1.9.0 dask==2026.8.0 distributed==2026.8.0 cloudpickle==3.1.3 fsspec==2026.9.0 toolz==1.2.0
      partd==1.4.2 locket==1.0.0 zict==3.0.0 tblib==3.2.2 tornado==6.6.1 einops==0.8.2)
for p in "${pkgs[@]}"; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d "$dir" "$p" -q
done
# medpy (the tests compare HD95 with it) ships only as a source archive: build its pure-Python wheel here
python3 -m pip wheel --no-deps -q -w "$dir" medpy==0.5.2
ls "$dir" | wc -l
