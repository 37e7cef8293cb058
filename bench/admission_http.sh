#!/usr/bin/env bash
# Cost of admission over HTTP: POST /chat/conversations/{id}/messages with Prefer: respond-async.
#
#   bench/admission_http.sh
#
# Builds what is missing and runs under scripts/test-stack.sh (or on the stores in
# BG_TEST_DATABASE_URL and BG_TEST_REDIS_URL when both are set), like edge_baseline.sh. Then:
#  0. runs bench/edge_baseline.sh on the same stores, for the ratio below (its line goes to stderr);
#  1. migrates a database of its own, starts bg-edge on a free port (TLS off, log level warn),
#     registers a user, starts a conversation with the first agent, and posts one turn (which
#     compiles the user's admission state from Postgres);
#  2. overwrites that compiled state by hand (bg:{sN}:adm:<uid>, and its packed copy "pk"): a huge
#     request quota, rpm 0 and concurrency 0 (no limit), so that every request is admitted;
#  3. resets INFO commandstats and measures with h2load: BENCH_REQUESTS (50000) POSTs over
#     BENCH_CLIENTS (32) connections x BENCH_STREAMS (10) streams, BENCH_THREADS (2) h2load threads,
#     after BENCH_WARMUP (5000). Each request verifies the token, asks Redis about the session,
#     finds the conversation's owner and agent in the edge's memory (edge/conv_cache.c; the first
#     turn looked them up in Postgres), runs lua/admit.lua once (EVALSHA: reservation + XADD of the
#     job, which carries the user's message for the worker to store, and the job owner's key for
#     /chat/jobs/{id}/...). Nothing consumes the jobs: the llm stream is trimmed by
#     MAXLEN ~ BG_STREAM_MAXLEN.
# Prints on stdout:
#   admission_http rps=<requests/s> p50_ms=… p99_ms=… ratio_to_baseline=<rps / edge_baseline rps>
#     redis_cmds_per_admit=<EVALSHA calls / requests admitted> evalsha_us_per_call=<inside Redis>
#     round_trips_per_admit=<commands the edge sent for the user / requests admitted>
# round_trips_per_admit comes from a short MONITOR sample after the run (BENCH_SAMPLE, 200 more
# requests, one stream at a time): commands clients sent that name the user, not the ones the
# script ran ("[0 lua]"), over the requests admitted meanwhile.
# Everything else goes to stderr. It fails when any measured request answers other than 202.
# Percentiles are nearest-rank over h2load's per-request log, as in edge_baseline.sh.
set -euo pipefail

BENCH_NAME=admission_http
# shellcheck source=bench/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
requests=${BENCH_REQUESTS:-50000}
clients=${BENCH_CLIENTS:-32}
streams=${BENCH_STREAMS:-10}
threads=${BENCH_THREADS:-2}
warmup=${BENCH_WARMUP:-5000}
shards=16

command -v redis-cli >/dev/null || die "redis-cli not found"
# shellcheck disable=SC2119 # no arguments: no optional targets
bench_init

# 0. The baseline, on the same machine and stores, just before.
bench_baseline

# 1. A stack of our own.
# shellcheck disable=SC2119 # no extra settings
bench_start_edge

# Reads a string at a path of keys from a JSON file.
json_get() {
    python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    v = v[int(k)] if isinstance(v, list) else v[k]
print(v)' "$@"
}

email="bench-$$@bench.example"
printf '{"email":"%s","password":"Bench-Horse-Battery-%s"}' "$email" "$$" >"$tmp/register-body.json"
curl -fsS --http2-prior-knowledge --max-time 10 -H 'content-type: application/json' \
    --data-binary @"$tmp/register-body.json" -o "$tmp/register.json" "$base/auth/register" ||
    die "could not register the benchmark user"
token=$(json_get "$tmp/register.json" access_token) || die "no access_token in the register answer"
user_id=$(json_get "$tmp/register.json" user id) || die "no user id in the register answer"
auth=(-H "authorization: Bearer $token")
curl -fsS --http2-prior-knowledge --max-time 10 "${auth[@]}" -o "$tmp/agents.json" "$base/agents" ||
    die "GET /agents failed"
agent=$(json_get "$tmp/agents.json" data 0 id) || die "no agent"
curl -fsS --http2-prior-knowledge --max-time 10 "${auth[@]}" -H 'content-type: application/json' \
    --data-binary "{\"agent_id\":\"$agent\"}" -o "$tmp/conv.json" "$base/chat/conversations" ||
    die "could not start a conversation"
conv=$(json_get "$tmp/conv.json" id) || die "no conversation id"
url=$base/chat/conversations/$conv/messages
printf '{"content":"benchmark turn"}' >"$tmp/turn.json"
turn_args=("${auth[@]}" -H 'content-type: application/json' -H 'prefer: respond-async')
code=$(curl -sS --http2-prior-knowledge --max-time 10 "${turn_args[@]}" --data-binary @"$tmp/turn.json" \
    -o "$tmp/first.json" -w '%{http_code}' "$url") || die "the first turn failed"
[[ $code == 202 ]] || { cat "$tmp/first.json" >&2; die "the first turn answered $code, not 202"; }

# 2. The user's compiled state, by hand: the shard is FNV-1a(user id) mod 16 (bg_shard_of).
shard=$(python3 -c 'import sys
h = 0x811c9dc5
for b in sys.argv[1].encode():
    h = ((h ^ b) * 0x01000193) & 0xffffffff
print(h % int(sys.argv[2]))' "$user_id" "$shards")
rcli=(redis-cli -u "$BG_TEST_REDIS_URL")
adm="bg:{s$shard}:adm:$user_id"
[[ $("${rcli[@]}" EXISTS "$adm") == 1 ]] || die "no compiled state at $adm (shard function changed?)"
"${rcli[@]}" HSET "$adm" q_limit 1000000000000 rpm 0 conc 0 tq_limit 0 >/dev/null ||
    die "could not write $adm"
bench_repack_adm "$adm"
"${rcli[@]}" DEL "bg:{s$shard}:quota:$user_id" "bg:{s$shard}:res:$user_id" \
    "bg:{s$shard}:resd:$user_id" >/dev/null

# Prints "calls usec_per_call" of one command from INFO commandstats (0 0 when never called).
cmdstat() {
    "${rcli[@]}" INFO commandstats | tr -d '\r' | awk -F'[:,=]' -v c="cmdstat_$1" '
        $1 == c { print $3, $7; found = 1 }
        END { if (!found) print 0, 0 }'
}

stream_len() {
    "${rcli[@]}" XLEN "bg:{s$shard}:q:llm"
}

# 3. Measure.
h2_args=(-c "$clients" -m "$streams" -t "$threads" -d "$tmp/turn.json" "${turn_args[@]}")
log "warm-up: $warmup requests"
run_h2load "$tmp/warmup.txt" "$url" -n "$warmup" "${h2_args[@]}"
"${rcli[@]}" CONFIG RESETSTAT >/dev/null || die "CONFIG RESETSTAT failed"
admitted_before=$("${rcli[@]}" ZCARD "bg:{s$shard}:res:$user_id")
log "measuring: $requests POSTs, $clients connections x $streams streams, $threads threads"
run_h2load "$tmp/h2load.txt" "$url" -n "$requests" "${h2_args[@]}" --log-file="$tmp/requests.log"
admitted_after=$("${rcli[@]}" ZCARD "bg:{s$shard}:res:$user_id")
accepted=$(sed -nE 's/^status codes: ([0-9]+) 2xx.*/\1/p' "$tmp/h2load.txt")
admitted=$((admitted_after - admitted_before))
[[ $admitted == "$accepted" ]] ||
    log "warning: $admitted new reservations for $accepted 2xx answers (expired reservations purged?)"
read -r evalsha_calls evalsha_us < <(cmdstat evalsha)
read -r eval_calls _ < <(cmdstat eval)
log "EVALSHA calls $evalsha_calls, EVAL calls $eval_calls, admitted $admitted, stream length $(stream_len)"

# Round trips per admitted request: what the edge sends for the user, seen by MONITOR.
sample=${BENCH_SAMPLE:-200}
"${rcli[@]}" MONITOR >"$tmp/monitor.txt" 2>/dev/null &
monitor_pid=$!
sleep 0.5
before_sample=$("${rcli[@]}" ZCARD "bg:{s$shard}:res:$user_id")
run_h2load "$tmp/sample.txt" "$url" -n "$sample" -c 1 -m 1 -t 1 -d "$tmp/turn.json" "${turn_args[@]}"
after_sample=$("${rcli[@]}" ZCARD "bg:{s$shard}:res:$user_id")
sleep 0.5
kill "$monitor_pid" 2>/dev/null || true
wait "$monitor_pid" 2>/dev/null || true
sent=$(grep -F -- "$user_id" "$tmp/monitor.txt" | grep -vF '[0 lua]' | grep -cviF '"zcard"' || true)
log "MONITOR sample: $sent commands sent for $((after_sample - before_sample)) admitted requests"

rps=$(rps_of "$tmp/h2load.txt")
read -r p50 p99 < <(percentiles "$tmp/requests.log") || die "empty h2load request log"
ratio=$(awk -v a="$rps" -v b="$baseline_rps" 'BEGIN { printf "%.3f", a / b }')
per_admit=$(awk -v a="$((evalsha_calls + eval_calls))" -v b="$admitted" \
    'BEGIN { if (b > 0) printf "%.3f", a / b; else print "nan" }')

round_trips=$(awk -v a="$sent" -v b="$((after_sample - before_sample))" \
    'BEGIN { if (b > 0) printf "%.3f", a / b; else print "nan" }')

printf 'admission_http rps=%.0f p50_ms=%s p99_ms=%s ratio_to_baseline=%s redis_cmds_per_admit=%s evalsha_us_per_call=%s round_trips_per_admit=%s\n' \
    "$rps" "$p50" "$p99" "$ratio" "$per_admit" "$evalsha_us" "$round_trips"
