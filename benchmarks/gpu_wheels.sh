#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a GPU machine that reaches no package index
# (issue 25): a folder the device tool carries (`carry: ["benchmarks/gpu_kit"]`) holding
#   * wheels/: cvserve itself, and the small dependencies that machine's image lacks
#     (its torch, torchvision, CuPy, transformers, timm, onnxruntime, numpy, Pillow, httpx,
#     rich, PyYAML, onnx, numba ... are used as they are), for CPython 3.12 on x86-64 Linux,
#     at the versions installed here (the ones the tests ran with);
#   * data/images/: the shared data set's medium and large photos (../shared does not
#     travel), laid out as ../shared/data is (CVSERVE_DATA=benchmarks/gpu_kit/data).
# Checks the folder is under 60 MiB (the device tool takes 64 MiB per call, tree included).
#
# Usage: bash benchmarks/gpu_wheels.sh            (needs a package index here, once)
set -euo pipefail
cd "$(dirname "$0")/.."
KIT="${GPU_KIT:-benchmarks/gpu_kit}"
DATA="${CVSERVE_DATA:-../shared/data}"
LIMIT_MIB="${GPU_KIT_LIMIT_MIB:-60}"
# What the image lacks, or holds too old for cvserve's pins (grpcio and protobuf: the
# checked-in gRPC stubs need grpcio >= 1.81.1, protobuf >= 6.33.5).
DEPS="starlette uvicorn redis simplejpeg zlib-ng httptools grpcio protobuf"

rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/data/images"
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w "$KIT/wheels" . >/dev/null
for name in $DEPS; do
  ver=$(python3 -c "from importlib.metadata import version; print(version('$name'))")
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$KIT/wheels" "$name==$ver"
done
for size in medium large; do
  mkdir -p "$KIT/data/images/$size" && cp "$DATA/images/$size/"*.jpg "$KIT/data/images/$size/"
done
mib=$(( $(du -sb "$KIT" | cut -f1) / 1048576 ))
ls -1 "$KIT/wheels"
echo "$KIT: ${mib} MiB ($(ls "$KIT/wheels" | wc -l) wheels, $(find "$KIT/data" -name '*.jpg' | wc -l) photos)"
[ "$mib" -lt "$LIMIT_MIB" ] || { echo "FAILED: $KIT is ${mib} MiB, over ${LIMIT_MIB} MiB" >&2; exit 1; }
