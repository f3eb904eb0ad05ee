#!/usr/bin/env bash
# The main job: the trainer in the background and the gateway in the
# foreground, on the default config. Ctrl-C stops both (the gateway finishes
# requests in flight first).
set -euo pipefail
bin="${1:-target/release/instructd}"
export INSTRUCTD_ADMIN_KEY="${INSTRUCTD_ADMIN_KEY:-$(bash scripts/dev-admin-key.sh)}"
export INSTRUCTD_LOG="${INSTRUCTD_LOG:-info}"
"$bin" train &
trainer=$!
trap 'kill -TERM $trainer 2>/dev/null; wait $trainer 2>/dev/null || true' EXIT
"$bin" serve
