#!/usr/bin/env bash
# Telegram webhook acknowledgements: POST /webhooks/telegram/{bot} with distinct update_ids.
#
#   bench/telegram.sh
#
# Builds what is missing and runs under scripts/test-stack.sh (or on the stores in
# BG_TEST_DATABASE_URL and BG_TEST_REDIS_URL when both are set), like edge_baseline.sh. Then:
#  0. runs bench/edge_baseline.sh on the same stores, for the ratio below (its line goes to stderr);
#  1. migrates a database of its own and starts bg-edge with a quick-start bot
#     (BG_TELEGRAM_BOT_TOKEN, BG_TELEGRAM_WEBHOOK_SECRET: its secret is checked on the loop);
#  2. measures with bench/telegram_load.c (built here with cc; HTTP/1.1 keep-alive, as Telegram
#     delivers, one request in flight per connection): BENCH_REQUESTS (50000) updates over
#     BENCH_TG_CONNS (320, the baseline's 32 connections x 10 streams) connections, after
#     BENCH_WARMUP (5000), each with its own update_id and one of BENCH_TG_CHATS (1000) private
#     chats, with the right secret.
#     Each request is checked (secret hash, JSON, update_id) and accepted by one EVALSHA of
#     lua/telegram_accept.lua (dedup mark, chat sequence, XADD); no worker consumes the jobs, the
#     stream is trimmed by MAXLEN ~ BG_STREAM_MAXLEN;
#  3. checks that every update was enqueued once (the sum of the chats' sequence counters);
#  4. runs the same client against GET /healthz: what this client and HTTP/1.1 can do on this
#     machine, since h2load (the baseline's client) cannot send a different body per request.
# Prints on stdout:
#   telegram rps=<acks/s> p50_ms=… p99_ms=… ratio_to_baseline=<rps / edge_baseline rps>
#     client_healthz_rps=<the client's GET /healthz> ratio_to_client_ceiling=<rps / that>
# Everything else goes to stderr. It fails when any measured request answers other than 200.
set -euo pipefail

BENCH_NAME=telegram
# shellcheck source=bench/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
requests=${BENCH_REQUESTS:-50000}
conns=${BENCH_TG_CONNS:-320}
warmup=${BENCH_WARMUP:-5000}
chats=${BENCH_TG_CHATS:-1000}
slug=424242
secret=bench-secret_$$

command -v cc >/dev/null || die "cc not found (the client is bench/telegram_load.c)"
command -v redis-cli >/dev/null || die "redis-cli not found"
# shellcheck disable=SC2119 # no arguments: no optional targets
bench_init

# 0. The baseline, on the same machine and stores, just before.
bench_baseline

# 1. A stack of our own, with the quick-start bot.
bench_start_edge BG_TELEGRAM_BOT_TOKEN="$slug:BENCH-token" BG_TELEGRAM_WEBHOOK_SECRET="$secret"
cc -O2 -o "$tmp/telegram_load" "$root/bench/telegram_load.c" || die "cannot build telegram_load"
load=$tmp/telegram_load
port=${base##*:}
rcli=(redis-cli -u "$BG_TEST_REDIS_URL")

# 2. Measure (warm-up ids first, then the measured ones, all distinct).
log "measuring: $requests updates after $warmup, $conns connections"
line=$("$load" post 127.0.0.1 "$port" "/webhooks/telegram/$slug" "$secret" "$conns" "$requests" \
    "$warmup" 1 "$chats") || die "the webhook benchmark failed"
log "webhook: $line"
rps=$(sed -nE 's/.*rps=([0-9.]+).*/\1/p' <<<"$line")
p50=$(sed -nE 's/.*p50_ms=([0-9.]+).*/\1/p' <<<"$line")
p99=$(sed -nE 's/.*p99_ms=([0-9.]+).*/\1/p' <<<"$line")

# 3. Every update enqueued once: the chats' sequence counters add up to the updates sent.
total=0
while read -r key; do
    [[ -n $key ]] || continue
    total=$((total + $("${rcli[@]}" GET "$key")))
done < <("${rcli[@]}" --scan --pattern "bg:{s*}:tg:seq:$slug:*")
[[ $total == $((requests + warmup)) ]] ||
    die "$total updates enqueued for $((requests + warmup)) sent"

# 4. The same client against /healthz.
ceiling=$("$load" get 127.0.0.1 "$port" /healthz "$conns" "$requests" "$warmup") ||
    die "the client ceiling run failed"
log "client on /healthz: $ceiling"
ceiling_rps=$(sed -nE 's/.*rps=([0-9.]+).*/\1/p' <<<"$ceiling")

ratio=$(awk -v a="$rps" -v b="$baseline_rps" 'BEGIN { printf "%.3f", a / b }')
ratio_client=$(awk -v a="$rps" -v b="$ceiling_rps" 'BEGIN { printf "%.3f", a / b }')
printf 'telegram rps=%.0f p50_ms=%s p99_ms=%s ratio_to_baseline=%s client_healthz_rps=%.0f ratio_to_client_ceiling=%s\n' \
    "$rps" "$p50" "$p99" "$ratio" "$ceiling_rps" "$ratio_client"
