# Shared by the benchmark scripts (source it after parsing arguments): a
# scratch directory removed on exit, the release binary and `oha` (crates.io,
# built once into .cache/bench-tools), a private redis-server on a free port,
# and a release `instructd serve` on a free port with a bootstrap admin key.
# Everything started here is stopped on exit.

BIN="${BIN:-target/release/instructd}"
TOOLS="${TOOLS:-.cache/bench-tools}"
OHA_VERSION="${OHA_VERSION:-1.16.0}"
OHA="$TOOLS/bin/oha"
WORK="$(mktemp -d)"
REDIS_PID=""
GATEWAY_PID=""
# Further processes a script starts (trainers, a second gateway): stopped first.
EXTRA_PIDS=()
cleanup() {
    local pid
    for pid in "${EXTRA_PIDS[@]}" "$GATEWAY_PID" "$REDIS_PID"; do
        [[ -n "$pid" ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ensure_tools BUILD: builds the binary (unless BUILD is 0), installs redis and oha if missing.
ensure_tools() {
    [[ "$1" == 0 ]] || cargo build --release --bin instructd
    [[ -x "$BIN" ]] || { echo "no $BIN (run without --no-build)" >&2; exit 1; }
    command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null \
        || (apt-get update -qq && apt-get install -y -qq redis-server redis-tools)
    if [[ ! -x "$OHA" ]]; then
        echo "installing oha $OHA_VERSION into $TOOLS (once; a few minutes)" >&2
        cargo install oha --version "$OHA_VERSION" --locked --root "$TOOLS"
    fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# json_field PATH < json: one field, e.g. data.0.id.
json_field() { python3 -c 'import json, sys; v = json.load(sys.stdin); [v := v[int(k) if k.isdigit() else k] for k in sys.argv[1].split(".")]; print(v)' "$1"; }

rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

# start_redis: sets REDIS_PORT and REDIS_PID.
start_redis() {
    REDIS_PORT="$(free_port)"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 100); do
        rcli ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    cat "$WORK/redis.log" >&2
    exit 1
}

# start_gateway MODEL [NAME=VALUE...]: serves MODEL; sets ADMIN, URL and GATEWAY_PID.
start_gateway() {
    local model="$1"
    shift
    ADMIN="sk-bench-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    env INSTRUCTD_ADDR=127.0.0.1:0 \
        INSTRUCTD_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
        INSTRUCTD_ADMIN_KEY="$ADMIN" \
        INSTRUCTD_MODEL="$model" \
        INSTRUCTD_CONFIG="${INSTRUCTD_CONFIG:-configs/default.toml}" \
        INSTRUCTD_LOG=warn \
        INSTRUCTD__GATEWAY__PLAYGROUND__SPILL_DIR="$WORK/spill" \
        INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR="$WORK/checkpoints" \
        "$@" "$BIN" serve >"$WORK/gateway.out" 2>"$WORK/gateway.err" &
    GATEWAY_PID=$!
    URL=""
    for _ in $(seq 1800); do
        URL="$(sed -n 's/^instructd gateway listening on //p' "$WORK/gateway.out" | head -n1)"
        [[ -n "$URL" ]] && return 0
        kill -0 "$GATEWAY_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "the gateway did not start:" >&2
    cat "$WORK/gateway.err" >&2
    exit 1
}
