#!/usr/bin/env bash
# GPU benchmarks in one call, for a machine with an NVIDIA GPU and no network: installs what is missing from
# wheels carried beside the project (benchmarks/gpu_wheels.sh makes them), then runs the loader, train (--amp)
# and infer benchmarks on full-size synthetic cases, writing the same JSON as on the CPU to
# benchmarks/results/gpu/ (or $OUT/gpu when $OUT is set). Budget: under 8 minutes.
# Usage: bash benchmarks/gpu.sh [WHEELS_DIR]   (default .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-.whl}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no NVIDIA GPU here"; exit 1; }
missing=$(python3 - <<'PY'
import importlib.util
need = ["monai", "nibabel", "zarr", "numcodecs", "dask", "distributed", "matplotlib", "nilearn", "scipy", "psutil"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing from $wheels: $missing"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}/gpu
mkdir -p "$out"
work=$(mktemp -d)
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
rc=0
timeout 200 python3 -m benchmarks loader --out "$out" --work "$work" || rc=1
timeout 120 python3 -m benchmarks train --amp --out "$out" --work "$work" || rc=1
timeout 120 python3 -m benchmarks infer --amp --out "$out" --work "$work" || rc=1
python3 -c "from benchmarks.table import render; print(render('$out'))"
exit $rc
