#!/usr/bin/env bash
# Baseline throughput and latency of bg-edge: GET /healthz over h2c with h2load.
#
#   bench/edge_baseline.sh
#
# Builds what is missing, runs under scripts/test-stack.sh (or on the stores in
# BG_TEST_DATABASE_URL and BG_TEST_REDIS_URL when both are set), migrates a database of its own,
# starts bg-edge on a free port (TLS off, log level warn), waits for /healthz, warms up, measures,
# and prints one line on stdout:
#   edge_baseline rps=<requests per second> p50_ms=<median latency> p99_ms=<99th percentile>
# Everything else goes to stderr. It fails when any request fails or answers other than 2xx.
# The load: BENCH_REQUESTS (200000) requests over BENCH_CLIENTS (32) connections with
# BENCH_STREAMS (10) concurrent streams each, BENCH_THREADS (2) h2load threads, after
# BENCH_WARMUP (20000) warm-up requests. Percentiles are nearest-rank over h2load's per-request
# log (--log-file: start time, status, duration in microseconds).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build=${BG_BUILD_DIR:-build}
[[ $build == /* ]] || build=$root/$build
bin=$build/bin
requests=${BENCH_REQUESTS:-200000}
clients=${BENCH_CLIENTS:-32}
streams=${BENCH_STREAMS:-10}
threads=${BENCH_THREADS:-2}
warmup=${BENCH_WARMUP:-20000}

log() {
    printf 'edge_baseline: %s\n' "$*" >&2
}
die() {
    log "$*"
    exit 1
}

command -v h2load >/dev/null || die "h2load not found (scripts/deps.sh installs nghttp2-client)"

if [[ -z ${BG_BENCH_BUILT:-} ]]; then
    if [[ -f $build/CMakeCache.txt ]]; then
        cmake --build "$build" -j2 --target bg-edge bgctl >&2 || die "build failed"
    else
        make -s build >&2 || die "build failed"
    fi
    export BG_BENCH_BUILT=1
fi
if [[ -z ${BG_TEST_DATABASE_URL:-} || -z ${BG_TEST_REDIS_URL:-} ]]; then
    exec "$root/scripts/test-stack.sh" "$0" "$@"
fi
[[ -x $bin/bg-edge && -x $bin/bgctl ]] || die "$bin/bg-edge or bgctl missing (make build)"

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bg-bench.XXXXXX")
db=bg_bench_$$
edge_pid=''
db_created=0

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $edge_pid ]] && kill -0 "$edge_pid" 2>/dev/null; then
        kill -TERM "$edge_pid"
        for _ in {1..100}; do
            kill -0 "$edge_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$edge_pid" 2>/dev/null
        wait "$edge_pid" 2>/dev/null
    fi
    if [[ $db_created -eq 1 ]]; then
        psql -X -q "$BG_TEST_DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    fi
    rm -rf -- "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A database of our own on the stack's server, next to whatever else uses it.
psql -X -q -v ON_ERROR_STOP=1 "$BG_TEST_DATABASE_URL" -c "CREATE DATABASE $db" >/dev/null ||
    die "could not create database $db on BG_TEST_DATABASE_URL"
db_created=1
database_url="${BG_TEST_DATABASE_URL%/*}/$db"
port=$(free_port)

# Only these settings, whatever .env says.
edge_env=(
    BG_ENV_FILE=/dev/null
    BG_DATABASE_URL="$database_url"
    BG_REDIS_URL="$BG_TEST_REDIS_URL"
    BG_HTTP_PORT="$port"
    BG_HTTPS_PORT=0
    BG_JWT_SECRET="$(head -c 48 /dev/urandom | base64 -w0)"
    BG_LOG_LEVEL=warn
    BG_LOG_FORMAT=text
)

log "migrating $db"
env "${edge_env[@]}" "$bin/bgctl" migrate >"$tmp/migrate.log" 2>&1 || {
    cat "$tmp/migrate.log" >&2
    die "bgctl migrate failed"
}

log "starting bg-edge on 127.0.0.1:$port"
env "${edge_env[@]}" "$bin/bg-edge" >"$tmp/edge.log" 2>&1 &
edge_pid=$!
url=http://127.0.0.1:$port/healthz
for ((i = 0; i < 100; i++)); do
    curl -fs -o /dev/null --max-time 1 "$url" && break
    if ! kill -0 "$edge_pid" 2>/dev/null; then
        tail -n 20 "$tmp/edge.log" >&2
        die "bg-edge exited during start-up"
    fi
    sleep 0.1
done
curl -fs -o /dev/null --max-time 1 "$url" || {
    tail -n 20 "$tmp/edge.log" >&2
    die "$url does not answer 2xx after 10 s"
}

# Prints h2load's output; fails unless every request got a 2xx.
run_h2load() {
    local n=$1 out=$2
    shift 2
    h2load -n "$n" -c "$clients" -m "$streams" -t "$threads" "$@" "$url" >"$out" 2>&1 || {
        cat "$out" >&2
        die "h2load failed"
    }
    local total ok
    total=$(sed -nE 's/^requests: ([0-9]+) total.*/\1/p' "$out")
    ok=$(sed -nE 's/^status codes: ([0-9]+) 2xx.*/\1/p' "$out")
    if [[ -z $total || $ok != "$total" ]]; then
        cat "$out" >&2
        die "not every request answered 2xx ($ok of $total)"
    fi
}

log "warm-up: $warmup requests"
run_h2load "$warmup" "$tmp/warmup.txt"
log "measuring: $requests requests, $clients connections x $streams streams, $threads threads"
run_h2load "$requests" "$tmp/h2load.txt" --log-file="$tmp/requests.log"

rps=$(sed -nE 's/^finished in [^,]+, ([0-9.]+) req\/s.*/\1/p' "$tmp/h2load.txt")
[[ -n $rps ]] || { cat "$tmp/h2load.txt" >&2; die "could not read req/s from h2load"; }
# Nearest-rank percentiles of the per-request durations (third column, microseconds).
read -r p50 p99 < <(cut -f3 "$tmp/requests.log" | sort -n | awk '
    { d[NR] = $1 }
    END {
        if (NR == 0) exit 1
        i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
        i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
        printf "%.3f %.3f\n", d[i50] / 1000, d[i99] / 1000
    }') || die "empty h2load request log"

printf 'edge_baseline rps=%.0f p50_ms=%s p99_ms=%s\n' "$rps" "$p50" "$p99"
