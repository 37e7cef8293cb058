#!/usr/bin/env bash
# Chat turns end to end: time to first token through the product against the demo provider alone,
# thousands of open SSE streams on one edge and their memory, and completed turns per second.
#
#   bench/chat.sh
#
# Builds what is missing (bg-edge, bgctl, bg-worker, bg-demo-llm) and runs under
# scripts/test-stack.sh (or on the stores in BG_TEST_DATABASE_URL and BG_TEST_REDIS_URL when both
# are set), like edge_baseline.sh. The client is bench/chat_client.mjs (node:http2, h2c). Then:
#  0. runs bench/edge_baseline.sh on the same stores, for the ratio of part 3 (its line goes to
#     stderr);
#  1. starts bg-edge (2 loops), an llm worker (BENCH_CHAT_WORKERS threads) and a usage worker,
#     registers BENCH_CHAT_USERS users with BENCH_CHAT_CONVS conversations each, grants each the
#     yearly plan and lifts their limits by hand in the compiled admission state (rpm 0,
#     concurrency 0: no limit; the request quota stays the plan's), as admission_http.sh does;
#  2. TTFT: a demo provider whose first token comes after BENCH_CHAT_TOKEN_MS (20) ms and then one
#     token every BENCH_CHAT_TOKEN_MS; BENCH_CHAT_TTFT_TURNS (1000) turns after 200 warm-up with
#     BENCH_CHAT_STREAMS (100) in flight over BENCH_CHAT_CONNS (10) connections, first straight to
#     the provider (POST /v1/chat/completions, stream true: time to the first content chunk), then
#     through the product (POST /chat/conversations/{id}/messages: time to the first
#     "event: delta"); the added time is the difference of the percentiles. The client splits the
#     product's time into edge (to the response head), worker (to the first delta's append, from
#     its Redis entry id) and relay (append to client); the CPU seconds of each process show
#     where the load goes;
#  3. throughput: the worker restarted on a demo provider with no delay and no token pacing;
#     BENCH_CHAT_TURNS (3000) turns after 300 warm-up, BENCH_CHAT_STREAMS in flight, each read to
#     "event: done"; turns/s over the baseline's requests/s; also CPU seconds per process and
#     Postgres's commits and rows per turn;
#  4. open streams: BENCH_CHAT_HOLD (5000) jobs created with Prefer: respond-async (their message
#     asks the provider for a token every 2 s, so the jobs the worker holds stream slowly and the
#     rest wait in the queue), then GET /chat/jobs/{id}/stream for each over
#     BENCH_CHAT_HOLD_CONNS (100) connections, held open BENCH_CHAT_HOLD_S (10) s; the edge's VmRSS
#     with the connections open and with the streams open gives the memory per stream.
# Prints on stdout one line:
#   chat ttft_direct_p50_ms=… ttft_direct_p99_ms=… ttft_product_p50_ms=… ttft_product_p99_ms=…
#     ttft_added_p50_ms=… ttft_added_p99_ms=… streams_open=… kib_per_stream=… turns_per_s=…
#     baseline_rps=… ratio_to_baseline=…
# and the parts' details on stderr. Fails when any turn or stream fails.
set -euo pipefail

BENCH_NAME=chat
# shellcheck source=bench/lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
users=${BENCH_CHAT_USERS:-10}
convs=${BENCH_CHAT_CONVS:-10}
streams=${BENCH_CHAT_STREAMS:-100}
conns=${BENCH_CHAT_CONNS:-10}
token_ms=${BENCH_CHAT_TOKEN_MS:-20}
ttft_turns=${BENCH_CHAT_TTFT_TURNS:-1000}
turns=${BENCH_CHAT_TURNS:-3000}
workers=${BENCH_CHAT_WORKERS:-128}
hold=${BENCH_CHAT_HOLD:-5000}
hold_conns=${BENCH_CHAT_HOLD_CONNS:-100}
hold_s=${BENCH_CHAT_HOLD_S:-10}
# lanes start this far apart in all, about one turn (a reply is about 75 tokens)
ramp_ms=${BENCH_CHAT_RAMP_MS:-$((75 * ${BENCH_CHAT_TOKEN_MS:-20}))}
shards=16

command -v node >/dev/null || die "node not found (the client is bench/chat_client.mjs)"
command -v redis-cli >/dev/null || die "redis-cli not found"
bench_init bg-worker bg-demo-llm
client=("node" "$root/bench/chat_client.mjs")

# 0. The baseline, on the same machine and stores, just before.
bench_baseline

# 1. The stack: edge, workers, users.
bench_start_edge BG_ACCESS_TTL_S=3600
mapfile -t store_env < <(bench_store_env)
db_url=${BG_TEST_DATABASE_URL%/*}/$db
rcli=(redis-cli -u "$BG_TEST_REDIS_URL")

# Starts the llm worker on the provider at $demo_url (a restart stops the previous one first).
llm_pid=''
start_llm_worker() {
    [[ -z $llm_pid ]] || bench_stop "$llm_pid"
    bench_start_worker "llm-worker-$1" llm BG_LLM_BASE_URL="$demo_url" BG_LLM_MODEL=demo-1 \
        BG_WORKER_CONCURRENCY="$workers" BG_SHUTDOWN_GRACE_MS=1000
    llm_pid=$worker_pid
}

log "registering $users users with $convs conversations each"
"${client[@]}" setup --base "$base" --users "$users" --convs "$convs" --out "$tmp/users.json" >&2 ||
    die "set-up failed"
mapfile -t user_rows < <(python3 -c 'import json, sys
for u in json.load(open(sys.argv[1])):
    print(u["email"], u["user_id"])' "$tmp/users.json")
for row in "${user_rows[@]}"; do
    read -r email user_id <<<"$row"
    env "${store_env[@]}" "$bin/bgctl" plan grant --email "$email" --plan yearly --days 30 \
        >>"$tmp/grant.log" 2>&1 || { cat "$tmp/grant.log" >&2; die "bgctl plan grant failed"; }
    # the grant compiled the user's state; lift the rate limit and the concurrency cap (shard:
    # FNV-1a of the user id mod 16, bg_shard_of)
    shard=$(python3 -c 'import sys
h = 0x811c9dc5
for b in sys.argv[1].encode():
    h = ((h ^ b) * 0x01000193) & 0xffffffff
print(h % int(sys.argv[2]))' "$user_id" "$shards")
    adm="bg:{s$shard}:adm:$user_id"
    [[ $("${rcli[@]}" EXISTS "$adm") == 1 ]] || die "no compiled state at $adm (shard function changed?)"
    "${rcli[@]}" HSET "$adm" rpm 0 conc 0 tq_limit 0 >/dev/null || die "could not write $adm"
    bench_repack_adm "$adm"
done
bench_start_worker usage-worker usage BG_WORKER_CONCURRENCY=4 BG_SHUTDOWN_GRACE_MS=1000
usage_pid=$worker_pid

# CPU seconds used so far by each process named (NAME=PID …; for postgres the postmaster and its
# children, the backends included), as "NAME=SECONDS …".
redis_pid=$("${rcli[@]}" INFO server | tr -d '\r' | sed -nE 's/^process_id:([0-9]+)$/\1/p')
pg_pid=$(head -n 1 "$(psql -X -qAt "$db_url" -c 'SHOW data_directory')/postmaster.pid" 2>/dev/null) ||
    pg_pid=''
cpu_now() {
    python3 - "$@" <<'PY'
import os, sys
tck = os.sysconf("SC_CLK_TCK")
def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rindex(")") + 2:].split()  # fields from the 3rd (state) on
out = []
for arg in sys.argv[1:]:
    name, _, pid = arg.partition("=")
    f = stat(pid) if pid else None
    if f is None:
        out.append(f"{name}=nan")
        continue
    t = int(f[11]) + int(f[12])
    if name == "postgres":  # reaped children are in cutime/cstime, live backends are summed
        t += int(f[13]) + int(f[14])
        for p in os.listdir("/proc"):
            if p.isdigit():
                c = stat(p)
                if c is not None and c[1] == pid:
                    t += int(c[11]) + int(c[12])
    out.append(f"{name}={t / tck:.2f}")
print(" ".join(out))
PY
}
# Prints the CPU seconds used between two cpu_now lines (BEFORE AFTER), per process.
cpu_diff() {
    python3 -c 'import sys
a = dict(kv.split("=") for kv in sys.argv[1].split())
b = dict(kv.split("=") for kv in sys.argv[2].split())
print(" ".join(f"{k}={float(b[k]) - float(a[k]):.2f}" for k in b))' "$1" "$2"
}
procs() {
    printf '%s\n' "edge=$edge_pid" "llm_worker=$llm_pid" "usage_worker=$usage_pid" \
        "demo=$demo_pid" "redis=$redis_pid" "postgres=$pg_pid"
}

# Prints Postgres's counters of the bench database: "commits rows_read rows_written".
pg_counts() {
    psql -X -qAt -F ' ' "$db_url" -c "SELECT xact_commit, tup_returned + tup_fetched,
        tup_inserted + tup_updated + tup_deleted FROM pg_stat_database
        WHERE datname = current_database()"
}
# Prints what Postgres did per turn between two pg_counts lines (BEFORE AFTER TURNS).
pg_per_turn() {
    local a b
    read -r -a a <<<"$1"
    read -r -a b <<<"$2"
    awk -v n="$3" -v c="$((b[0] - a[0]))" -v r="$((b[1] - a[1]))" -v w="$((b[2] - a[2]))" \
        'BEGIN { printf "commits=%.1f rows_read=%.0f rows_written=%.1f\n", c / n, r / n, w / n }'
}

# Reads key=value from a client's line: field LINE KEY.
field() {
    sed -nE "s/.*(^| )$2=([^ ]+).*/\\2/p" <<<"$1"
}

# 2. Time to first token, direct and through the product, same provider pacing.
bench_start_demo_llm demo-paced --delay-ms "$token_ms" --tokens-per-second \
    "$(awk -v ms="$token_ms" 'BEGIN { printf "%g", 1000 / ms }')"
start_llm_worker paced
load=(--streams "$streams" --conns "$conns" --warmup 200 --requests "$ttft_turns" --ramp-ms "$ramp_ms")
log "TTFT direct: $ttft_turns streams to the provider, $streams in flight"
direct=$("${client[@]}" direct --url "$demo_url" "${load[@]}") || die "direct run failed"
log "direct: $direct"
log "TTFT product: $ttft_turns turns, $streams in flight over $conns connections"
mapfile -t pl < <(procs)
cpu0=$(cpu_now "${pl[@]}")
product=$("${client[@]}" turns --base "$base" --users "$tmp/users.json" "${load[@]}") ||
    die "product run failed"
log "product: $product"
log "product: CPU seconds during the run (warm-up included): $(cpu_diff "$cpu0" "$(cpu_now "${pl[@]}")")"
bench_stop "$demo_pid"

# 3. Completed turns per second with a provider that does not wait.
bench_start_demo_llm demo-fast --delay-ms 0 --tokens-per-second 0
start_llm_worker fast
log "throughput: $turns turns, $streams in flight over $conns connections"
mapfile -t pl < <(procs)
cpu0=$(cpu_now "${pl[@]}")
pg0=$(pg_counts)
thr=$("${client[@]}" turns --base "$base" --users "$tmp/users.json" --streams "$streams" \
    --conns "$conns" --warmup 300 --requests "$turns" --ramp-ms 200) || die "throughput run failed"
log "throughput: $thr"
log "throughput: CPU seconds during the run (warm-up included): $(cpu_diff "$cpu0" "$(cpu_now "${pl[@]}")")"
sleep 2 # Postgres publishes its counters at most once a second, the usage worker lags a little
log "throughput: Postgres per turn (warm-up included): $(pg_per_turn "$pg0" "$(pg_counts)" $((turns + 300)))"

# 4. Open streams on one edge.
log "open streams: $hold jobs, then one stream each over $hold_conns connections"
held=$("${client[@]}" hold --base "$base" --users "$tmp/users.json" --streams "$hold" \
    --conns "$hold_conns" --edge-pid "$edge_pid" --hold-s "$hold_s") || die "open-streams run failed"
log "open streams: $held"

d50=$(field "$direct" ttft_p50_ms)
d99=$(field "$direct" ttft_p99_ms)
p50=$(field "$product" ttft_p50_ms)
p99=$(field "$product" ttft_p99_ms)
tps=$(field "$thr" turns_per_s)
kib=$(field "$held" kib_per_stream)
open=$(field "$held" still_open)
awk -v d50="$d50" -v d99="$d99" -v p50="$p50" -v p99="$p99" -v tps="$tps" -v kib="$kib" \
    -v open="$open" -v b="$baseline_rps" 'BEGIN {
    printf "chat ttft_direct_p50_ms=%s ttft_direct_p99_ms=%s ttft_product_p50_ms=%s", d50, d99, p50
    printf " ttft_product_p99_ms=%s ttft_added_p50_ms=%.3f ttft_added_p99_ms=%.3f", p99, p50 - d50, p99 - d99
    printf " streams_open=%s kib_per_stream=%s turns_per_s=%s baseline_rps=%.0f", open, kib, tps, b
    printf " ratio_to_baseline=%.5f\n", tps / b
}'
