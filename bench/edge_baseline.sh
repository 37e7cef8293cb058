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

BENCH_NAME=edge_baseline
# shellcheck source=bench/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
requests=${BENCH_REQUESTS:-200000}
clients=${BENCH_CLIENTS:-32}
streams=${BENCH_STREAMS:-10}
threads=${BENCH_THREADS:-2}
warmup=${BENCH_WARMUP:-20000}

# shellcheck disable=SC2119 # no arguments: no optional targets
bench_init
# shellcheck disable=SC2119 # no extra settings
bench_start_edge

url=$base/healthz
load=(-c "$clients" -m "$streams" -t "$threads")
log "warm-up: $warmup requests"
run_h2load "$tmp/warmup.txt" "$url" -n "$warmup" "${load[@]}"
log "measuring: $requests requests, $clients connections x $streams streams, $threads threads"
run_h2load "$tmp/h2load.txt" "$url" -n "$requests" "${load[@]}" --log-file="$tmp/requests.log"
rps=$(rps_of "$tmp/h2load.txt")
read -r p50 p99 < <(percentiles "$tmp/requests.log") || die "empty h2load request log"

printf 'edge_baseline rps=%.0f p50_ms=%s p99_ms=%s\n' "$rps" "$p50" "$p99"
