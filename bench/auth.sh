#!/usr/bin/env bash
# Cost of authentication on bg-edge: token verification, sign-in, and an authenticated read.
#
#   bench/auth.sh
#
# Builds what is missing and runs under scripts/test-stack.sh (or on the stores in
# BG_TEST_DATABASE_URL and BG_TEST_REDIS_URL when both are set), like edge_baseline.sh. Then:
#  0. runs bench/edge_baseline.sh on the same stores, for the ratio below (its line goes to stderr);
#  1. runs build/bin/bench_auth_verify when it was built and prints its lines as they are
#     (auth_verify us_per_verify=… verifies_per_s=…, auth_password …);
#  2. migrates a database of its own, starts bg-edge on a free port (TLS off, log level warn, the
#     sign-in limits out of the way), registers a user, and measures POST /auth/login with h2load:
#     BENCH_LOGIN_REQUESTS (400) over BENCH_LOGIN_CLIENTS (4) connections, one stream each, after
#     BENCH_LOGIN_WARMUP (20); argon2id dominates, so this is the password hash's latency under load;
#  3. measures GET /auth/profile with the user's Bearer token: BENCH_REQUESTS (50000) requests over
#     BENCH_CLIENTS (32) connections x BENCH_STREAMS (10) streams, BENCH_THREADS (2) h2load
#     threads, after BENCH_WARMUP (5000); every request verifies the token, asks Redis about the
#     session and reads the user from Postgres.
# Prints on stdout:
#   auth_login p50_ms=<median> p99_ms=<99th percentile>
#   auth_profile rps=<requests/s> p50_ms=… p99_ms=… ratio_to_baseline=<rps / edge_baseline rps>
# Everything else goes to stderr. It fails when any measured request fails or answers other than
# 2xx. Percentiles are nearest-rank over h2load's per-request log, as in edge_baseline.sh.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build=${BG_BUILD_DIR:-build}
[[ $build == /* ]] || build=$root/$build
bin=$build/bin
requests=${BENCH_REQUESTS:-50000}
clients=${BENCH_CLIENTS:-32}
streams=${BENCH_STREAMS:-10}
threads=${BENCH_THREADS:-2}
warmup=${BENCH_WARMUP:-5000}
login_requests=${BENCH_LOGIN_REQUESTS:-400}
login_clients=${BENCH_LOGIN_CLIENTS:-4}
login_warmup=${BENCH_LOGIN_WARMUP:-20}

log() {
    printf 'auth: %s\n' "$*" >&2
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
    # Optional: another benchmark's program; a tree without it (or mid-edit) is no failure here.
    cmake --build "$build" -j2 --target bench_auth_verify >&2 2>/dev/null ||
        log "bench_auth_verify not built; skipping it"
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

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bg-bench-auth.XXXXXX")
db=bg_bench_auth_$$
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

# 0. The baseline, on the same machine and stores, just before.
log "edge baseline first (bench/edge_baseline.sh)"
baseline=$("$root/bench/edge_baseline.sh") || die "bench/edge_baseline.sh failed"
log "$baseline"
baseline_rps=$(sed -nE 's/^edge_baseline rps=([0-9.]+) .*/\1/p' <<<"$baseline")
[[ -n $baseline_rps ]] || die "no rps in the baseline's line: $baseline"

# 1. Verification and hashing alone, when the program exists.
if [[ -x $bin/bench_auth_verify ]]; then
    log "running $bin/bench_auth_verify"
    "$bin/bench_auth_verify" >"$tmp/verify.txt" || die "bench_auth_verify failed"
    grep -E '^auth_(verify|password) ' "$tmp/verify.txt" || die "bench_auth_verify printed no result"
else
    log "$bin/bench_auth_verify not found; skipping token verification"
fi

# 2. A stack of our own.
psql -X -q -v ON_ERROR_STOP=1 "$BG_TEST_DATABASE_URL" -c "CREATE DATABASE $db" >/dev/null ||
    die "could not create database $db on BG_TEST_DATABASE_URL"
db_created=1
database_url="${BG_TEST_DATABASE_URL%/*}/$db"
port=$(free_port)
base=http://127.0.0.1:$port

# Only these settings, whatever .env says. The sign-in limits would turn the load into 429s.
edge_env=(
    BG_ENV_FILE=/dev/null
    BG_DATABASE_URL="$database_url"
    BG_REDIS_URL="$BG_TEST_REDIS_URL"
    BG_HTTP_PORT="$port"
    BG_HTTPS_PORT=0
    BG_JWT_SECRET="$(head -c 48 /dev/urandom | base64 -w0)"
    BG_LOG_LEVEL=warn
    BG_LOG_FORMAT=text
    BG_LOGIN_IP_PER_MIN=100000
    BG_LOGIN_FAILURES_MAX=1000
)

log "migrating $db"
env "${edge_env[@]}" "$bin/bgctl" migrate >"$tmp/migrate.log" 2>&1 || {
    cat "$tmp/migrate.log" >&2
    die "bgctl migrate failed"
}

log "starting bg-edge on 127.0.0.1:$port"
env "${edge_env[@]}" "$bin/bg-edge" >"$tmp/edge.log" 2>&1 &
edge_pid=$!
for ((i = 0; i < 100; i++)); do
    curl -fs -o /dev/null --max-time 1 "$base/healthz" && break
    if ! kill -0 "$edge_pid" 2>/dev/null; then
        tail -n 20 "$tmp/edge.log" >&2
        die "bg-edge exited during start-up"
    fi
    sleep 0.1
done
curl -fs -o /dev/null --max-time 1 "$base/healthz" || {
    tail -n 20 "$tmp/edge.log" >&2
    die "$base/healthz does not answer 2xx after 10 s"
}

email="bench-$$@bench.example"
password="Bench-Horse-Battery-$$"
printf '{"email":"%s","password":"%s"}' "$email" "$password" >"$tmp/login.json"
curl -fsS --http2-prior-knowledge --max-time 10 -H 'content-type: application/json' \
    --data-binary @"$tmp/login.json" -o "$tmp/register.json" "$base/auth/register" ||
    die "could not register the benchmark user"
token=$(python3 -c 'import json, sys
print(json.load(open(sys.argv[1]))["access_token"])' "$tmp/register.json") ||
    die "no access_token in the register answer"

# Runs h2load against url; fails unless every request got a 2xx.
run_h2load() {
    local out=$1 url=$2
    shift 2
    h2load "$@" "$url" >"$out" 2>&1 || {
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

# Prints "p50 p99" in milliseconds: nearest rank over h2load's per-request log (3rd column, µs).
percentiles() {
    cut -f3 "$1" | sort -n | awk '
        { d[NR] = $1 }
        END {
            if (NR == 0) exit 1
            i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
            i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
            printf "%.3f %.3f\n", d[i50] / 1000, d[i99] / 1000
        }'
}

rps_of() {
    sed -nE 's/^finished in [^,]+, ([0-9.]+) req\/s.*/\1/p' "$1"
}

login_args=(-c "$login_clients" -m 1 -t 1 -d "$tmp/login.json" -H 'content-type: application/json')
log "login warm-up: $login_warmup requests"
run_h2load "$tmp/login-warmup.txt" "$base/auth/login" -n "$login_warmup" "${login_args[@]}"
log "login: $login_requests requests, $login_clients connections x 1 stream"
run_h2load "$tmp/login.txt" "$base/auth/login" -n "$login_requests" "${login_args[@]}" \
    --log-file="$tmp/login.log"
read -r login_p50 login_p99 < <(percentiles "$tmp/login.log") || die "empty h2load login log"
log "login: $(rps_of "$tmp/login.txt") sign-ins/s"

# 3. An authenticated read.
profile_args=(-c "$clients" -m "$streams" -t "$threads" -H "authorization: Bearer $token")
log "profile warm-up: $warmup requests"
run_h2load "$tmp/profile-warmup.txt" "$base/auth/profile" -n "$warmup" "${profile_args[@]}"
log "profile: $requests requests, $clients connections x $streams streams, $threads threads"
run_h2load "$tmp/profile.txt" "$base/auth/profile" -n "$requests" "${profile_args[@]}" \
    --log-file="$tmp/profile.log"
profile_rps=$(rps_of "$tmp/profile.txt")
[[ -n $profile_rps ]] || { cat "$tmp/profile.txt" >&2; die "could not read req/s from h2load"; }
read -r profile_p50 profile_p99 < <(percentiles "$tmp/profile.log") || die "empty h2load profile log"
ratio=$(awk -v a="$profile_rps" -v b="$baseline_rps" 'BEGIN { printf "%.3f", a / b }')

printf 'auth_login p50_ms=%s p99_ms=%s\n' "$login_p50" "$login_p99"
printf 'auth_profile rps=%.0f p50_ms=%s p99_ms=%s ratio_to_baseline=%s\n' "$profile_rps" \
    "$profile_p50" "$profile_p99" "$ratio"
