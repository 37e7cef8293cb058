#!/usr/bin/env bash
# Cost of billing: Paddle notifications acknowledged by the edge, and ledger postings.
#
#   bench/billing.sh
#
# Builds what is missing and runs under scripts/test-stack.sh (or on the stores in
# BG_TEST_DATABASE_URL and BG_TEST_REDIS_URL when both are set), like edge_baseline.sh. Then:
#  1. migrates a database of its own and starts bg-edge on a free port (TLS off, log level warn)
#     with a webhook secret; build/bin/bench_billing webhook posts BENCH_REQUESTS (20000) distinct
#     signed transaction.completed notifications from BENCH_CLIENTS (8) keep-alive connections,
#     after BENCH_WARMUP (1000). Each one is verified (HMAC over the raw body), stored in
#     webhook_inbox and queued on the billing stream before its 200; no worker consumes them.
#  2. build/bin/bench_billing ledger, on the same database: BENCH_POSTINGS (20000) balanced
#     payment postings through bg_ledger_post(), one per database transaction, then
#     BENCH_BATCH (100) per database transaction, then a plain COPY of the same rows into tables
#     made LIKE the ledger's, in the same run.
# Prints on stdout:
#   billing webhook_acks_per_s=… webhook_p50_ms=… webhook_p99_ms=… ledger_single_per_s=…
#     ledger_batched_per_s=… copy_per_s=… single_ratio_to_copy=… batched_ratio_to_copy=…
# Everything else goes to stderr. It fails when any notification is not answered 200 "accepted".
set -euo pipefail

BENCH_NAME=billing
# shellcheck source=bench/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
requests=${BENCH_REQUESTS:-20000}
clients=${BENCH_CLIENTS:-8}
warmup=${BENCH_WARMUP:-1000}
postings=${BENCH_POSTINGS:-20000}
batch=${BENCH_BATCH:-100}
secret=pdl_ntfset_bench_$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')

bench_init bench_billing
[[ -x $bin/bench_billing ]] || die "$bin/bench_billing missing (cmake --build … --target bench_billing)"
bench_start_edge BG_PADDLE_WEBHOOK_SECRETS="$secret"

log "warm-up: $warmup notifications"
"$bin/bench_billing" webhook "$base" "$secret" "$warmup" "$clients" >/dev/null
log "measuring: $requests notifications over $clients connections"
web=$("$bin/bench_billing" webhook "$base" "$secret" "$requests" "$clients")
log "$web"
log "ledger: $postings postings single, then in batches of $batch, then COPY"
led=$("$bin/bench_billing" ledger "${BG_TEST_DATABASE_URL%/*}/$db" "$postings" "$batch")
log "$led"

val() { sed -nE "s/.*[[:space:]]$1=([^[:space:]]+).*/\1/p" <<<"$2"; }
printf 'billing webhook_acks_per_s=%s webhook_p50_ms=%s webhook_p99_ms=%s ledger_single_per_s=%s ledger_batched_per_s=%s copy_per_s=%s single_ratio_to_copy=%s batched_ratio_to_copy=%s\n' \
    "$(val acks_per_s "$web")" "$(val p50_ms "$web")" "$(val p99_ms "$web")" \
    "$(val single_per_s "$led")" "$(val batched_per_s "$led")" "$(val copy_per_s "$led")" \
    "$(val single_ratio_to_copy "$led")" "$(val batched_ratio_to_copy "$led")"
