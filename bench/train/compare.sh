#!/usr/bin/env bash
# The trainer against PyTorch on the same machine, same model (F32), same shapes: `instructd bench-train` rows
# and bench/train/torch_peer.py rows alternate (A B, B A, ...) for ROUNDS rounds, each row in a fresh process,
# and bench/train/summary.py prints each row's median with the ratio. The machine's memory bandwidth and clock
# drift from minute to minute; alternating keeps both engines in the same minutes.
#
#   ROUNDS=3 bash bench/train/compare.sh [ROWS]
#
# ROWS (comma-separated `stage:SHAPE:frozen`) defaults to SFT and RM at 4x128, 8x128, 8x64, the frozen-half rows,
# and a PPO-ptx iteration of 8 episodes x 32 tokens. PyTorch and transformers come from PyPI into
# .cache/torch-venv (once; the wheels are large).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
BIN=target/release/instructd
MODEL=models/smollm2-135m-instruct
VENV=.cache/torch-venv
ROWS="${1:-sft:4x128:0,sft:8x128:0,sft:8x64:0,rm:4x128:0,rm:8x128:0,rm:8x64:0,sft:4x128:15,rm:4x128:15,ppo:8x32:0}"
ROUNDS="${ROUNDS:-3}"
STEPS="${STEPS:-3}"

cargo build --release --bin instructd
"$BIN" model fetch-default
"$BIN" model fetch-corpus
if [[ ! -f "$VENV/.installed" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r bench/train/requirements.txt
    touch "$VENV/.installed"
fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
run_instructd() {
    "$BIN" bench-train --model "$MODEL" --rounds "$STEPS" --row "$2" | tail -n 1 | sed "s/^{/{\"round\":$1,/" >> "$OUT/results.jsonl"
}
run_torch() {
    "$VENV/bin/python" bench/train/torch_peer.py --model "$MODEL" --rounds "$STEPS" --row "$2" \
        | tail -n 1 | sed "s/^{/{\"round\":$1,/" >> "$OUT/results.jsonl"
}

IFS=, read -ra rows <<< "$ROWS"
for round in $(seq 1 "$ROUNDS"); do
    for row in "${rows[@]}"; do
        echo "round $round: $row" >&2
        if (( round % 2 )); then run_instructd "$round" "$row"; run_torch "$round" "$row"
        else run_torch "$round" "$row"; run_instructd "$round" "$row"; fi
    done
done
python3 bench/train/summary.py "$OUT/results.jsonl"
