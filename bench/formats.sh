#!/usr/bin/env bash
# `instructd bench` once per serving format (f32, bf16, q8_0, q4_0: `[model]
# serve_dtype`), the formats alternating for ROUNDS rounds (f32 bf16 q8_0 q4_0,
# q4_0 q8_0 bf16 f32, ...) so a swing in the machine's memory bandwidth lands
# on all of them, then each row's median tok/s per format and its ratio to
# F32. FORMATS="f32 q4_0" picks a subset. Quality per format is
# `instructd bench-quality`; llama.cpp at the same format is
# `FORMAT=bf16|q8_0|q4_0 bash bench/compare.sh`.
#
#   ROUNDS=3 BIN=target/release/instructd bash bench/formats.sh [PROMPT_TOKENS] [GEN_TOKENS] [CONCURRENCY]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
P="${1:-128}"
G="${2:-64}"
C="${3:-1,16}"
BIN="${BIN:-target/release/instructd}"
MODEL="${MODEL:-models/smollm2-135m-instruct}"
ROUNDS="${ROUNDS:-3}"
read -r -a FORMATS <<< "${FORMATS:-f32 bf16 q8_0 q4_0}"
REVERSED=()
for ((i = ${#FORMATS[@]} - 1; i >= 0; i--)); do REVERSED+=("${FORMATS[i]}"); done

if [[ "$BIN" == target/release/instructd ]]; then
    cargo build --release --bin instructd
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

for round in $(seq 1 "$ROUNDS"); do
    order=("${FORMATS[@]}")
    if (( round % 2 == 0 )); then order=("${REVERSED[@]}"); fi
    for format in "${order[@]}"; do
        echo "== $format (round $round) =="
        "$BIN" bench --model "$MODEL" --serve-dtype "$format" --prompt-tokens "$P" --gen-tokens "$G" \
            --concurrency "$C" --rounds 1 --prefix-tokens 0 --json | tee "$OUT/raw"
        tail -n 1 "$OUT/raw" >> "$OUT/results.jsonl"
        echo
    done
done

python3 - "$OUT/results.jsonl" "${FORMATS[@]}" <<'PY'
import json, statistics, sys
from collections import defaultdict
tok = defaultdict(lambda: defaultdict(list))   # workload -> format -> [tok/s]
p99 = defaultdict(lambda: defaultdict(list))
rss = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    f = r["serve_dtype"]
    if r.get("peak_rss_mb"):
        rss[f].append(r["peak_rss_mb"])
    for row in r["rows"]:
        tok[row["workload"]][f].append(row["tokens_per_s"])
        p99[row["workload"]][f].append(row["latency_p99_ms"])
formats = sys.argv[2:]
others = [f for f in formats if f != "f32"]
print("| workload | " + " | ".join(f"{f} tok/s (p99 ms)" for f in formats) + " | "
      + " | ".join(f"{f} / f32" for f in others) + " |")
print("|---|" + "---:|" * (len(formats) + len(others)))
for w, by in tok.items():
    med = {f: statistics.median(by[f]) for f in formats if by[f]}
    cells = [f"{med[f]:.1f} ({statistics.median(p99[w][f]):.0f})" if f in med else "-" for f in formats]
    ratio = lambda f: f"{med[f] / med['f32']:.2f}x" if f in med and "f32" in med else "-"
    print(f"| {w} | " + " | ".join(cells) + " | " + " | ".join(ratio(f) for f in others) + " |")
print()
print("peak RSS MB (median): " + ", ".join(f"{f} {statistics.median(rss[f]):.0f}" for f in formats if rss[f]))
PY
