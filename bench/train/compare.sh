#!/usr/bin/env bash
# The in-process trainer against a peer on the same machine, same model (F32), same shapes: `instructd bench-train`
# rows and the peer's rows alternate (A B, B A, ...) for ROUNDS rounds, each row in a fresh process, and
# bench/train/summary.py prints each row's median with the ratio. The machine's memory bandwidth and clock drift
# from minute to minute; alternating keeps both in the same minutes.
#
#   ROUNDS=3 bash bench/train/compare.sh [ROWS]                   # against PyTorch + transformers
#   ROUNDS=3 PEER=job bash bench/train/compare.sh [ROWS]          # against the PyTorch training job
#
# PEER=torch (default): bench/train/torch_peer.py, PyTorch and transformers from PyPI into .cache/torch-venv (once;
# the wheels are large). ROWS (comma-separated `stage:SHAPE:frozen`) defaults to SFT and RM at 4x128, 8x128, 8x64,
# the frozen-half rows, and a PPO-ptx iteration of 8 episodes x 32 tokens.
# PEER=job: bench/train/job_peer.py, the job's own step functions (deploy/trainer-job), its packages from
# deploy/trainer-job/requirements.txt in .cache/trainer-job-venv (`make trainer-job-venv`); summary.py's "PyTorch"
# column is the job there. ROWS defaults to SFT and RM at 4x128 and 8x64.
# MODEL may be any model directory (e.g. a tiny one from `instructd model init-tiny`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
BIN="${BIN:-target/release/instructd}"
MODEL="${MODEL:-models/smollm2-135m-instruct}"
PEER="${PEER:-torch}"
ROUNDS="${ROUNDS:-3}"
STEPS="${STEPS:-3}"

cargo build --release --bin instructd
"$BIN" model fetch-default
"$BIN" model fetch-corpus
case "$PEER" in
    torch)
        ROWS="${1:-sft:4x128:0,sft:8x128:0,sft:8x64:0,rm:4x128:0,rm:8x128:0,rm:8x64:0,sft:4x128:15,rm:4x128:15,ppo:8x32:0}"
        VENV=.cache/torch-venv
        if [[ ! -f "$VENV/.installed" ]]; then
            python3 -m venv "$VENV"
            "$VENV/bin/pip" install -q -r bench/train/requirements.txt
            touch "$VENV/.installed"
        fi
        PEER_CMD=("$VENV/bin/python" bench/train/torch_peer.py) ;;
    job)
        ROWS="${1:-sft:4x128:0,sft:8x64:0,rm:4x128:0,rm:8x64:0}"
        make -s trainer-job-venv
        PEER_CMD=(.cache/trainer-job-venv/bin/python bench/train/job_peer.py) ;;
    *) echo "PEER must be torch or job" >&2; exit 2 ;;
esac

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# One row in a fresh process; its last line (a JSON object) tagged with the round.
run() {
    local round="$1" row="$2"; shift 2
    "$@" --model "$MODEL" --rounds "$STEPS" --row "$row" | tail -n 1 | sed "s/^{/{\"round\":$round,/" >> "$OUT/results.jsonl"
}

IFS=, read -ra rows <<< "$ROWS"
for round in $(seq 1 "$ROUNDS"); do
    for row in "${rows[@]}"; do
        echo "round $round: $row" >&2
        if (( round % 2 )); then run "$round" "$row" "$BIN" bench-train; run "$round" "$row" "${PEER_CMD[@]}"
        else run "$round" "$row" "${PEER_CMD[@]}"; run "$round" "$row" "$BIN" bench-train; fi
    done
done
python3 bench/train/summary.py "$OUT/results.jsonl"
