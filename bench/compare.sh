#!/usr/bin/env bash
# Runs `instructd bench` and llama.cpp (bench/llamacpp: its Python API for
# prefill and batch-1 decode, `llama-server -np PARALLEL` for the concurrent
# rows) back to back on the same SmolLM2 weights with the same workload, so the ratio comes from
# one sitting on one machine. Optional: needs `bash bench/llamacpp/setup.sh`
# (builds llama.cpp from PyPI's llama-cpp-python) and the default model.
#
# The machine this was built on shares its memory bus with neighbours, and
# its bandwidth swings between ~15 and ~35 GB/s from minute to minute. So
# the two engines alternate for ROUNDS rounds (A B, B A, A B, ...), and
# bench/compare_summary.py reports each row's ratio per round and the median:
# a ratio from one round compares two runs a minute apart, not two sittings.
#
# FORMAT picks the weight format on both sides (default f32): instructd
# serves with `--serve-dtype FORMAT` (packed at load from the same F32 model),
# llama.cpp runs a GGUF its own quantizer wrote from the F32 GGUF
# (bench/llamacpp/quantize.py: bf16, q8_0 or q4_0; f16 for llama.cpp's F16
# path). llama.cpp's Q4_0 file keeps its output matrix in Q6_K (its quantizer's
# rule), where instructd packs every projection, the LM head included, in Q4_0.
# KV_DTYPE (default f16, llama.cpp's default cache type, which its side runs)
# is instructd's `--kv-dtype`; KV_DTYPE=f32 runs ours with exact F32 keys.
#
#   ROUNDS=3 FORMAT=q8_0 bash bench/compare.sh [PROMPT_TOKENS] [GEN_TOKENS] [CONCURRENCY]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
P="${1:-128}"
G="${2:-64}"
C="${3:-1,4,16}"
BIN=target/release/instructd
MODEL=models/smollm2-135m-instruct
F32_GGUF=.cache/smollm2-135m-instruct.f32.gguf
FORMAT="${FORMAT:-f32}"
KV_DTYPE="${KV_DTYPE:-f16}"
case "$FORMAT" in
    f32) SERVE_DTYPE=f32 ;;
    bf16|q8_0|q4_0) SERVE_DTYPE="$FORMAT" ;;
    # llama.cpp's F16 against our BF16: the nearest 16-bit format we serve.
    f16) SERVE_DTYPE=bf16 ;;
    *) echo "compare.sh: FORMAT must be f32, bf16, f16, q8_0 or q4_0" >&2; exit 2 ;;
esac
GGUF="$F32_GGUF"

cargo build --release --bin instructd
"$BIN" model fetch-default
bash bench/llamacpp/setup.sh
# The concurrency peer: llama.cpp's own server, batching continuously in PARALLEL slots (default: the largest
# concurrency asked for).
LLAMA_SERVER="$(bash scripts/build-llama-server.sh | tail -n 1)"
PARALLEL="${PARALLEL:-$(tr ',' '\n' <<< "$C" | sort -n | tail -n 1)}"
if [[ ! -f .cache/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    "$BIN" model fetch-default --force   # re-fetches the GGUF the model came from
fi
if [[ ! -f "$F32_GGUF" ]]; then
    "$BIN" model dequantize-gguf .cache/SmolLM2-135M-Instruct.Q4_1.gguf "$F32_GGUF" --dtype f32
fi
if [[ "$FORMAT" != f32 ]]; then
    GGUF=".cache/smollm2-135m-instruct.$FORMAT.gguf"
    [[ -f "$GGUF" ]] || .cache/bench-venv/bin/python bench/llamacpp/quantize.py "$F32_GGUF" "$GGUF" "$FORMAT"
fi

ROUNDS="${ROUNDS:-3}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

run_instructd() {
    echo "== instructd (round $1) =="
    "$BIN" bench --model "$MODEL" --serve-dtype "$SERVE_DTYPE" --kv-dtype "$KV_DTYPE" --prompt-tokens "$P" --gen-tokens "$G" --concurrency "$C" --json | tee "$OUT/raw"
    tail -n 1 "$OUT/raw" | sed "s/^{/{\"round\":$1,/" >> "$OUT/results.jsonl"
}

run_llamacpp() {
    echo "== llama.cpp: Python API, then llama-server -np $PARALLEL (round $1) =="
    .cache/bench-venv/bin/python bench/llamacpp/bench.py --gguf "$GGUF" --llama-server "$LLAMA_SERVER" \
        --parallel "$PARALLEL" --prompt-tokens "$P" --gen-tokens "$G" --concurrency "$C" --threads "$(nproc)" \
        --json | tee "$OUT/raw"
    tail -n 1 "$OUT/raw" | sed "s/^{/{\"round\":$1,/" >> "$OUT/results.jsonl"
}

for round in $(seq 1 "$ROUNDS"); do
    if (( round % 2 )); then
        run_instructd "$round"; echo; run_llamacpp "$round"
    else
        run_llamacpp "$round"; echo; run_instructd "$round"
    fi
    echo
done
python3 bench/compare_summary.py "$OUT/results.jsonl"
