#!/usr/bin/env bash
# The external backend's command on Kubernetes: runs one stage as a Kubernetes Job and waits for it.
#
#   [trainer.backend]
#   kind = "external"
#   command = ["bash", "/app/deploy/trainer-job/launch/kubernetes.sh"]
#
# The trainer pod and the job's pods share a ReadWriteMany volume (training-pvc.yaml, mounted at
# $INSTRUCTD_JOB_SHARED in both). This script copies the snapshot and the input models there, writes the
# stage's environment as a file, creates the Job from job.yaml (one pod) or indexed-job.yaml
# (INSTRUCTD_JOB_NODES pods, one accelerate process group over them), waits for it, and copies the checkpoint the
# job wrote back into INSTRUCTD_OUTPUT_DIR, where the backend checks and imports it and the trainer publishes
# it as usual (gateways then fetch it over HTTP from the trainer). Needs kubectl and the Role in rbac.yaml.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${INSTRUCTD_STAGE:?}" "${INSTRUCTD_SNAPSHOT_DIR:?}" "${INSTRUCTD_POLICY_DIR:?}" "${INSTRUCTD_OUTPUT_DIR:?}"
NAMESPACE="${INSTRUCTD_JOB_NAMESPACE:-instructd}"
SHARED="${INSTRUCTD_JOB_SHARED:-/var/lib/instructd/training}"
IMAGE="${INSTRUCTD_JOB_IMAGE:-instructd-trainer-job:latest}"
NODES="${INSTRUCTD_JOB_NODES:-1}"
GPUS="${INSTRUCTD_JOB_GPUS_PER_NODE:-1}"
ACCELERATE_CONFIG="${INSTRUCTD_JOB_ACCELERATE_CONFIG:-/job/accelerate/fsdp.yaml}"
TIMEOUT="${INSTRUCTD_JOB_TIMEOUT:-24h}"
RUN="instructd-${INSTRUCTD_STAGE//_/-}-$(date +%s)-$$"
WORK="$SHARED/$RUN"

mkdir -p "$WORK/out"
trap 'rm -rf "$WORK"; kubectl -n "$NAMESPACE" delete job "$RUN" --ignore-not-found >/dev/null 2>&1 || true' EXIT
copy() { [[ -n "${2:-}" ]] && cp -r "$2" "$WORK/$1"; }
copy snapshot "$INSTRUCTD_SNAPSHOT_DIR"
copy policy "$INSTRUCTD_POLICY_DIR"
copy reference "${INSTRUCTD_REFERENCE_DIR:-}"
copy reward-model "${INSTRUCTD_REWARD_MODEL_DIR:-}"
[[ "$INSTRUCTD_STAGE" == ppo_ptx && -d "${INSTRUCTD_CORPUS_DIR:-}" ]] && copy corpus "$INSTRUCTD_CORPUS_DIR"

# The stage's environment, as the job's pods see the shared volume (mounted at /shared there).
{
    printf 'INSTRUCTD_STAGE=%q\n' "$INSTRUCTD_STAGE"
    printf 'INSTRUCTD_SNAPSHOT_DIR=%q\n' "/shared/$RUN/snapshot"
    printf 'INSTRUCTD_POLICY_DIR=%q\n' "/shared/$RUN/policy"
    printf 'INSTRUCTD_OUTPUT_DIR=%q\n' "/shared/$RUN/out"
    printf 'INSTRUCTD_HYPERPARAMETERS=%q\n' "${INSTRUCTD_HYPERPARAMETERS:-{\}}"
    printf 'INSTRUCTD_CORPUS=%q\n' "${INSTRUCTD_CORPUS:-{\}}"
    printf 'INSTRUCTD_EVALUATION=%q\n' "${INSTRUCTD_EVALUATION:-{\}}"
    [[ -d "$WORK/reference" ]] && printf 'INSTRUCTD_REFERENCE_DIR=%q\n' "/shared/$RUN/reference"
    [[ -d "$WORK/reward-model" ]] && printf 'INSTRUCTD_REWARD_MODEL_DIR=%q\n' "/shared/$RUN/reward-model"
    [[ -d "$WORK/corpus" ]] && printf 'INSTRUCTD_CORPUS_DIR=%q\n' "/shared/$RUN/corpus"
    true
} > "$WORK/job.env"

# PPO-ptx runs on one process (its rollouts and EMA are sequential).
TEMPLATE="$HERE/job.yaml"
if [[ "$NODES" -gt 1 && "$INSTRUCTD_STAGE" != ppo_ptx ]]; then TEMPLATE="$HERE/indexed-job.yaml"; else NODES=1; fi
[[ "$INSTRUCTD_STAGE" == ppo_ptx ]] && GPUS=1
sed -e "s|\${RUN}|$RUN|g" -e "s|\${IMAGE}|$IMAGE|g" -e "s|\${NODES}|$NODES|g" -e "s|\${GPUS}|$GPUS|g" \
    -e "s|\${ACCELERATE_CONFIG}|$ACCELERATE_CONFIG|g" "$TEMPLATE" | kubectl -n "$NAMESPACE" apply -f -

# Complete or failed, whichever comes first.
kubectl -n "$NAMESPACE" wait --for=condition=complete "job/$RUN" --timeout="$TIMEOUT" &
complete=$!
kubectl -n "$NAMESPACE" wait --for=condition=failed "job/$RUN" --timeout="$TIMEOUT" &
failed=$!
wait -n "$complete" "$failed" || true
kill "$complete" "$failed" 2>/dev/null || true
kubectl -n "$NAMESPACE" logs "job/$RUN" --tail=50 >&2 || true
if [[ "$(kubectl -n "$NAMESPACE" get job "$RUN" -o jsonpath='{.status.succeeded}')" -lt 1 ]]; then
    echo "job $RUN did not succeed" >&2
    exit 1
fi
cp -r "$WORK/out/." "$INSTRUCTD_OUTPUT_DIR/"
