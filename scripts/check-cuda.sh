#!/usr/bin/env bash
# Type-checks the CUDA build without a GPU or a system CUDA toolkit: nvcc and the CUDA headers
# come from PyPI's CUDA 13 wheels, installed once into a cached venv (.cache/cuda-venv), and
# `cargo check --features cuda --all-targets` runs against them in its own target directory
# (.cache/cuda-target), so it never invalidates the ordinary debug build.
#
# Why these settings:
# - `nvidia-cuda-nvcc` 13.x: the `-cu12` wheel ships no nvcc binary.
# - CUDARC_CUDA_VERSION=13040: cudarc 0.19 does not know 13.5 (the wheels' current release),
#   and 13.4's API is what we target; it also skips cudarc's probing for an installed toolkit.
# - CUDA_COMPUTE_CAP=90: candle's kernels are compiled for one architecture (Hopper); with no
#   GPU to ask, it must be given.
# `check` compiles every crate, candle's CUDA kernels included (nvcc runs), but links nothing:
# the wheels carry no libcuda (the driver's) and no unversioned .so names, so a full
# `cargo build --features cuda` stops at the final link on a machine without a GPU driver.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.cache/cuda-venv}
TARGET=${CUDA_TARGET_DIR:-.cache/cuda-target}
# Exact versions: CI runs this on every stop, and a new wheel release must not change what it checks.
WHEELS=(nvidia-cuda-nvcc==13.5.37 nvidia-cuda-runtime==13.5.37 nvidia-cublas==13.10.0.20
        nvidia-curand==10.4.5.25 nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-crt==13.5.37)
STAMP="$VENV/.installed-13.5.37"

if [ ! -f "$STAMP" ]; then
    test -x "$VENV/bin/python" || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${WHEELS[@]}"
    touch "$STAMP"
fi

NVCC=$(find "$(pwd)/$VENV" -path '*/bin/nvcc' -type f | head -n 1)
if [ -z "$NVCC" ]; then
    echo "check-cuda: no nvcc in $VENV (the nvidia-cuda-nvcc wheel changed layout?)" >&2
    exit 1
fi
CUDA_ROOT=$(dirname "$(dirname "$NVCC")")
chmod +x "$CUDA_ROOT"/bin/* 2>/dev/null || true
# The wheels each unpack beside nvcc (nvidia/cu13/{bin,include,lib}); collect every include
# and lib directory under the venv's nvidia package in case a release splits them again.
NVIDIA_DIR=$(dirname "$CUDA_ROOT")
# CCCL (cub, thrust, libcu++) sits in include/cccl since CUDA 13.
INCLUDES=$(find "$NVIDIA_DIR" -maxdepth 3 -type d \( -name include -o -path '*/include/cccl' \) | paste -sd: -)
LIBS=$(find "$NVIDIA_DIR" -maxdepth 3 -type d \( -name lib -o -name lib64 \) | paste -sd: -)

export PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT"
export CPATH="$INCLUDES${CPATH:+:$CPATH}"
export LIBRARY_PATH="$LIBS${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDARC_CUDA_VERSION=13040
export CUDA_COMPUTE_CAP=90
export CARGO_TARGET_DIR="$TARGET"

echo "check-cuda: nvcc $("$NVCC" --version | tail -n 1), target dir $TARGET"
start=$(date +%s)
cargo check --features cuda --all-targets "$@"
echo "check-cuda: cargo check --features cuda --all-targets passed in $(($(date +%s) - start)) s"
