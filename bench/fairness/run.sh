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
#
# MODES (environment, default "off on") picks the settings alternated in
# each round: off (fair_sharing = false), on (fair_sharing with
# preempt_between_layers, the defaults), boundary (fair_sharing, the
# running step never paused: a new tenant's prompt waits for the step
# boundary). E.g. MODES="boundary on" compares the preemption alone.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
MODEL=models/smollm2-135m-instruct
WINDOW=60
ROUNDS=2
BUILD=1

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
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

# measure NAME MODE [drive.py arguments...]: one fresh gateway, two fresh keys with the default limits.
measure() {
    local name="$1" mode="$2" fair=true preempt=true
    shift 2
    case "$mode" in
        off) fair=false ;;
        on) ;;
        boundary) preempt=false ;;
        *) echo "unknown mode $mode (off, on, boundary)" >&2; exit 2 ;;
    esac
    start_gateway "$MODEL" INSTRUCTD__ENGINE__FAIR_SHARING="$fair" \
        INSTRUCTD__ENGINE__PREEMPT_BETWEEN_LAYERS="$preempt" ${GATEWAY_ENV:-}
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
        echo "round $round, $mode: load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        measure "$mode-$round" "$mode" --window "$WINDOW" --gap 1
    done
done

echo
echo "Fair sharing, $(date -u +%Y-%m-%d): $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores;"
echo "model $MODEL; flood: 8 concurrent requests x 32 prompts x n = 4 x 16 tokens (one key, default limits);"
echo "victim: streamed 1-token completions from another key, one at a time, 1 s apart, for $WINDOW s under"
echo "each flood; $ROUNDS alternating rounds per setting (medians over every victim request / over rounds)"
echo
python3 - "$WORK" "$ROUNDS" ${MODES:-off on} <<'PY'
import json, statistics, sys

work, rounds, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
setting = {"off": "false", "on": "true", "boundary": "true, preempt_between_layers = false"}
runs = {m: [json.load(open(f"{work}/{m}-{r}.json")) for r in range(1, rounds + 1)] for m in modes}
idle = statistics.median(t for m in runs.values() for r in m for t in r["idle_ttft_s"])
ms = lambda s: f"{s * 1e3:,.0f}"
print(f"victim TTFT on the idle engine: {ms(idle)} ms (median of {sum(len(r['idle_ttft_s']) for m in runs.values() for r in m)})")
print()
print("| fair_sharing | victim requests | victim TTFT under flood: median / p90 / max | median vs idle | flooder tok/s per round | flooder tok/s (median) | flooder requests refused |")
print("|---|---:|---:|---:|---:|---:|---:|")
tok = {}
for m in modes:
    flood = sorted(t for r in runs[m] for t in r["flood_ttft_s"])
    p90 = flood[min(len(flood) - 1, int(0.9 * len(flood)))]
    tok[m] = statistics.median(r["flood_tok_s"] for r in runs[m])
    per_round = ", ".join(f"{r['flood_tok_s']:.0f}" for r in runs[m])
    print(f"| {setting[m]} | {len(flood)} | {ms(statistics.median(flood))} / {ms(p90)} / {ms(flood[-1])} ms | "
          f"{statistics.median(flood) / idle:,.1f}x | {per_round} | {tok[m]:.0f} | {sum(r['flood_refused'] for r in runs[m])} |")
base = modes[0]
for m in modes[1:]:
    print(f"\nflooder throughput, {m} against {base}: {100 * (tok[m] - tok[base]) / tok[base]:+.1f}%")
PY
