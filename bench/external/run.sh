#!/usr/bin/env bash
# The gateway's overhead in front of an external engine: llama.cpp's
# llama-server (scripts/build-llama-server.sh) on a model exported to GGUF,
# and a release `instructd serve` with [engine] kind = "openai_http" in front
# of it. The same short completion (max_tokens 4, greedy) is sent directly to
# llama-server and through the gateway, in alternating rounds (direct,
# gateway, direct, ...) so that load from anything else on the machine falls
# on both alike; a table gives requests/s and p50/p99 of each side by side and
# what the gateway adds. Driven by `oha` (crates.io, once into .cache/bench-tools).
#
#   bash bench/external/run.sh [--model DIR | --tiny] [--duration 10s]
#                              [--concurrency 1,16] [--rounds 3] [--no-build]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
MODEL=models/smollm2-135m-instruct
TINY=0
DURATION="${DURATION:-10s}"
CONCURRENCY="${CONCURRENCY:-1,16}"
ROUNDS=3
MAX_TOKENS=4
PROMPT="Say hi"
BUILD=1

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --duration) DURATION="$2"; shift 2 ;;
        --concurrency) CONCURRENCY="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

source bench/harness.sh
ensure_tools "$BUILD"
LLAMA_SERVER="$(bash scripts/build-llama-server.sh | tail -n1)"

if [[ "$TINY" == 1 ]]; then
    MODEL="$WORK/tiny"
    "$BIN" model init-tiny "$MODEL" --seed 7 >/dev/null
elif [[ "$MODEL" == models/smollm2-135m-instruct && ! -f "$MODEL/config.json" ]]; then
    "$BIN" model fetch-default
fi
[[ -f "$MODEL/config.json" ]] || { echo "no model in $MODEL" >&2; exit 1; }
"$BIN" model export-gguf "$MODEL" "$WORK/model.gguf" >/dev/null

# --- llama-server, redis, the gateway --------------------------------------
UPSTREAM_PORT="$(free_port)"
"$LLAMA_SERVER" -m "$WORK/model.gguf" --host 127.0.0.1 --port "$UPSTREAM_PORT" --parallel 16 --ctx-size 8192 \
    --no-webui >"$WORK/llama-server.log" 2>&1 &
EXTRA_PIDS+=($!)
UPSTREAM="http://127.0.0.1:$UPSTREAM_PORT"
for _ in $(seq 600); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "$UPSTREAM/health")" == 200 ]] && break
    sleep 0.1
done
start_redis
start_gateway "$MODEL" INSTRUCTD__ENGINE__KIND=openai_http \
    "INSTRUCTD__ENGINE__OPENAI_HTTP__UPSTREAMS=[\"$UPSTREAM\"]" INSTRUCTD__ENGINE__OPENAI_HTTP__MAX_CONCURRENCY=16

SECRET="$(curl -sf "$URL/admin/keys" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    -d '{"user": "bench", "scopes": ["completions"], "limits": {"requests_per_minute": 1000000, "tokens_per_minute": 0, "max_concurrent": 0}}' \
    | json_field secret)"
MODEL_ID="$(curl -sf "$URL/v1/models" -H "Authorization: Bearer $SECRET" | json_field data.0.id)"
body() { python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2], "max_tokens": int(sys.argv[3]), "temperature": 0}))' "$@"; }
BODY="$(body "$MODEL_ID" "$PROMPT" "$MAX_TOKENS")"
# One request each way by hand: a broken setup fails here, not as a table of errors.
curl -sf "$URL/v1/completions" -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' -d "$BODY" >/dev/null
curl -sf "$UPSTREAM/v1/completions" -H 'Content-Type: application/json' -d "$BODY" >/dev/null

# --- load, alternating -----------------------------------------------------
run() { # NAME C ROUND URL [headers...]
    local name="$1" c="$2" round="$3" url="$4"
    shift 4
    "$OHA" --no-tui --output-format json -z "$DURATION" -w -c "$c" -m POST -H 'Content-Type: application/json' \
        "$@" -d "$BODY" "$url/v1/completions" >"$WORK/$name-$c-$round.json"
}
IFS=, read -r -a LEVELS <<<"$CONCURRENCY"
for c in "${LEVELS[@]}"; do
    for round in $(seq "$ROUNDS"); do
        echo "round $round, $c concurrent: direct, then through the gateway ($DURATION each)" >&2
        run direct "$c" "$round" "$UPSTREAM"
        run gateway "$c" "$round" "$URL" -H "Authorization: Bearer $SECRET"
    done
done

echo
echo "Gateway overhead in front of llama-server, $(date -u +%Y-%m-%d): $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores;"
echo "model $MODEL_ID ($MODEL, GGUF F32); POST /v1/completions max_tokens $MAX_TOKENS greedy; $ROUNDS alternating rounds of $DURATION; oha on the same machine"
echo
python3 - "$WORK" "$ROUNDS" "${LEVELS[@]}" <<'PY'
import json, statistics, sys

work, rounds, levels = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| concurrency | direct req/s | gateway req/s | direct p50 ms | gateway p50 ms | added p50 ms | direct p99 ms | gateway p99 ms | added p99 ms | errors |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for c in levels:
    side = {}
    errors = 0
    for name in ("direct", "gateway"):
        rps, p50, p99 = [], [], []
        for r in range(1, rounds + 1):
            with open(f"{work}/{name}-{c}-{r}.json") as f:
                d = json.load(f)
            errors += sum(n for code, n in d.get("statusCodeDistribution", {}).items() if not 200 <= int(code) < 300)
            errors += sum(d.get("errorDistribution", {}).values())
            rps.append(d["summary"]["requestsPerSec"])
            p50.append(d["latencyPercentiles"]["p50"] * 1e3)
            p99.append(d["latencyPercentiles"]["p99"] * 1e3)
        side[name] = (statistics.median(rps), statistics.median(p50), statistics.median(p99))
    (dr, d50, d99), (gr, g50, g99) = side["direct"], side["gateway"]
    print(f"| {c} | {dr:.1f} | {gr:.1f} | {d50:.2f} | {g50:.2f} | {g50 - d50:+.2f} | {d99:.2f} | {g99:.2f} | {g99 - d99:+.2f} | {errors} |")
print("\n(medians over the rounds)")
PY
