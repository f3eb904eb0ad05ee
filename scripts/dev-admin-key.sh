#!/usr/bin/env bash
# Prints the admin key `make run` bootstraps the gateway with:
# $INSTRUCTD_ADMIN_KEY when set, else a development key created once in
# .cache/dev-admin-key (announced on stderr the first time only).
set -euo pipefail
if [ -n "${INSTRUCTD_ADMIN_KEY:-}" ]; then echo "$INSTRUCTD_ADMIN_KEY"; exit 0; fi
file=.cache/dev-admin-key
if [ ! -s "$file" ]; then
  mkdir -p .cache
  (umask 077; echo "sk-instructd-admin-$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" > "$file")
  echo "created a development admin key (kept in $file, shown only now): $(cat "$file")" >&2
fi
cat "$file"
