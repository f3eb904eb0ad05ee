#!/usr/bin/env bash
# Makes sure a Redis answers at $INSTRUCTD_REDIS_URL (default redis://127.0.0.1:6379):
# starts Debian's redis-server there if none does, installing the package if
# it is missing. Never falls back to anything else: instructd needs a real Redis.
set -euo pipefail
url="${INSTRUCTD_REDIS_URL:-redis://127.0.0.1:6379}"
hostport="${url#redis://}"; hostport="${hostport%%/*}"; hostport="${hostport##*@}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$host" ] && port=6379

answers() { (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }

if answers; then
  echo "Redis is running at $host:$port"
  exit 0
fi
if ! command -v redis-server >/dev/null; then
  echo "redis-server is not installed; installing Debian's redis-server package"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi
fi
mkdir -p .cache/redis
echo "starting redis-server on $host:$port (data in .cache/redis)"
redis-server --port "$port" --bind "$host" --dir "$PWD/.cache/redis" --daemonize yes --appendonly yes \
  --logfile "$PWD/.cache/redis/redis.log" --pidfile "$PWD/.cache/redis/redis.pid"
for _ in $(seq 50); do answers && exit 0; sleep 0.1; done
echo "redis-server did not come up at $host:$port; see .cache/redis/redis.log" >&2
exit 1
