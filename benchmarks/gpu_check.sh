#!/usr/bin/env bash
# The GPU check (issue 14): on a fresh machine with an NVIDIA GPU, install the `gpu` extra,
# run the GPU tests, and measure, for resnet50 and vit-base:
#   * DNN alone: CudaRuntime.run on one preallocated batch, batch 1..64;
#   * end to end with CPU and with GPU preprocessing, on small/medium/large photos,
#     closed loop at concurrency 1..64 (`cvserve bench --inprocess`);
# and write one JSON (the paper's Figure 4): benchmarks/results/gpu_check.json.
#
# Budget: ~8 minutes of device time in all. Each point is short (2 s measured, 1 s warm-up);
# set GPU_CHECK_QUICK=1 for a smoke run (resnet50, medium photos, concurrency 1 and 16).
# Fails fast, with what is missing, before spending time on anything that cannot work.
#
# Usage: bash benchmarks/gpu_check.sh [OUT.json]
# Not yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu_check.json}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d)}"
DATA="${CVSERVE_DATA:-../shared/data}"
CACHE="${CVSERVE_CACHE:-$HOME/.cache/cvserve}"
t_start=$(date +%s)
say() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - t_start ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

# --- 1. what must be there before anything is installed -------------------------------------
command -v nvidia-smi >/dev/null || die "no nvidia-smi: this machine has no NVIDIA driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$WORK/gpu.txt" \
  || die "nvidia-smi cannot talk to the driver"
say "GPU: $(cat "$WORK/gpu.txt")"
# onnxruntime-gpu 1.31 and cupy-cuda13x are CUDA 13 builds: they need a driver >= 580.
drv=$(head -1 "$WORK/gpu.txt" | cut -d, -f2 | tr -d ' ' | cut -d. -f1)
[ "${drv:-0}" -ge 580 ] || die "driver $drv is too old for CUDA 13 (needs >= 580)"
python3 -c 'import sys; assert sys.version_info >= (3, 11)' || die "needs Python >= 3.11"
[ -d "$DATA/images/medium" ] || die "no test photos at $DATA/images (set CVSERVE_DATA)"

# --- 2. the gpu extra -------------------------------------------------------------------------
# onnxruntime (a core dependency) and onnxruntime-gpu install the same `onnxruntime` Python
# package; whichever was installed last owns the files. Install everything, then remove
# the CPU build and put the GPU build's files back.
say "installing .[gpu,test,zoo] (a registry or PIP_FIND_LINKS wheelhouse must be reachable)"
PIPQ=(python3 -m pip install --quiet --disable-pip-version-check --timeout 20 --retries 1)
"${PIPQ[@]}" -e ".[gpu,test,zoo]" >"$WORK/pip.log" 2>&1 \
  || { tail -20 "$WORK/pip.log" >&2; die "pip could not install the gpu extra (log: $WORK/pip.log)"; }
python3 -m pip uninstall -y --quiet onnxruntime >/dev/null 2>&1 || true
ORT_GPU=$(python3 -c 'from importlib.metadata import version; print(version("onnxruntime-gpu"))')
"${PIPQ[@]}" --force-reinstall --no-deps "onnxruntime-gpu==$ORT_GPU" >>"$WORK/pip.log" 2>&1 \
  || die "could not reinstall onnxruntime-gpu's files (log: $WORK/pip.log)"
# TensorRT's libraries come as a wheel: onnxruntime's TensorRT provider finds them on the
# loader path.
TRT_LIBS=$(python3 -c 'import tensorrt_libs, os; print(os.path.dirname(tensorrt_libs.__file__))' 2>/dev/null || true)
[ -n "$TRT_LIBS" ] && export LD_LIBRARY_PATH="$TRT_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 - <<'EOF' || die "the GPU stack does not load (see above)"
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers(), "no CUDA provider"
import cupy
print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
from nvidia import nvimgcodec
print("nvimgcodec", getattr(nvimgcodec, "__version__", "?"))
EOF

# --- 3. the GPU tests -------------------------------------------------------------------------
say "GPU tests"
timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/runtime/test_cuda.py \
  tests/images/test_gpu.py >"$WORK/pytest.log" 2>&1 \
  || { tail -30 "$WORK/pytest.log" >&2; die "GPU tests failed (log: $WORK/pytest.log)"; }
tail -1 "$WORK/pytest.log" >&2
grep -q "skipped" "$WORK/pytest.log" && grep -E "SKIPPED" "$WORK/pytest.log" >&2 || true

# --- 4. measurements --------------------------------------------------------------------------
MODELS="resnet50 vit-base"; SIZES="small medium large"; CONC="1,4,16,64"; BATCHES="1,2,4,8,16,32,64"
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then MODELS="resnet50"; SIZES="medium"; CONC="1,16"; fi
for m in $MODELS; do
  say "building $m (ONNX, on the CPU)"
  timeout 300 cvserve models build "$m" --cache-dir "$CACHE" >"$WORK/build-$m.log" 2>&1 \
    || { tail -20 "$WORK/build-$m.log" >&2; die "could not build $m"; }
done

say "DNN alone, batch $BATCHES"
timeout 240 python3 - "$WORK/dnn.json" "$CACHE" "$BATCHES" $MODELS <<'EOF' || die "DNN-alone run failed"
import json, statistics, sys, time
import numpy as np
from cvserve.models import store
from cvserve.runtime.cuda import CudaRuntime
from cvserve.runtime.onnx import OrtOptions
out, cache, batches, models = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split(",")], sys.argv[4:]
res = {}
for name in models:
    meta = store.ensure_built(name, cache)
    path = str(store.model_path(meta, cache))
    rt = CudaRuntime(path, OrtOptions(device="cuda", trt_cache=f"{cache}/trt"), max_batch=max(batches))
    row = np.random.default_rng(0).random(tuple(rt.input_shape[1:]), dtype=np.float32).astype(rt.input_dtype)
    buf = np.broadcast_to(row, (max(batches), *row.shape)).copy()
    points = {}
    for b in batches:
        for _ in range(3):
            rt.run(buf[:b])
        times, stages = [], []
        t_end = time.perf_counter() + 1.5
        while time.perf_counter() < t_end or len(times) < 5:
            t0 = time.perf_counter(); rt.run(buf[:b]); times.append(time.perf_counter() - t0)
            stages.append(rt.last_stages)
        med = statistics.median(times)
        points[str(b)] = {"batch_ms": med * 1e3, "images_per_s": b / med, "runs": len(times),
                          **{f"{k}_ms": statistics.median(s[k] for s in stages) * 1e3 for k in ("h2d", "infer", "d2h")}}
        print(name, b, f"{b / med:.0f} img/s", f"{med * 1e3:.2f} ms", file=sys.stderr)
    res[name] = {"providers": rt.providers, "points": points}
json.dump(res, open(out, "w"), indent=1)
EOF

for m in $MODELS; do
  for size in $SIZES; do
    for pre in cpu gpu; do
      say "end to end: $m, $size photos, $pre preprocessing, concurrency $CONC"
      timeout 150 cvserve bench --inprocess --model "$m" --images "$DATA/images/$size" \
        --concurrency "$CONC" --duration 2 --warmup-ms 1000 --cache-dir "$CACHE" \
        --label "$m/$size/$pre" --out "$WORK/e2e-$m-$size-$pre.json" \
        --serve-args "--device cuda --preprocess $pre --max-batch-size 64 --max-delay-ms 2 --trt-cache $CACHE/trt" \
        >"$WORK/e2e-$m-$size-$pre.log" 2>&1 \
        || { tail -20 "$WORK/e2e-$m-$size-$pre.log" >&2; die "end-to-end run $m/$size/$pre failed"; }
    done
  done
done

# --- 5. one JSON -------------------------------------------------------------------------------
python3 - "$WORK" "$OUT" "$(cat "$WORK/gpu.txt")" <<'EOF'
import glob, json, os, platform, sys
from importlib.metadata import version
work, out, gpu = sys.argv[1:4]
doc = {"schema": "cvserve.gpu_check/1", "gpu": gpu, "python": platform.python_version(),
       "versions": {p: version(p) for p in ("onnxruntime-gpu", "cupy-cuda13x", "nvidia-nvimgcodec-cu13")},
       "dnn_alone": json.load(open(f"{work}/dnn.json")), "end_to_end": {}}
for f in sorted(glob.glob(f"{work}/e2e-*.json")):
    doc["end_to_end"][os.path.basename(f)[4:-5]] = json.load(open(f))
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
json.dump(doc, open(out, "w"), indent=1)
print("wrote", out)
EOF
say "done"
