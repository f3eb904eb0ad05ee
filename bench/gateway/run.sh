#!/usr/bin/env bash
# Load test of the gateway: requests/s and p50/p99 latency for short
# completions (POST /v1/completions, max_tokens 4, greedy) and for
# GET /v1/models (auth only, no engine) at 1, 16 and 64 concurrent clients,
# driven by `oha` (crates.io, installed once into .cache/bench-tools).
#
# Starts its own redis-server (free port, no persistence) and a release
# `instructd serve` on a free port, creates a key no limit will stop (still
# counted in Redis), runs, prints a markdown table, and stops both on exit.
#
#   bash bench/gateway/run.sh [--model DIR | --tiny] [--duration 15s]
#                             [--concurrency 1,16,64] [--max-tokens 4] [--no-build]
#
# --model DIR   the model to serve (default: models/smollm2-135m-instruct,
#               fetched once by `instructd model fetch-default`)
# --tiny        a tiny random-weight model (`instructd model init-tiny`), so
#               that the figures show the gateway rather than the model
# --no-build    use target/release/instructd as it is
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
MODEL=models/smollm2-135m-instruct
TINY=0
DURATION="${DURATION:-15s}"
CONCURRENCY="${CONCURRENCY:-1,16,64}"
MAX_TOKENS=4
PROMPT="Say hi"
BUILD=1

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --duration) DURATION="$2"; shift 2 ;;
        --concurrency) CONCURRENCY="$2"; shift 2 ;;
        --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

source bench/harness.sh

# --- tools -----------------------------------------------------------------
ensure_tools "$BUILD"

# --- model -----------------------------------------------------------------
if [[ "$TINY" == 1 ]]; then
    MODEL="$WORK/tiny"
    "$BIN" model init-tiny "$MODEL" --seed 7 >/dev/null
elif [[ "$MODEL" == models/smollm2-135m-instruct && ! -f "$MODEL/config.json" ]]; then
    "$BIN" model fetch-default
fi
[[ -f "$MODEL/config.json" ]] || { echo "no model in $MODEL" >&2; exit 1; }

# --- redis and the gateway -------------------------------------------------
start_redis
start_gateway "$MODEL"

SECRET="$(curl -sf "$URL/admin/keys" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    -d '{"user": "bench", "scopes": ["completions"], "limits": {"requests_per_minute": 1000000, "tokens_per_minute": 0, "max_concurrent": 0}}' \
    | json_field secret)"
MODEL_ID="$(curl -sf "$URL/v1/models" -H "Authorization: Bearer $SECRET" | json_field data.0.id)"
BODY="$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2], "max_tokens": int(sys.argv[3]), "temperature": 0}))' \
    "$MODEL_ID" "$PROMPT" "$MAX_TOKENS")"
# One request by hand: a broken setup fails here, not as a table of errors.
curl -sf "$URL/v1/completions" -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' -d "$BODY" \
    | json_field choices.0.text >/dev/null

# --- load ------------------------------------------------------------------
# oha_run NAME CONCURRENCY [oha arguments...]: one fixed-duration run, JSON saved as $WORK/NAME-C.json.
oha_run() {
    local name="$1" c="$2"
    shift 2
    "$OHA" --no-tui --output-format json -z "$DURATION" -w -c "$c" -H "Authorization: Bearer $SECRET" "$@" \
        >"$WORK/$name-$c.json"
}
IFS=, read -r -a LEVELS <<<"$CONCURRENCY"
for c in "${LEVELS[@]}"; do
    echo "GET /v1/models, $c concurrent, $DURATION" >&2
    oha_run models "$c" "$URL/v1/models"
done
# Warm-up (discarded): the engine's first batches, allocator, Redis scripts loaded.
"$OHA" --no-tui -n 20 -c 4 -m POST -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' \
    -d "$BODY" "$URL/v1/completions" >/dev/null
for c in "${LEVELS[@]}"; do
    echo "POST /v1/completions (max_tokens $MAX_TOKENS), $c concurrent, $DURATION" >&2
    oha_run completions "$c" -m POST -H 'Content-Type: application/json' -d "$BODY" "$URL/v1/completions"
done

# --- report ----------------------------------------------------------------
echo
echo "Gateway load test, $(date -u +%Y-%m-%d): $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores;"
echo "model $MODEL_ID ($MODEL); $DURATION per row; load generator oha $("$OHA" --version | awk '{print $2}') on the same machine"
echo
python3 - "$WORK" "$MAX_TOKENS" "${LEVELS[@]}" <<'EOF'
import json, sys

work, max_tokens, levels = sys.argv[1], sys.argv[2], sys.argv[3:]
print("| route | concurrency | requests/s | p50 ms | p99 ms | errors (non-2xx) |")
print("|---|---:|---:|---:|---:|---:|")
for name, label in [("models", "GET /v1/models (auth only)"), ("completions", f"POST /v1/completions, max_tokens {max_tokens}")]:
    for c in levels:
        with open(f"{work}/{name}-{c}.json") as f:
            r = json.load(f)
        codes = r.get("statusCodeDistribution", {})
        bad = sum(n for code, n in codes.items() if not 200 <= int(code) < 300)
        bad += sum(r.get("errorDistribution", {}).values())
        lat = r["latencyPercentiles"]
        print(f"| {label} | {c} | {r['summary']['requestsPerSec']:.1f} | {lat['p50'] * 1e3:.2f} | {lat['p99'] * 1e3:.2f} | {bad} |")
EOF
