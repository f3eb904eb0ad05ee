#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the OpenAI-compatible upstream the
# external-engine tests put behind the gateway) from the llama.cpp tree that the
# llama-cpp-python sdist on PyPI vendors, so only a package registry is needed.
#
# Cached: the binary lands in .cache/llama-server/<version>/bin/llama-server
# (git-ignored); a second run finds it and exits at once. Prints the binary's
# path as its last line of stdout, so callers can `$(bash scripts/build-llama-server.sh)`.
#
# Environment knobs:
#   LLAMA_CPP_PYTHON             sdist version (default: pinned below)
#   LLAMA_SERVER_CACHE           cache root (default: <repo>/.cache/llama-server)
#   CMAKE_BUILD_PARALLEL_LEVEL   compile jobs (default: nproc)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LLAMA_CPP_PYTHON:-0.3.16}"
ROOT="${LLAMA_SERVER_CACHE:-$REPO/.cache/llama-server}/$VERSION"
BIN="$ROOT/bin/llama-server"
PY="${PYTHON:-python3}"

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

command -v cc >/dev/null && command -v c++ >/dev/null || {
    echo "build-llama-server.sh: a C and a C++ compiler are needed (apt-get install build-essential)" >&2
    exit 1
}

start=$(date +%s)
mkdir -p "$ROOT"
# A private venv holds cmake and ninja from PyPI, so the build does not depend
# on the system's (and `pip download` works without touching the system Python).
TOOLS="$ROOT/tools"
if [[ ! -x "$TOOLS/bin/cmake" ]]; then
    "$PY" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install --quiet --upgrade pip
    "$TOOLS/bin/python" -m pip install --quiet cmake ninja
fi

SRC="$ROOT/src"
if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$ROOT/sdist" "$SRC"
    mkdir -p "$ROOT/sdist"
    # --no-binary for this one package only (":all:" would also compile its
    # build backend's cmake from source); pip prepares the sdist's metadata,
    # which finds the tools venv's cmake on PATH instead of fetching another.
    PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/python" -m pip download --quiet --no-deps \
        --no-binary llama-cpp-python --dest "$ROOT/sdist" "llama-cpp-python==$VERSION" >&2
    tarball="$(ls "$ROOT"/sdist/llama_cpp_python-"$VERSION".tar.gz)"
    mkdir -p "$SRC"
    tar -xzf "$tarball" -C "$SRC" --strip-components=1
fi
LLAMA="$SRC/vendor/llama.cpp"
[[ -f "$LLAMA/tools/server/server.cpp" || -f "$LLAMA/examples/server/server.cpp" ]] || {
    echo "build-llama-server.sh: no server sources under $LLAMA" >&2
    exit 1
}

JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
BUILD="$ROOT/build"
echo "building llama-server from llama-cpp-python $VERSION's vendored llama.cpp (jobs=$JOBS)" >&2
# CPU only, no libcurl (the server loads a local GGUF), static ggml so the
# binary runs from wherever it is copied; only the server target is built.
"$TOOLS/bin/cmake" -S "$LLAMA" -B "$BUILD" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$TOOLS/bin/ninja" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    >"$ROOT/cmake.log" 2>&1 || {
    tail -n 40 "$ROOT/cmake.log" >&2
    exit 1
}
"$TOOLS/bin/cmake" --build "$BUILD" --target llama-server -j "$JOBS" >"$ROOT/build.log" 2>&1 || {
    tail -n 40 "$ROOT/build.log" >&2
    exit 1
}
mkdir -p "$ROOT/bin"
cp "$BUILD/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "llama-server built in $(($(date +%s) - start)) s" >&2
echo "$BIN"
