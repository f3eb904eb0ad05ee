#!/usr/bin/env bash
# Fair sharing of the engine between API keys (issue 13, item 4): a victim
# key's time to first token (TTFT) for a streamed 1-token completion on an
# idle engine, then while a flooder key keeps 8 requests of 32 prompts with
# n = 4 (16 tokens each) in flight, with `[engine] fair_sharing` off (one
# first-come, first-served queue) and on; and the flooder's throughput
# (streamed tokens/s over the same window) both ways. Both keys have the
# default limits, as in the issue.
#
# Starts its own redis-server and a release `instructd serve` (restarted for
# each setting), runs bench/fairness/drive.py, prints a markdown table.
#
#   bash bench/fairness/run.sh [--model DIR] [--window 60] [--rounds 2] [--no-build]
#
# --window S    seconds of flood measured per setting (victim requests are
#               sent one after another, 1 s apart, for that long; without fair
#               sharing each one waits for the whole queue, ~30 s here)
# --rounds R    alternate the two settings R times (off, on, off, on...):
#               the machine's speed drifts; figures are medians over rounds
# --no-build    use $BIN (default target/release/instructd) as it is
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
MODEL=models/smollm2-135m-instruct
WINDOW=60
ROUNDS=2
BUILD=1

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --window) WINDOW="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

source bench/harness.sh
[[ "$BUILD" == 0 ]] || cargo build --release --bin instructd
[[ -x "$BIN" ]] || { echo "no $BIN (run without --no-build)" >&2; exit 1; }
[[ -f "$MODEL/config.json" ]] || "$BIN" model fetch-default
start_redis

# measure NAME FAIR [drive.py arguments...]: one fresh gateway, two fresh keys with the default limits.
measure() {
    local name="$1" fair="$2"
    shift 2
    start_gateway "$MODEL" INSTRUCTD__ENGINE__FAIR_SHARING="$fair" ${GATEWAY_ENV:-}
    local victim flooder model
    victim="$(curl -sf "$URL/admin/keys" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
        -d '{"user": "victim", "scopes": ["completions"]}' | json_field secret)"
    flooder="$(curl -sf "$URL/admin/keys" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
        -d '{"user": "flooder", "scopes": ["completions"]}' | json_field secret)"
    model="$(curl -sf "$URL/v1/models" -H "Authorization: Bearer $victim" | json_field data.0.id)"
    echo "measuring: $name" >&2
    python3 bench/fairness/drive.py --url "$URL" --victim "$victim" --flooder "$flooder" --model "$model" "$@" \
        >"$WORK/$name.json"
    [[ -z "${KEEP_LOG:-}" ]] || cp "$WORK/gateway.err" "$KEEP_LOG.$name"
    kill "$GATEWAY_PID" && wait "$GATEWAY_PID" 2>/dev/null || true
    GATEWAY_PID=""
}

for round in $(seq "$ROUNDS"); do
    for mode in ${MODES:-off on}; do
        measure "$mode-$round" "$([[ "$mode" == on ]] && echo true || echo false)" --window "$WINDOW" --gap 1
    done
done
[[ "${MODES:-off on}" == "off on" ]] || { cat "$WORK"/*.json; exit 0; }

echo
echo "Fair sharing, $(date -u +%Y-%m-%d): $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores;"
echo "model $MODEL; flood: 8 concurrent requests x 32 prompts x n = 4 x 16 tokens (one key, default limits);"
echo "victim: streamed 1-token completions from another key, one at a time, 1 s apart, for $WINDOW s under"
echo "each flood; $ROUNDS alternating rounds per setting (medians over every victim request / over rounds)"
echo
python3 - "$WORK" "$ROUNDS" <<'PY'
import json, statistics, sys

work, rounds = sys.argv[1], int(sys.argv[2])
runs = {m: [json.load(open(f"{work}/{m}-{r}.json")) for r in range(1, rounds + 1)] for m in ("off", "on")}
idle = statistics.median(t for m in runs.values() for r in m for t in r["idle_ttft_s"])
ms = lambda s: f"{s * 1e3:,.0f}"
print(f"victim TTFT on the idle engine: {ms(idle)} ms (median of {sum(len(r['idle_ttft_s']) for m in runs.values() for r in m)})")
print()
print("| fair_sharing | victim requests | victim TTFT under flood: median / p90 / max | median vs idle | flooder tok/s per round | flooder tok/s (median) | flooder requests refused |")
print("|---|---:|---:|---:|---:|---:|---:|")
tok = {}
for m in ("off", "on"):
    flood = sorted(t for r in runs[m] for t in r["flood_ttft_s"])
    p90 = flood[min(len(flood) - 1, int(0.9 * len(flood)))]
    tok[m] = statistics.median(r["flood_tok_s"] for r in runs[m])
    per_round = ", ".join(f"{r['flood_tok_s']:.0f}" for r in runs[m])
    print(f"| {'true' if m == 'on' else 'false'} | {len(flood)} | {ms(statistics.median(flood))} / {ms(p90)} / {ms(flood[-1])} ms | "
          f"{statistics.median(flood) / idle:,.1f}x | {per_round} | {tok[m]:.0f} | {sum(r['flood_refused'] for r in runs[m])} |")
print(f"\nflooder throughput with fair sharing: {100 * (tok['on'] - tok['off']) / tok['off']:+.1f}% against without")
PY
