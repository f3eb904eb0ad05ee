#!/usr/bin/env bash
# The external backend's command on a Ray cluster: `ray job submit` runs the stage and waits for it.
#
#   [trainer.backend]
#   kind = "external"
#   command = ["bash", "/app/deploy/trainer-job/launch/ray-submit.sh"]
#
# RAY_ADDRESS is the cluster's job server (http://head:8265). The trainer and the Ray workers share a
# filesystem (NFS or similar) at $INSTRUCTD_JOB_SHARED: the snapshot and input models are copied there, the job
# writes the checkpoint there, and it is copied back into INSTRUCTD_OUTPUT_DIR for the backend to import.
# The job's packages come from requirements.txt through Ray's runtime environment.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray job server}" "${INSTRUCTD_STAGE:?}" "${INSTRUCTD_OUTPUT_DIR:?}"
SHARED="${INSTRUCTD_JOB_SHARED:-/mnt/instructd-training}"
GPUS="${INSTRUCTD_JOB_GPUS:-1}"
RUN="instructd-${INSTRUCTD_STAGE//_/-}-$(date +%s)-$$"
WORK="$SHARED/$RUN"
mkdir -p "$WORK/out"
trap 'rm -rf "$WORK"' EXIT
env_json='{}'
add() { env_json="$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d[sys.argv[2]]=sys.argv[3]; print(json.dumps(d))' "$env_json" "$1" "$2")"; }
stage_dir() { # NAME VARIABLE: copy the directory, point the variable at the copy
    local src="${!2:-}"
    if [[ -n "$src" && -d "$src" ]]; then cp -r "$src" "$WORK/$1"; add "$2" "$WORK/$1"; fi
}
stage_dir snapshot INSTRUCTD_SNAPSHOT_DIR
stage_dir policy INSTRUCTD_POLICY_DIR
stage_dir reference INSTRUCTD_REFERENCE_DIR
stage_dir reward-model INSTRUCTD_REWARD_MODEL_DIR
[[ "$INSTRUCTD_STAGE" == ppo_ptx ]] && stage_dir corpus INSTRUCTD_CORPUS_DIR
for name in INSTRUCTD_STAGE INSTRUCTD_HYPERPARAMETERS INSTRUCTD_CORPUS INSTRUCTD_EVALUATION; do
    add "$name" "${!name:-{\}}"
done
add INSTRUCTD_OUTPUT_DIR "$WORK/out"
add HF_HUB_OFFLINE 1
runtime="$(python3 -c 'import json,sys; print(json.dumps({"pip": sys.argv[1], "env_vars": json.loads(sys.argv[2])}))' \
    "$HERE/requirements.txt" "$env_json")"

ray job submit --address "$RAY_ADDRESS" --submission-id "$RUN" --working-dir "$HERE" \
    --entrypoint-num-gpus "$GPUS" --runtime-env-json "$runtime" -- python train.py
# `ray job submit` follows the logs; the job's own status decides.
ray job status --address "$RAY_ADDRESS" "$RUN" | grep -q SUCCEEDED || { echo "Ray job $RUN did not succeed" >&2; exit 1; }
cp -r "$WORK/out/." "$INSTRUCTD_OUTPUT_DIR/"
