#!/usr/bin/env bash
# Builds the llama.cpp side of the side-by-side benchmark: a private venv at
# .cache/bench-venv (git-ignored) with llama-cpp-python and its OpenAI server.
#
# llama-cpp-python compiles llama.cpp from source (cmake + a C/C++ compiler);
# on a 2-core machine that takes several minutes. Idempotent: exits at once
# when the pinned version is already importable with its server extras.
#
# Environment knobs:
#   BENCH_VENV           venv directory (default: <repo>/.cache/bench-venv)
#   LLAMA_CPP_PYTHON     version to install (default: pinned below)
#   CMAKE_ARGS           extra cmake flags (default: a native CPU build)
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: nproc)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${BENCH_VENV:-$REPO/.cache/bench-venv}"
VERSION="${LLAMA_CPP_PYTHON:-0.3.16}"
PY="${PYTHON:-python3}"

installed_version() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import llama_cpp
import llama_cpp.server.app  # noqa: F401  (fails without the [server] extras)
print(llama_cpp.__version__)
PY
}

if [[ -x "$VENV/bin/python" ]] && [[ "$(installed_version || true)" == "$VERSION" ]]; then
    echo "llama-cpp-python $VERSION already installed in $VENV"
    exit 0
fi

start=$(date +%s)
command -v cc >/dev/null && command -v c++ >/dev/null || {
    echo "setup.sh: a C and a C++ compiler are needed (apt-get install build-essential)" >&2
    exit 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# cmake and ninja from PyPI, so the build does not depend on the system's.
"$VENV/bin/python" -m pip install --quiet cmake ninja

export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PATH="$VENV/bin:$PATH"
echo "building llama-cpp-python $VERSION (CMAKE_ARGS=$CMAKE_ARGS, jobs=$CMAKE_BUILD_PARALLEL_LEVEL)"
# --no-cache-dir: a wheel cached from another CMAKE_ARGS must not be reused.
"$VENV/bin/python" -m pip install --no-cache-dir --verbose \
    "llama-cpp-python[server]==$VERSION" >"$VENV/build.log" 2>&1 || {
    echo "setup.sh: pip install failed; last lines of $VENV/build.log:" >&2
    tail -n 40 "$VENV/build.log" >&2
    exit 1
}

got="$(installed_version)"
[[ "$got" == "$VERSION" ]] || { echo "setup.sh: installed $got, expected $VERSION" >&2; exit 1; }
echo "llama-cpp-python $got installed in $VENV in $(( $(date +%s) - start )) s"
