#!/usr/bin/env bash
# GPU checks and benchmarks in one call, for a machine with an NVIDIA GPU and no network: installs what is missing
# from wheels carried beside the project (benchmarks/gpu_wheels.sh makes them), runs the tests (the CUDA variants
# of the augmentation and loader tests run only there), then the loader, train (--amp), infer (--amp) and augment
# benchmarks on full-size synthetic cases, writing the same JSON as on the CPU to benchmarks/results/gpu/ (or
# $OUT/gpu when $OUT is set), and a log beside it. Budget: about 8 minutes on a 16-core H100/H200 machine
# (measured: 111 tests 81 s, loader 215 s, train 47 s with both augmentation presets, infer 69 s, augment 93 s);
# MODALITIES=1 adds the modalities experiment with --full (one seed per arm), about 8 minutes more; MODELS=1 the
# architectures at equal wall time (1 minute per run, one seed each), about 6 minutes more. RACE=1 runs the race
# against nnU-Net v2 instead, alone (its figures are wall times): the quick cohort (60 cases) at 1 mm, W = 5 minutes,
# one seed, one side per call: RACE_SYSTEMS=nnunet (the default; with the cohort, the preparation and the probes),
# then RACE_SYSTEMS=ours on the same warm machine (the work folder kept); nnU-Net and what it needs come
# from WHEELS_DIR/race (RACE=1 bash benchmarks/gpu_wheels.sh puts them there: 47 wheels, 123 MB, SimpleITK 51 MB of
# them, more than one call to a machine without network may carry at 64 MiB: carry them in parts to a warm machine,
# RACE_INSTALL_ONLY=1 with each part but the last).
# STAGES picks what runs (default "tests loader train infer augment"); the stage "plan" runs python -m train plan
# on the GPU (bf16) for PLAN_CASES full-size synthetic cases (default 120, so that nnU-Net's 5% cap leaves the batch
# to the budget) at each of PLAN_BUDGETS GB (default "1.5 0.5 16") and trains the first plan for 4 steps, writing the
# plans to $out (about 5 minutes on 16 cores).
# Usage: [STAGES="tests plan"] bash benchmarks/gpu.sh [WHEELS_DIR]   (default .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}  # what an earlier call on this machine installed
wheels=${1:-.whl}
out=${OUT:-benchmarks/results}/gpu
mkdir -p "$out"
exec > >(tee -a "$out/gpu.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU here"; exit 1; }
missing=$(python3 - <<'PY'
import importlib.util
need = ["medpy", "surface_distance", "monai", "nibabel", "nilearn", "zarr", "numcodecs", "dask", "distributed", "matplotlib", "scipy", "psutil",
        "einops", "xdist", "ignite", "fire", "panoptica", "batchgeneratorsv2"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing from $wheels: $missing"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
work=$(mktemp -d)
python3 -c "import torch, monai, zarr, dask; print('torch', torch.__version__, 'monai', monai.__version__, 'zarr', \
zarr.__version__, 'dask', dask.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" || exit 1
rc=0
stages=" ${STAGES:-tests loader train infer augment} "
want() { [[ $stages == *" $1 "* ]]; }
step() {  # step SECONDS NAME COMMAND...: run with a time limit, report its time and status
  local limit=$1 name=$2 t0=$SECONDS; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@"; local s=$?
  echo "=== $name: exit $s after $((SECONDS - t0))s"
  [ $s -eq 0 ] || rc=1
}
if [ "${RACE:-0}" = 1 ]; then
  # nnU-Net's wheels (123 MB) pass what one call carries (64 MiB): carry WHEELS_DIR/race in parts to a warm machine,
  # each call installing the part it carries into /tmp/site (RACE_INSTALL_ONLY=1 stops there), then run the race
  if compgen -G "$wheels/race/*.whl" > /dev/null; then
    echo "installing from $wheels/race"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$wheels"/race/*.whl || exit 1
    [[ :${PYTHONPATH:-}: == *:/tmp/site:* ]] || export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  [ "${RACE_INSTALL_ONLY:-0}" = 1 ] && exit 0
  python3 -c "import nnunetv2" 2>/dev/null || { echo "nnU-Net v2 is not installed: carry $wheels/race first" \
    "(in parts, RACE_INSTALL_ONLY=1)"; exit 1; }
  export PATH=/tmp/site/bin:$PATH
  # one side per call (RACE_SYSTEMS), the work folder kept for the next call on the same warm machine
  step 590 race python3 -m benchmarks nnunet --quick --spacing 1 --budget 5 --seeds 0 \
    --systems ${RACE_SYSTEMS:-nnunet} --out "$out" --work /tmp/brats-race
  exit $rc
fi
# the test files whose assertions run on CUDA where it is present (augmentation, loader cache modes, training
# with AMP, prediction on the device), on 8 processes; the rest of the suite runs on every CPU machine
want tests && step 150 tests env OMP_NUM_THREADS=2 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_augment.py \
  tests/test_loader.py tests/test_train.py tests/test_predict.py tests/test_nnunet_augment.py
want loader && step 240 loader python3 -m benchmarks loader --out "$out" --work "$work"
want train && step 80 train python3 -m benchmarks train --amp --out "$out" --work "$work"
want infer && step 80 infer python3 -m benchmarks infer --amp --out "$out" --work "$work"
want augment && step 240 augment python3 -m benchmarks augment --out "$out" --work "$work"
if want plan; then  # the planner's trial steps measured on the GPU, and a plan trained
  budgets=(${PLAN_BUDGETS:-1.5 0.5 16})
  step 200 plan-cohort bash -c "python3 -m prep synth --out $work/plan-raw --cases ${PLAN_CASES:-120} --workers 16 \
>$work/plan-cohort.log 2>&1 && python3 -m prep build-store --source $work/plan-raw --store $work/plan.zarr \
--workers 16 >>$work/plan-cohort.log 2>&1; s=\$?; tail -4 $work/plan-cohort.log; exit \$s"
  for gb in "${budgets[@]}"; do
    step 200 "plan-${gb}gb" python3 -m train plan --store "$work/plan.zarr" --device cuda --amp --memory "$gb" \
      --out "$out/plan-${gb}gb.json" --overwrite
  done
  step 150 plan-train python3 -m train --plan "$out/plan-${budgets[0]}gb.json" --store "$work/plan.zarr" --run-dir \
    "$work/plan-run" --epochs 1 --steps-per-epoch 4 --max-val-cases 1 --cache gpu --workers 2
fi
# the seed's experiment at 1 mm with 128^3 patches, one seed per arm and a shorter budget: about 8 more minutes,
# so only when asked (MODALITIES=1); its table lands in $out/modalities.md, labelled with the device
if [ "${MODALITIES:-0}" = 1 ]; then
  step 540 modalities python3 -m benchmarks modalities --full --amp --seeds 0 --epochs 12 --out "$out" \
    --work "$work/modalities"
fi
# every architecture with its recipe at equal wall time, one seed each: the GPU rows of docs/experiments.md's Models table
if [ "${MODELS:-0}" = 1 ]; then
  step 480 models python3 -m benchmarks models --seeds 0 --time-limit 1 --out "$out" --work "$work/models"
fi
python3 -c "from benchmarks.table import render; print(render('$out'))"
exit $rc
