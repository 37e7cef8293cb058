# shellcheck shell=bash
# What the HTTP benchmarks share: building, the private stack, one bg-edge on a free port, h2load
# runs that must all answer 2xx, nearest-rank percentiles, and the edge baseline for ratios.
# Sourced by bench/*.sh after they set BENCH_NAME; nothing here prints on stdout.

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
script=$(cd -- "$(dirname -- "$0")" && pwd)/$(basename -- "$0") # before the cd below
cd "$root" || exit 1
build=${BG_BUILD_DIR:-build}
[[ $build == /* ]] || build=$root/$build
bin=$build/bin
tmp=''
db=''
db_created=0
edge_pid=''
bench_pids=() # more processes started by bench_spawn, stopped on exit

log() {
    printf '%s: %s\n' "$BENCH_NAME" "$*" >&2
}
die() {
    log "$*"
    exit 1
}

# Builds bg-edge and bgctl (and the optional targets given) once, then re-runs the calling script
# under scripts/test-stack.sh unless BG_TEST_DATABASE_URL and BG_TEST_REDIS_URL are both set.
bench_init() {
    command -v h2load >/dev/null || die "h2load not found (scripts/deps.sh installs nghttp2-client)"
    if [[ -z ${BG_BENCH_BUILT:-} ]]; then
        if [[ -f $build/CMakeCache.txt ]]; then
            cmake --build "$build" -j2 --target bg-edge bgctl >&2 || die "build failed"
        else
            make -s build >&2 || die "build failed"
        fi
        local target
        for target in "$@"; do
            # optional programs: a tree without them is no failure here
            cmake --build "$build" -j2 --target "$target" >&2 2>/dev/null ||
                log "$target not built; skipping it"
        done
        export BG_BENCH_BUILT=1
    fi
    if [[ -z ${BG_TEST_DATABASE_URL:-} || -z ${BG_TEST_REDIS_URL:-} ]]; then
        exec "$root/scripts/test-stack.sh" "$script"
    fi
    [[ -x $bin/bg-edge && -x $bin/bgctl ]] || die "$bin/bg-edge or bgctl missing (make build)"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/bg-bench.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# shellcheck disable=SC2317 # called by the EXIT trap
bench_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    local pid
    for pid in "${bench_pids[@]}"; do
        bench_stop "$pid"
    done
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
    [[ -n $tmp ]] && rm -rf -- "$tmp"
    exit "$status"
}

# Creates a database of its own on the stack's server, migrates it, starts bg-edge on a free port
# (TLS off, log level warn, a fresh token key) with the extra BG_* settings given, and waits for
# /healthz. Sets base (http://127.0.0.1:PORT) and edge_pid.
bench_start_edge() {
    db=bg_bench_${BENCH_NAME}_$$
    psql -X -q -v ON_ERROR_STOP=1 "$BG_TEST_DATABASE_URL" -c "CREATE DATABASE $db" >/dev/null ||
        die "could not create database $db on BG_TEST_DATABASE_URL"
    db_created=1
    local port
    port=$(free_port)
    base=http://127.0.0.1:$port
    # only these settings, whatever .env says
    local edge_env=(
        BG_ENV_FILE=/dev/null
        BG_DATABASE_URL="${BG_TEST_DATABASE_URL%/*}/$db"
        BG_REDIS_URL="$BG_TEST_REDIS_URL"
        BG_HTTP_PORT="$port"
        BG_HTTPS_PORT=0
        BG_JWT_SECRET="$(head -c 48 /dev/urandom | base64 -w0)"
        BG_LOG_LEVEL=warn
        BG_LOG_FORMAT=text
        "$@"
    )
    log "migrating $db"
    env "${edge_env[@]}" "$bin/bgctl" migrate >"$tmp/migrate.log" 2>&1 || {
        cat "$tmp/migrate.log" >&2
        die "bgctl migrate failed"
    }
    log "starting bg-edge on 127.0.0.1:$port"
    env "${edge_env[@]}" "$bin/bg-edge" >"$tmp/edge.log" 2>&1 &
    edge_pid=$!
    local i
    for ((i = 0; i < 100; i++)); do
        curl -fs -o /dev/null --max-time 1 "$base/healthz" && return 0
        if ! kill -0 "$edge_pid" 2>/dev/null; then
            tail -n 20 "$tmp/edge.log" >&2
            die "bg-edge exited during start-up"
        fi
        sleep 0.1
    done
    tail -n 20 "$tmp/edge.log" >&2
    die "$base/healthz does not answer 2xx after 10 s"
}

# Runs h2load (OUT URL ARGS…) into OUT; fails unless every request got a 2xx.
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

# Prints the requests per second of an h2load output file; fails when it has none.
rps_of() {
    local rps
    rps=$(sed -nE 's/^finished in [^,]+, ([0-9.]+) req\/s.*/\1/p' "$1")
    [[ -n $rps ]] || { cat "$1" >&2; die "could not read req/s from h2load"; }
    printf '%s\n' "$rps"
}

# Runs bench/edge_baseline.sh on the same stores and sets baseline_rps (its line goes to stderr).
bench_baseline() {
    log "edge baseline first (bench/edge_baseline.sh)"
    local line
    line=$("$root/bench/edge_baseline.sh") || die "bench/edge_baseline.sh failed"
    log "$line"
    baseline_rps=$(sed -nE 's/^edge_baseline rps=([0-9.]+) .*/\1/p' <<<"$line")
    [[ -n $baseline_rps ]] || die "no rps in the baseline's line: $line"
}

# Stops one process started by bench_spawn: SIGTERM, up to 10 s, then SIGKILL. Unknown or gone
# processes are no failure.
bench_stop() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in {1..100}; do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Starts a process in the background (NAME CMD ARGS…) with its output in $tmp/NAME.log, adds it
# to the processes stopped on exit, and sets spawned_pid.
bench_spawn() {
    local name=$1
    shift
    "$@" >"$tmp/$name.log" 2>&1 &
    spawned_pid=$!
    bench_pids+=("$spawned_pid")
}

# The settings of bench_start_edge's database and Redis, for more binaries on the same stores
# (bgctl, bg-worker): prints them one per line. Only after bench_start_edge.
bench_store_env() {
    printf '%s\n' BG_ENV_FILE=/dev/null "BG_DATABASE_URL=${BG_TEST_DATABASE_URL%/*}/$db" \
        "BG_REDIS_URL=$BG_TEST_REDIS_URL" BG_LOG_LEVEL=warn BG_LOG_FORMAT=text
}

# After a bench changed numbers of a user's compiled admission state by hand (KEY, a
# bg:{sN}:adm:<uid> hash, with HSET), packs them again into the copy lua/admit.lua reads: the
# field "pk", nine little-endian doubles then the status, "\n" and the features, as
# BG_POLICY_PK_MAX in shared/include/bg/policy.h lays it out (the plan compiler writes both at once).
bench_repack_adm() {
    local lua="local f = redis.call('HMGET', KEYS[1], 'q_limit', 'w_anchor', 'w_len', 'w_until',
    'rpm', 'burst', 'conc', 'tok_cap', 'tq_limit', 'status', 'features')
local n = {}
for i = 1, 9 do n[i] = tonumber(f[i]) end
return redis.call('HSET', KEYS[1], 'pk', struct.pack('<ddddddddd', unpack(n)) .. f[10] .. '\n' .. f[11])"
    redis-cli -u "$BG_TEST_REDIS_URL" EVAL "$lua" 1 "$1" >/dev/null || die "could not pack $1"
}

# Starts the demo provider bg-demo-llm on a free port (NAME, then its options, e.g. --delay-ms 20)
# and waits for /v1/models. Sets demo_url (the base URL with /v1, as BG_LLM_BASE_URL wants it) and
# demo_pid.
bench_start_demo_llm() {
    local name=$1
    shift
    [[ -x $bin/bg-demo-llm ]] || die "$bin/bg-demo-llm missing (cmake --build … --target bg-demo-llm)"
    local port
    port=$(free_port)
    bench_spawn "$name" env BG_ENV_FILE=/dev/null BG_LOG_LEVEL=warn BG_LOG_FORMAT=text \
        "$bin/bg-demo-llm" --port "$port" "$@"
    demo_pid=$spawned_pid
    demo_url=http://127.0.0.1:$port/v1
    local i
    for ((i = 0; i < 100; i++)); do
        curl -fs -o /dev/null --max-time 1 "$demo_url/models" && return 0
        kill -0 "$demo_pid" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$tmp/$name.log" >&2
    die "bg-demo-llm ($name) did not come up"
}

# Starts bg-worker (NAME ROLES, then extra BG_* settings) on bench_start_edge's stores, with no
# health port, and sets worker_pid. It is given a moment to connect; it fails if it exits.
bench_start_worker() {
    local name=$1 roles=$2
    shift 2
    [[ -x $bin/bg-worker ]] || die "$bin/bg-worker missing (cmake --build … --target bg-worker)"
    local env_list
    mapfile -t env_list < <(bench_store_env)
    bench_spawn "$name" env "${env_list[@]}" BG_WORKER_PORT=0 "$@" "$bin/bg-worker" --roles "$roles"
    worker_pid=$spawned_pid
    sleep 0.5
    kill -0 "$worker_pid" 2>/dev/null || {
        tail -n 20 "$tmp/$name.log" >&2
        die "bg-worker ($name) exited during start-up"
    }
}

# Prints the resident set of a process in KiB (VmRSS from /proc/PID/status).
rss_kib() {
    awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"
}
