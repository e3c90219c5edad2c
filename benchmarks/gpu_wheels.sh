#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu.sh installs on a GPU machine without one.
# That machine runs Python 3.12 on x86-64 and already has torch, numpy, scipy, pandas, scikit-learn, matplotlib,
# psutil, tensorboard and tqdm, so only what it lacks is fetched, at the versions this project is tested with.
# RACE=1 also fetches nnU-Net v2 and what it needs there into DIR/race (the torchvision built for that machine's
# torch 2.11; the rest at the versions the peers extra resolves to here), for RACE=1 bash benchmarks/gpu.sh.
# Usage: bash benchmarks/gpu_wheels.sh [DIR]   (default .whl)
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
pkgs=(monai==1.6.1 nibabel==5.4.2 nilearn==0.14.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
      google-crc32c==1.9.0 dask==2026.8.0 distributed==2026.8.0 cloudpickle==3.1.3 fsspec==2026.9.0 toolz==1.2.0
      partd==1.4.2 locket==1.0.0 zict==3.0.0 tblib==3.2.2 tornado==6.6.1 einops==0.8.2 surface-distance==0.1
      pytest-xdist==3.8.0 execnet==2.1.2 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0 panoptica==2.1.7
      connected-components-3d==3.29.0 plotly==5.24.1 ruamel.yaml==0.19.1 tenacity==9.2.1 batchgeneratorsv2==0.3.6
      batchgenerators==0.25.5 future==1.0.0 unittest2==1.1.0 traceback2==1.4.0 linecache2==1.0.0)
fetch() {  # fetch DIR PACKAGE...: x86-64 wheels for Python 3.12, no dependencies; a package published only as a
  # source archive (pure Python: acvl-utils, batchgenerators, ...) is built into a wheel here instead
  local to=$1; shift
  for p in "$@"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d "$to" "$p" -q 2>/dev/null ||
      python3 -m pip wheel --no-deps -q -w "$to" "$p" || return 1
  done
}
fetch "$dir" "${pkgs[@]}"
if [ "${RACE:-0}" = 1 ]; then
  fetch "$dir/race" acvl-utils==0.2.6 annotated-types==0.8.0 anyio==4.16.0 argparse==1.4.0 batchgenerators==0.25.5 \
    batchgeneratorsv2==0.3.6 blosc2==4.14.1 click==8.5.1 connected-components-3d==3.29.0 \
    dynamic-network-architectures==0.4.4 future==1.0.0 graphviz==0.21 h11==0.16.0 hf-xet==1.8.0 httpcore==1.0.9 \
    httpcore2==2.16.2 httpx==0.28.1 httpx2==2.16.2 huggingface-hub==2.4.0 imagecodecs==2026.3.6 imageio==2.38.2 \
    importlib-resources==7.1.0 lazy-loader==0.6 linecache2==1.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 \
    msgpack==1.2.4 ndindex==1.10.1 nnunetv2==2.8.1 numexpr==2.14.2 pydantic==2.12.5 pydantic-core==2.41.5 \
    pygments==2.21.0 rich==13.9.4 safetensors==0.8.0 scikit-image==0.26.0 seaborn==0.13.2 simpleitk==2.5.7 \
    tifffile==2026.3.3 timm==1.0.22 torchvision==0.26.0 traceback2==1.4.0 truststore==0.10.5 \
    typing-inspection==0.4.5 unittest2==1.1.0 yacs==0.1.8 zipp==4.1.2
fi
# medpy (the tests compare HD95 with it) ships only as a source archive: build its pure-Python wheel here
python3 -m pip wheel --no-deps -q -w "$dir" medpy==0.5.2
ls "$dir" | wc -l
