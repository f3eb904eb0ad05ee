#!/usr/bin/env bash
# The in-process trainer against the PyTorch training job (deploy/trainer-job) on the same CPU, same model, same
# shapes: `instructd bench-train` rows and bench/train/job_peer.py rows (the job's own step functions) alternate
# for ROUNDS rounds, each row in a fresh process; bench/train/summary.py prints the medians side by side (its
# "PyTorch" column is the job here).
#
#   ROUNDS=3 MODEL=models/smollm2-135m-instruct bash bench/train/job_compare.sh [ROWS]
#
# MODEL may be any model directory (e.g. a tiny one from `instructd model init-tiny`). The job's packages come
# from deploy/trainer-job/requirements.txt into .cache/trainer-job-venv (`make trainer-job-venv`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
BIN="${BIN:-target/release/instructd}"
MODEL="${MODEL:-models/smollm2-135m-instruct}"
ROWS="${1:-sft:4x128:0,sft:8x64:0,rm:4x128:0,rm:8x64:0}"
ROUNDS="${ROUNDS:-3}"
STEPS="${STEPS:-3}"
PY=.cache/trainer-job-venv/bin/python

[[ -x "$BIN" ]] || cargo build --release --bin instructd
make -s trainer-job-venv

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
run_instructd() {
    "$BIN" bench-train --model "$MODEL" --rounds "$STEPS" --row "$2" | tail -n 1 | sed "s/^{/{\"round\":$1,/" >> "$OUT/results.jsonl"
}
run_job() {
    "$PY" bench/train/job_peer.py --model "$MODEL" --rounds "$STEPS" --row "$2" \
        | tail -n 1 | sed "s/^{/{\"round\":$1,/" >> "$OUT/results.jsonl"
}

IFS=, read -ra rows <<< "$ROWS"
for round in $(seq 1 "$ROUNDS"); do
    for row in "${rows[@]}"; do
        echo "round $round: $row" >&2
        if (( round % 2 )); then run_instructd "$round" "$row"; run_job "$round" "$row"
        else run_job "$round" "$row"; run_instructd "$round" "$row"; fi
    done
done
python3 bench/train/summary.py "$OUT/results.jsonl"
