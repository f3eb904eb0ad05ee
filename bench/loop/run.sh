#!/usr/bin/env bash
# The whole loop on the real default model (SmolLM2-135M-Instruct), measured
# per refresh: wall time of each stage, win rate against the starting model
# under the hidden preference on held-out prompts (configs/evaluation_prompts.txt,
# never sent by the simulated people), KL from the SFT policy and the held-out
# pre-training loss change (the alignment tax), as the evaluation gate measured
# them.
#
# Two rounds, as the paper iterates: round one's simulated users and labelers
# write demonstrations and rank samples of the starting model (SFT refresh;
# an operator promotes it), round two ranks samples of the SFT policy (reward
# model, then PPO-ptx from SFT). Starts its own redis-server, a release
# `instructd serve` for the loop and a second one serving the starting model
# (the win-rate baseline), and runs `instructd train` between the rounds.
#
#   bash bench/loop/run.sh [--preference contains:blue] [--prompts 32]
#                          [--no-build] [--keep DIR]
#
# --preference  the hidden rule (see `instructd simulate-labelers --help`)
# --prompts     playground prompts per round (default 32)
# --keep DIR    copy checkpoints, snapshots and the trainer's journal to DIR
# --no-build    use target/release/instructd as it is
# Trainer settings are the defaults of configs/default.toml unless overridden
# with INSTRUCTD__TRAINER__... variables in the environment.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PREFERENCE="contains:blue"
PROMPTS=32
BUILD=1
KEEP=""

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --preference) PREFERENCE="$2"; shift 2 ;;
        --prompts) PROMPTS="$2"; shift 2 ;;
        --keep) KEEP="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

source bench/harness.sh
[[ "$BUILD" == 0 ]] || cargo build --release --bin instructd
command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server redis-tools)
"$BIN" model fetch-default >/dev/null
"$BIN" model fetch-corpus >/dev/null
MODEL="models/smollm2-135m-instruct"
TRAINER_PID=""

start_redis
start_gateway "$MODEL"
INITIAL="$(curl -sf "$URL/admin/checkpoints" -H "Authorization: Bearer $ADMIN" | json_field serving)"
echo "gateway $URL serving $INITIAL" >&2

admin() { curl -sf "$URL$2" -X "$1" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' ${3:+-d "$3"}; }

# Each round asks its own prompts (snapshots drop prompts sharing a long prefix with earlier ones).
round_prompts() {
    python3 - "$1" "$2" <<'EOF'
import sys
round_, n = int(sys.argv[1]), int(sys.argv[2])
pool = [l.strip() for l in open("configs/simulation_prompts.txt") if l.strip() and not l.startswith("#")]
for i in range(n):
    p = pool[(i + round_ * 17) % len(pool)]
    print(p if round_ == 1 else f"{p} (Answer in your own words, take {round_}.)")
EOF
}

simulate() { # ROUND K DEMONSTRATIONS
    round_prompts "$1" "$PROMPTS" >"$WORK/prompts-$1.txt"
    INSTRUCTD_ADMIN_KEY="$ADMIN" "$BIN" simulate-labelers --url "$URL" --preference "$PREFERENCE" \
        --users 12 --labelers 2 --prompts "$PROMPTS" --k "$2" --max-tokens 32 --demonstrations "$3" \
        --seed "$1" --prompts-file "$WORK/prompts-$1.txt" 2>"$WORK/simulate-$1.err" | tail -n1
}

start_trainer() {
    env INSTRUCTD_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" INSTRUCTD_MODEL="$MODEL" \
        INSTRUCTD_CONFIG=configs/default.toml INSTRUCTD_LOG="${INSTRUCTD_LOG:-info}" \
        INSTRUCTD__TRAINER__DATA_DIR="$WORK/data" INSTRUCTD__TRAINER__METRICS_ADDR=127.0.0.1:0 \
        INSTRUCTD__TRAINER__BATCH=100000 INSTRUCTD__TRAINER__SNAPSHOT_MIN_EVENTS=1 \
        INSTRUCTD__TRAINER__REFRESH__MIN_NEW_RANKINGS=4 \
        INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR="$WORK/checkpoints" \
        "$BIN" train >>"$WORK/trainer.out" 2>>"$WORK/trainer.err" &
    TRAINER_PID=$!
    EXTRA_PIDS+=("$TRAINER_PID")
}

# wait_for PYTHON_CONDITION: polls /admin/checkpoints until the condition on `rows` holds; prints its value.
wait_for() {
    for _ in $(seq 7200); do
        local found
        found="$(admin GET /admin/checkpoints | python3 -c "
import json, sys
rows = json.load(sys.stdin)['data']
failed = [r for r in rows if r['role'] == 'failed']
assert not failed, failed
hit = $1
print(hit or '')")"
        [[ -n "$found" ]] && { echo "$found"; return 0; }
        kill -0 "$TRAINER_PID" 2>/dev/null || { echo "the trainer stopped:" >&2; tail -20 "$WORK/trainer.err" >&2; exit 1; }
        sleep 1
    done
    echo "timed out" >&2
    exit 1
}

START=$(date +%s)
echo "round 1: people on the starting model" >&2
R1="$(simulate 1 4 1)"
start_trainer
SFT="$(wait_for "next((r['id'] for r in rows if r['stage'] == 'sft' and r['role'] == 'ready'), None)")"
admin POST "/admin/checkpoints/$SFT/promote" >/dev/null
kill "$TRAINER_PID"; wait "$TRAINER_PID" 2>/dev/null || true; TRAINER_PID=""
echo "round 2: people on $SFT" >&2
R2="$(simulate 2 4 0)"
start_trainer
PPO="$(wait_for "next((r['id'] for r in rows if r['stage'] == 'ppo_ptx'), None)")"
# A PPO policy the gate held back is not loaded; the table still reports it.
sleep 5
LOOP_SECS=$(( $(date +%s) - START ))

# The starting model on a second gateway: the win-rate baseline.
BASE_PORT="$(free_port)"
env INSTRUCTD_ADDR="127.0.0.1:$BASE_PORT" INSTRUCTD_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
    INSTRUCTD_MODEL="$MODEL" INSTRUCTD_CONFIG=configs/default.toml INSTRUCTD_LOG=warn \
    INSTRUCTD__GATEWAY__PLAYGROUND__SPILL_DIR="$WORK/spill-base" \
    INSTRUCTD__GATEWAY__ROLLOUT__CHECKPOINTS_DIR="$WORK/checkpoints-base" \
    "$BIN" serve >"$WORK/base.out" 2>"$WORK/base.err" &
EXTRA_PIDS+=($!)
for _ in $(seq 1800); do grep -q "listening on" "$WORK/base.out" 2>/dev/null && break; sleep 0.1; done

win_rate() { # CHECKPOINT
    INSTRUCTD_ADMIN_KEY="$ADMIN" "$BIN" win-rate --url "$URL" --baseline-url "http://127.0.0.1:$BASE_PORT" \
        --preference "$PREFERENCE" --candidate "$1" --baseline "$INITIAL" --prompts 32 --samples 2 \
        --max-tokens 32 2>/dev/null | tail -n1
}
SFT_WIN="$(win_rate "$SFT")"
PPO_ROLE="$(admin GET /admin/checkpoints | python3 -c "import json,sys; print(next(r['role'] for r in json.load(sys.stdin)['data'] if r['id'] == '$PPO'))")"
PPO_WIN='{}'
[[ "$PPO_ROLE" == ready ]] && PPO_WIN="$(win_rate "$PPO")"

admin GET /admin/checkpoints >"$WORK/checkpoints.json"
python3 - "$WORK/checkpoints.json" "$SFT_WIN" "$PPO_WIN" "$SFT" "$PPO" "$R1" "$R2" "$LOOP_SECS" "$PREFERENCE" <<'EOF'
import json, sys
rows = {r["id"]: r for r in json.load(open(sys.argv[1]))["data"]}
wins = {sys.argv[4]: json.loads(sys.argv[2]), sys.argv[5]: json.loads(sys.argv[3])}
r1, r2 = json.loads(sys.argv[6]), json.loads(sys.argv[7])
print(f"hidden preference: {sys.argv[9]}; loop wall time {int(sys.argv[8])} s "
      f"(round 1: {r1.get('logged')} prompts, round 2: {r2.get('logged')} prompts)\n")
print("| refresh | stage wall time | win rate vs start (hidden rule) | RM win rate vs serving | KL from SFT (nats) | alignment tax (nats/token) | gate |")
print("|---|---:|---:|---:|---:|---:|---|")
def f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)
for r in sorted(rows.values(), key=lambda r: r["created_at_ms"]):
    m, ev = r["metrics"], r["metrics"].get("evaluation") or {}
    w = wins.get(r["id"], {})
    extra = ""
    if r["stage"] == "reward_model":
        extra = f" (val. pair accuracy {f(m.get('val_accuracy_before'), '{:.2f}')} -> {f(m.get('val_accuracy'), '{:.2f}')})"
    gate = "-" if not ev else ("passed" if ev.get("passed") else "held back: " + "; ".join(ev.get("reasons", [])))
    print(f"| {r['stage']}{extra} | {f(m.get('wall_secs'), '{:.0f} s')} | {f(w.get('win_rate'), '{:.2f}')} | "
          f"{f(ev.get('win_rate'), '{:.2f}')} | {f(ev.get('kl_from_sft'), '{:.2f}')} | {f(ev.get('alignment_tax'), '{:+.3f}')} | {gate} |")
ppo = rows.get(sys.argv[5])
if ppo:
    print("\nPPO iterations:\n\n| iteration | reward | KL | entropy | clip fraction | value loss | ptx loss | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for it in ppo["metrics"].get("iterations", []):
        print(f"| {it['iteration']} | {it['reward_mean']:+.3f} | {it['kl']:.3f} | {it['entropy']:.3f} | "
              f"{it['clip_fraction']:.3f} | {it['value_loss']:.4f} | {f(it.get('ptx_loss'))} | {it['wall_secs']:.0f} |")
EOF
if [[ -n "$KEEP" ]]; then
    mkdir -p "$KEEP"
    cp -r "$WORK/checkpoints.json" "$WORK/data/training.jsonl" "$WORK/trainer.out" "$KEEP/" 2>/dev/null || true
fi
