#!/usr/bin/env bash
# Feedback ingestion benchmark: feedback events/s accepted end to end (HTTP
# `POST /v1/feedback` -> the `instructd:feedback` Redis stream) at 16 and 64
# concurrent clients, beside `redis-benchmark` XADD on the same Redis as the
# ceiling. Load generator: `oha` (the same as bench/gateway, installed once
# from crates.io into .cache/bench-tools).
#
# Starts its own redis-server (free port, no persistence) and a release
# `instructd serve` (free port) on a tiny random-weight model (the model only
# produces the playground samples that the feedback refers to), creates a key
# with scopes labeler + playground and no limits, accepts the training-use
# notice, logs a few playground prompts (K = 4), then posts ratings of one
# logged generation without an Idempotency-Key, so that every request is a new
# event. Checks that XLEN instructd:feedback grew by exactly the number of 201
# answers of each run, prints a markdown table, and stops both on exit.
#
#   bash bench/feedback/run.sh [--duration 10s] [--concurrency 16,64]
#                              [--requests 200000] [--no-build]
#
# --duration     length of each oha run (default 10s)
# --concurrency  comma-separated client counts (default 16,64)
# --requests     requests per redis-benchmark run (default 200000)
# --no-build     use target/release/instructd as it is
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
DURATION="${DURATION:-10s}"
CONCURRENCY="${CONCURRENCY:-16,64}"
REQUESTS="${REQUESTS:-200000}"
PROMPTS=4
BUILD=1

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --concurrency) CONCURRENCY="$2"; shift 2 ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

source bench/harness.sh

# --- tools -----------------------------------------------------------------
ensure_tools "$BUILD"

# --- redis and the gateway -------------------------------------------------
MODEL="$WORK/tiny"
"$BIN" model init-tiny "$MODEL" --seed 7 >/dev/null

start_redis
start_gateway "$MODEL" INSTRUCTD__ENGINE__COMPUTE_THREADS=1

# --- a labeler with consent and a few logged prompts -------------------------
SECRET="$(curl -sf "$URL/admin/keys" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    -d '{"user": "bench", "scopes": ["labeler", "playground"], "limits": {"requests_per_minute": 0, "tokens_per_minute": 0, "max_concurrent": 0}}' \
    | json_field secret)"
AUTH=(-H "Authorization: Bearer $SECRET")
NOTICE="$(curl -sf "$URL/v1/playground/notice" "${AUTH[@]}" | json_field version)"
curl -sf "$URL/v1/playground/consent" "${AUTH[@]}" -H 'Content-Type: application/json' \
    -d "{\"action\": \"accept\", \"notice_version\": \"$NOTICE\"}" | json_field logging | grep -qx True
MODEL_ID="$(curl -sf "$URL/v1/models" "${AUTH[@]}" | json_field data.0.id)"
GENERATION=""
for i in $(seq "$PROMPTS"); do
    BODY="$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": f"Write a haiku about autumn, take {sys.argv[2]}.", "k": 4, "max_tokens": 6, "temperature": 1.0}))' "$MODEL_ID" "$i")"
    curl -sf "$URL/v1/playground/completions" "${AUTH[@]}" -H 'Content-Type: application/json' -d "$BODY" \
        >"$WORK/prompt-$i.json"
    [[ "$(json_field logged <"$WORK/prompt-$i.json")" == True ]] || { echo "prompt $i was not logged" >&2; exit 1; }
    GENERATION="$(json_field samples.0.generation_id <"$WORK/prompt-$i.json")"
done
[[ "$(rcli XLEN instructd:prompts)" == "$PROMPTS" ]] || { echo "instructd:prompts does not hold $PROMPTS prompts" >&2; exit 1; }
FEEDBACK="{\"type\": \"rating\", \"generation_id\": \"$GENERATION\", \"score\": 5}"
# One by hand: a broken setup fails here, not as a table of errors.
curl -sf "$URL/v1/feedback" "${AUTH[@]}" -H 'Content-Type: application/json' -d "$FEEDBACK" \
    | json_field status | grep -qx recorded

# --- load ------------------------------------------------------------------
xlen() { rcli XLEN instructd:feedback; }
# Warm-up (discarded from the table; its events are still in the stream).
"$OHA" --no-tui -z 2s -w -c 16 -m POST "${AUTH[@]}" -H 'Content-Type: application/json' -d "$FEEDBACK" \
    "$URL/v1/feedback" >/dev/null
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
rcli CONFIG RESETSTAT >/dev/null
IFS=, read -r -a LEVELS <<<"$CONCURRENCY"
for c in "${LEVELS[@]}"; do
    echo "POST /v1/feedback (rating), $c concurrent, $DURATION" >&2
    xlen >"$WORK/feedback-$c.before"
    # -w: requests in flight at the deadline finish and are counted, so that every
    # event written to the stream is also an answer oha saw.
    "$OHA" --no-tui --output-format json -z "$DURATION" -w -c "$c" -m POST "${AUTH[@]}" \
        -H 'Content-Type: application/json' -d "$FEEDBACK" "$URL/v1/feedback" >"$WORK/feedback-$c.json"
    xlen >"$WORK/feedback-$c.after"
done
# What the measured feedback runs asked of Redis (scripts' inner commands included).
rcli INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1 \2/p' >"$WORK/commandstats"
for c in "${LEVELS[@]}"; do
    echo "redis-benchmark XADD, $c clients, $REQUESTS requests" >&2
    redis-benchmark -p "$REDIS_PORT" -c "$c" -n "$REQUESTS" --csv XADD bench:stream '*' field value \
        >"$WORK/xadd-$c.csv"
done
rcli DEL bench:stream >/dev/null

# --- report ----------------------------------------------------------------
echo
echo "Feedback ingestion benchmark, $(date -u +%Y-%m-%d): $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores;"
echo "load average $LOAD_BEFORE before the runs, $(cut -d' ' -f1-3 /proc/loadavg) at the end; oha $("$OHA" --version | awk '{print $2}') and"
echo "redis-benchmark ($(redis-server --version | awk '{print $3}')) on the same machine; $DURATION per instructd row, $REQUESTS XADDs per redis-benchmark run"
echo
python3 - "$WORK" "${LEVELS[@]}" <<'EOF'
import csv, json, sys

work, levels = sys.argv[1], sys.argv[2:]
rows, failed = [], False
for c in levels:
    with open(f"{work}/feedback-{c}.json") as f:
        r = json.load(f)
    codes = {int(k): v for k, v in r.get("statusCodeDistribution", {}).items()}
    recorded = codes.get(201, 0)
    ok = sum(n for code, n in codes.items() if 200 <= code < 300)
    bad = sum(n for code, n in codes.items() if not 200 <= code < 300) + sum(r.get("errorDistribution", {}).values())
    grew = int(open(f"{work}/feedback-{c}.after").read()) - int(open(f"{work}/feedback-{c}.before").read())
    match = grew == recorded and ok == recorded
    failed |= not match
    print(f"{c} clients: {recorded} answered 201 recorded ({ok - recorded} other 2xx, {bad} non-2xx or errors) "
          f"in {r['summary']['total']:.2f} s; XLEN instructd:feedback grew by {grew}: "
          f"{'match' if match else 'MISMATCH'}")
    lat = r["latencyPercentiles"]
    with open(f"{work}/xadd-{c}.csv") as f:
        xadd = next(csv.DictReader(f))
    rows.append((c, recorded / r["summary"]["total"], lat["p50"] * 1e3, lat["p99"] * 1e3, float(xadd["rps"]),
                 float(xadd["p50_latency_ms"]), float(xadd["p99_latency_ms"])))
total = sum(int(open(f"{work}/feedback-{c}.after").read()) - int(open(f"{work}/feedback-{c}.before").read()) for c in levels)
stats = [line.split() for line in open(f"{work}/commandstats")]
stats = sorted(((name, int(n)) for name, n in stats
                if name.split("|")[0] not in ("config", "info", "xlen") and int(n) >= total / 100), key=lambda s: -s[1])
if total:
    print("Redis commands per recorded event: " + ", ".join(f"{name} {n / total:.2f}" for name, n in stats))
print()
print("| clients | instructd feedback events/s | p50 ms | p99 ms | redis-benchmark XADD/s (p50 / p99 ms) |")
print("|---:|---:|---:|---:|---:|")
for c, eps, p50, p99, xps, xp50, xp99 in rows:
    print(f"| {c} | {eps:.0f} | {p50:.2f} | {p99:.2f} | {xps:.0f} ({xp50:.2f} / {xp99:.2f}) |")
sys.exit(1 if failed else 0)
EOF
