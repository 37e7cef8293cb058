#!/usr/bin/env bash
# Cost of admission control: lua/admit.lua and lua/settle.lua on a private redis-server.
#
#   bench/admission.sh
#
# Builds bench_admission if needed, starts redis-server on a free loopback port in a temporary
# directory (no persistence), runs BENCH_ADMITS (100000) admits and settles from BENCH_THREADS (4)
# threads, and prints one line on stdout:
#   admission evalsha_per_admit=<x> script_us_per_call=<y> admits_per_s=<z> settle_us_per_call=<s>
# evalsha_per_admit is judged against 1 (one round trip per request); script_us_per_call is the
# time an admit spends inside Redis (cmdstat_evalsha usec_per_call), which bounds the admits one
# Redis shard can take: about 1e6 / script_us_per_call a second. Everything else goes to stderr.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build=${BG_BUILD_DIR:-build}
[[ $build == /* ]] || build=$root/$build
admits=${BENCH_ADMITS:-100000}
threads=${BENCH_THREADS:-4}

log() {
    printf 'admission: %s\n' "$*" >&2
}
die() {
    log "$*"
    exit 1
}

command -v redis-server >/dev/null || die "redis-server not found (scripts/deps.sh installs it)"
if [[ -f $build/CMakeCache.txt ]]; then
    cmake --build "$build" -j2 --target bench_admission >&2 || die "build failed"
else
    cmake -S "$root" -B "$build" >&2 || die "configure failed"
    cmake --build "$build" -j2 --target bench_admission >&2 || die "build failed"
fi
bench=$build/bin/bench_admission
[[ -x $bench ]] || die "$bench missing"

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bg-bench-adm.XXXXXX")
redis_pid=''
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $redis_pid ]] && kill -0 "$redis_pid" 2>/dev/null; then
        kill -TERM "$redis_pid"
        for _ in {1..50}; do
            kill -0 "$redis_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$redis_pid" 2>/dev/null
        wait "$redis_pid" 2>/dev/null
    fi
    rm -rf -- "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port=$(free_port)
redis-server --port "$port" --bind 127.0.0.1 --dir "$tmp" --save '' --appendonly no \
    --protected-mode no --loglevel warning >"$tmp/redis.log" 2>&1 &
redis_pid=$!
for ((i = 0; i < 100; i++)); do
    [[ $(redis-cli -p "$port" ping 2>/dev/null) == PONG ]] && break
    kill -0 "$redis_pid" 2>/dev/null || { cat "$tmp/redis.log" >&2; die "redis-server exited"; }
    sleep 0.05
done
[[ $(redis-cli -p "$port" ping 2>/dev/null) == PONG ]] || die "redis-server does not answer"

log "redis-server on 127.0.0.1:$port; $admits admits from $threads thread(s)"
"$bench" "redis://127.0.0.1:$port/0" "$admits" "$threads"
