#!/usr/bin/env bash
# Runs `instructd bench` and llama.cpp (bench/llamacpp) back to back on the
# same SmolLM2 weights (F32) with the same workload, so the ratio comes from
# one sitting on one machine. Optional: needs `bash bench/llamacpp/setup.sh`
# (builds llama.cpp from PyPI's llama-cpp-python) and the default model.
#
#   bash bench/compare.sh [PROMPT_TOKENS] [GEN_TOKENS] [CONCURRENCY]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
P="${1:-128}"
G="${2:-64}"
C="${3:-1,4,16}"
BIN=target/release/instructd
MODEL=models/smollm2-135m-instruct
F32_GGUF=.cache/smollm2-135m-instruct.f32.gguf

cargo build --release --bin instructd
"$BIN" model fetch-default
bash bench/llamacpp/setup.sh
if [[ ! -f .cache/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    "$BIN" model fetch-default --force   # re-fetches the GGUF the model came from
fi
if [[ ! -f "$F32_GGUF" ]]; then
    "$BIN" model dequantize-gguf .cache/SmolLM2-135M-Instruct.Q4_1.gguf "$F32_GGUF" --dtype f32
fi

echo "== instructd =="
"$BIN" bench --model "$MODEL" --prompt-tokens "$P" --gen-tokens "$G" --concurrency "$C"
echo
echo "== llama.cpp (llama-cpp-python) =="
.cache/bench-venv/bin/python bench/llamacpp/bench.py --gguf "$F32_GGUF" \
    --prompt-tokens "$P" --gen-tokens "$G" --concurrency "$C" --threads "$(nproc)"
