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

BENCH_NAME=auth
# shellcheck source=bench/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
requests=${BENCH_REQUESTS:-50000}
clients=${BENCH_CLIENTS:-32}
streams=${BENCH_STREAMS:-10}
threads=${BENCH_THREADS:-2}
warmup=${BENCH_WARMUP:-5000}
login_requests=${BENCH_LOGIN_REQUESTS:-400}
login_clients=${BENCH_LOGIN_CLIENTS:-4}
login_warmup=${BENCH_LOGIN_WARMUP:-20}

bench_init bench_auth_verify

# 0. The baseline, on the same machine and stores, just before.
bench_baseline

# 1. Verification and hashing alone, when the program exists.
if [[ -x $bin/bench_auth_verify ]]; then
    log "running $bin/bench_auth_verify"
    "$bin/bench_auth_verify" >"$tmp/verify.txt" || die "bench_auth_verify failed"
    grep -E '^auth_(verify|password) ' "$tmp/verify.txt" || die "bench_auth_verify printed no result"
else
    log "$bin/bench_auth_verify not found; skipping token verification"
fi

# 2. A stack of our own; the sign-in limits would turn the load into 429s.
bench_start_edge BG_LOGIN_IP_PER_MIN=100000 BG_LOGIN_FAILURES_MAX=1000

email="bench-$$@bench.example"
password="Bench-Horse-Battery-$$"
printf '{"email":"%s","password":"%s"}' "$email" "$password" >"$tmp/login.json"
curl -fsS --http2-prior-knowledge --max-time 10 -H 'content-type: application/json' \
    --data-binary @"$tmp/login.json" -o "$tmp/register.json" "$base/auth/register" ||
    die "could not register the benchmark user"
token=$(python3 -c 'import json, sys
print(json.load(open(sys.argv[1]))["access_token"])' "$tmp/register.json") ||
    die "no access_token in the register answer"

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
read -r profile_p50 profile_p99 < <(percentiles "$tmp/profile.log") || die "empty h2load profile log"
ratio=$(awk -v a="$profile_rps" -v b="$baseline_rps" 'BEGIN { printf "%.3f", a / b }')

printf 'auth_login p50_ms=%s p99_ms=%s\n' "$login_p50" "$login_p99"
printf 'auth_profile rps=%.0f p50_ms=%s p99_ms=%s ratio_to_baseline=%s\n' "$profile_rps" \
    "$profile_p50" "$profile_p99" "$ratio"
