#!/usr/bin/env bash
# Runs a command next to a throw-away PostgreSQL and Redis.
#
#   scripts/test-stack.sh <command> [args…]
#
# Makes a temporary directory, starts PostgreSQL (fast, non-durable settings; role bg is a
# superuser so tests can create their own databases) and Redis there on free loopback ports,
# exports
#   BG_TEST_DATABASE_URL=postgresql://bg@127.0.0.1:PORT/postgres
#   BG_TEST_REDIS_URL=redis://127.0.0.1:PORT/0
# runs the command, then stops both servers and removes the directory whatever happened (also on
# Ctrl-C and SIGTERM). Exits with the command's status.
# Its own messages go to stderr, so the command owns stdout.
#
# When both variables are already set (a stack is running, or CI provides one) the command runs
# directly against those servers. The logs are kept when BG_TEST_STACK_KEEP=1.
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

if [[ $# -eq 0 ]]; then
    echo "usage: $0 <command> [args…]" >&2
    exit 2
fi

if [[ -n ${BG_TEST_DATABASE_URL:-} && -n ${BG_TEST_REDIS_URL:-} ]]; then
    echo "test-stack: using the stores in BG_TEST_DATABASE_URL and BG_TEST_REDIS_URL" >&2
    exec "$@"
fi

# Prints a TCP port on 127.0.0.1 that nothing listens on. The kernel picks it when python3 is
# there; otherwise random ports from the dynamic range are probed with bash's /dev/tcp.
free_port() {
    local p i
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
        return
    fi
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            printf '%s\n' "$p"
            return
        fi
    done
    echo "test-stack: no free port found" >&2
    return 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bg-stack.XXXXXX")
# The postgres user (when we are root) must be able to reach tmp/pg.
chmod 711 "$tmp"
pg_started=0
redis_started=0

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [[ $redis_started -eq 1 ]]; then
        "$here/redis.sh" stop "$tmp/redis" >/dev/null
    fi
    if [[ $pg_started -eq 1 ]]; then
        "$here/pg.sh" stop "$tmp/pg" >/dev/null
    fi
    if [[ ${BG_TEST_STACK_KEEP:-0} == 1 ]]; then
        echo "test-stack: kept $tmp" >&2
    else
        rm -rf -- "$tmp"
    fi
    echo "test-stack: stopped PostgreSQL and Redis" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail_with_log() {
    echo "test-stack: $1; last lines of $2:" >&2
    tail -n 20 -- "$2" >&2 || true
    exit 1
}

# A port can be taken between the probe and the bind: retry with new ports a few times.
for attempt in 1 2 3; do
    pg_port=$(free_port)
    pg_started=1
    if "$here/pg.sh" start "$tmp/pg" "$pg_port" --fast --superuser >"$tmp/pg-start.log" 2>&1; then
        break
    fi
    [[ $attempt -eq 3 ]] && { cat "$tmp/pg-start.log" >&2; fail_with_log "PostgreSQL did not start" "$tmp/pg.log"; }
done
for attempt in 1 2 3; do
    redis_port=$(free_port)
    while [[ $redis_port == "$pg_port" ]]; do
        redis_port=$(free_port)
    done
    redis_started=1
    if "$here/redis.sh" start "$tmp/redis" "$redis_port" >"$tmp/redis-start.log" 2>&1; then
        break
    fi
    [[ $attempt -eq 3 ]] && { cat "$tmp/redis-start.log" >&2; fail_with_log "Redis did not start" "$tmp/redis.log"; }
done

export BG_TEST_DATABASE_URL="postgresql://bg@127.0.0.1:$pg_port/postgres"
export BG_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
echo "test-stack: PostgreSQL on 127.0.0.1:$pg_port, Redis on 127.0.0.1:$redis_port (in $tmp)" >&2

# The command runs in the foreground so that Ctrl-C reaches it; cleanup runs when it returns.
set +e
"$@"
status=$?
set -e
exit "$status"
