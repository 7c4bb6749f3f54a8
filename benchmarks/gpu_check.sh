#!/usr/bin/env bash
# The GPU check (issue 25), made for the GPU machine we can get: no package index, 64 MiB
# of files per command, 15 minutes of device time. It uses that machine's own torch,
# torchvision, CuPy, transformers and onnxruntime (CPU), installs only cvserve and the few
# small packages its image lacks from the wheels brought along (benchmarks/gpu_wheels.sh
# prepares benchmarks/gpu_kit here: carry it), and in one command (< 9 minutes):
#   1. checks the GPU, torch's CUDA, torchvision's nvJPEG and the kit, failing fast;
#   2. builds resnet50 and vit-base (ONNX on the CPU, then model.pt2, both verified);
#   3. runs the torch runtime's GPU tests;
#   4. measures (benchmarks/gpu_check.py): DNN alone, batch 1..256; end to end with CPU
#      and GPU preprocessing, medium and large photos, concurrency 1..256; the stage
#      breakdown of one medium request per path;
# and writes one JSON ($OUT, default benchmarks/results/gpu_check.json).
#
#   bash benchmarks/gpu_wheels.sh                                   # here, once
#   bash benchmarks/gpu_check.sh                                    # there (device tool:
#        carry ["benchmarks/gpu_kit"], OUT=$OUT/gpu_check.json)
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh OUT.json
#                                                                   # the dry run, here
# GPU_CHECK_QUICK=1: small counts (batch 1,8; concurrency 1,8; 1 s points) for a rehearsal.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT_JSON:-benchmarks/results/gpu_check.json}}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
KIT="${GPU_KIT:-benchmarks/gpu_kit}"
CACHE="${CVSERVE_CACHE:-$(mktemp -d)/cache}"
SITE="${GPU_CHECK_SITE:-$(mktemp -d)/site}"
MODELS="${GPU_CHECK_MODELS:-resnet50,vit-base}"
PY=python3
t_start=$(date +%s)
say() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - t_start ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

# --- 1. what must be there -----------------------------------------------------------------
[ -d "$KIT/wheels" ] && [ -d "$KIT/data/images/medium" ] \
  || die "no $KIT (run benchmarks/gpu_wheels.sh here and carry $KIT)"
if [ "$DEVICE" != cpu ]; then
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: this machine has no NVIDIA driver"
  say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
fi
$PY - "$DEVICE" <<'EOF' || die "this Python's torch cannot run the check (above)"
import sys
import torch
dev = sys.argv[1]
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      file=sys.stderr)
if dev != "cpu":
    assert torch.cuda.is_available(), "torch sees no GPU"
    print("gpu", torch.cuda.get_device_name(), file=sys.stderr)
    import torchvision  # nvJPEG decode for --preprocess gpu
    print("torchvision", torchvision.__version__, file=sys.stderr)
EOF

# --- 2. cvserve and the small packages the image lacks, from the kit (no index) ------------
# The kit is made for CPython 3.12 (the GPU machine's); a wheel built for another Python
# (the dry run here) is left out, and the package this machine has is used instead.
tag=$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheels=()
for w in "$KIT"/wheels/*.whl; do
  case "$(basename "$w")" in
    *-cp3*-cp3*) [[ "$(basename "$w")" == *"-$tag-$tag-"* ]] || { say "skipping $(basename "$w") (not $tag)"; continue; } ;;
  esac
  wheels+=("$w")
done
say "installing ${#wheels[@]} wheels into $SITE (--no-index --no-deps)"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$SITE" "${wheels[@]}" || die "pip could not install the kit's wheels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY -c 'import cvserve.cli, cvserve.runtime.torchrt, cvserve.serving.server' \
  || die "cvserve does not import with this machine's packages (above)"

# --- 3. the models (ONNX on the CPU, then the .pt2; in parallel) ----------------------------
say "building $MODELS with their .pt2 into $CACHE"
pids=()
for m in ${MODELS//,/ }; do
  timeout 300 $PY -m cvserve models build "$m" --pt2 --cache-dir "$CACHE" >"$CACHE.$m.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { tail -20 "$CACHE".*.log >&2; die "a model build failed"; }; done
say "built: $(ls "$CACHE/models" | tr '\n' ' ')"

# --- 4. the torch runtime's GPU tests (skipped in the dry run: they need a GPU) ----------------
if [ "$DEVICE" != cpu ] && $PY -c 'import pytest' 2>/dev/null; then
  say "GPU tests"
  CVSERVE_DATA="$KIT/data" timeout 150 $PY -m pytest -q -x -p no:cacheprovider -m gpu \
    tests/runtime/test_torchrt.py tests/images/test_gpu_torch.py >"$CACHE.pytest.log" 2>&1 \
    || { tail -30 "$CACHE.pytest.log" >&2; say "GPU tests FAILED (measuring anyway)"; }
  tail -1 "$CACHE.pytest.log" >&2
fi

# --- 5. measurements: one JSON ------------------------------------------------------------------
ARGS=(--device "$DEVICE" --models "$MODELS" --photos "$KIT/data/images" --cache "$CACHE" --out "$OUT")
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  ARGS+=(--batches 1,8 --concurrency 1,8 --dnn-seconds 0.5 --duration 1 --warmup 0.5)
fi
say "measuring: benchmarks/gpu_check.py ${ARGS[*]}"
$PY benchmarks/gpu_check.py "${ARGS[@]}" || die "the measurements failed (above)"
say "done: $OUT"
