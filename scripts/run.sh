#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions run from traps look unreachable to shellcheck 0.9
# `make run`: bot-generic on this machine, with everything it needs.
#
# Every BG_* variable already in the environment wins, then the .env file (or BG_ENV_FILE). What
# is still unset gets a development default:
#   - BG_REDIS_URL / BG_DATABASE_URL: a Redis (append-only) in .data/redis on port 16379 and a
#     PostgreSQL in .data/pg on port 15432 (BG_DEV_REDIS_PORT, BG_DEV_PG_PORT), started here and
#     stopped on exit; the password of the database role bg is generated into .data/pg_password;
#   - BG_TLS_CERT / BG_TLS_KEY: a self-signed certificate for localhost and 127.0.0.1 in .data/tls/;
#   - BG_JWT_SECRET: 48 random bytes (base64) in .data/jwt_secret;
#   - BG_LLM_BASE_URL: the bundled demo provider (build/bin/bg-demo-llm) on port 18090
#     (BG_DEV_LLM_PORT), when it is built;
#   - BG_LOG_FORMAT: text.
# Generated files are made once and reused, so a second run finds its data again. Then the schema
# is migrated, the admin admin@example.com (BG_DEV_ADMIN_EMAIL) is created when missing (password
# generated into .data/admin_password, passed on stdin), and bg-worker (all roles) and bg-edge
# run in the foreground, logging to the terminal. Ctrl-C or SIGTERM stops everything started
# here; when one process dies the others are stopped too and the exit status is non-zero.
# BG_BUILD_DIR (default build) names the build tree; BG_DEV_DATA_DIR (default .data) the data.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts=$root/scripts
build=${BG_BUILD_DIR:-build}
[[ $build == /* ]] || build=$root/$build
bin=$build/bin
data=$(realpath -m -- "${BG_DEV_DATA_DIR:-.data}")

say() {
    printf 'run: %s\n' "$*"
}
die() {
    printf 'run: %s\n' "$*" >&2
    exit 1
}

# --- configuration: environment first, then .env ------------------------------------------------
# The binaries read .env themselves (the environment wins there too); this only lets the script
# see the same values. Lines are NAME=value with optional `export ` and quotes, as in config.c.
env_file=${BG_ENV_FILE:-.env}
if [[ -f $env_file ]]; then
    say "reading $env_file (variables already in the environment win)"
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        line=${line#"${line%%[![:space:]]*}"}
        [[ -z $line || $line == '#'* ]] && continue
        [[ $line == export[[:space:]]* ]] && line=${line#export} && line=${line#"${line%%[![:space:]]*}"}
        [[ $line == *=* ]] || die "$env_file: expected NAME=value: $line"
        name=${line%%=*}
        name=${name%"${name##*[![:space:]]}"}
        value=${line#*=}
        value=${value#"${value%%[![:space:]]*}"}
        value=${value%"${value##*[![:space:]]}"}
        if [[ ${#value} -ge 2 && ( $value == \"*\" || $value == \'*\' ) ]]; then
            value=${value:1:${#value}-2}
        fi
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "$env_file: bad variable name \"$name\""
        if [[ $name == BG_* && -z ${!name+set} ]]; then
            export "$name=$value"
        fi
    done <"$env_file"
fi

redis_port=${BG_DEV_REDIS_PORT:-16379}
pg_port=${BG_DEV_PG_PORT:-15432}
llm_port=${BG_DEV_LLM_PORT:-18090}
export BG_LOG_FORMAT=${BG_LOG_FORMAT:-text}

for b in bg-edge bg-worker bgctl; do
    [[ -x $bin/$b ]] || die "$bin/$b is missing; build first (make build)"
done
mkdir -p -- "$data"
# Traversable but not listable: when we are root, PostgreSQL runs as postgres below .data/pg.
chmod 711 -- "$data"

# --- what we start, and how we stop it ----------------------------------------------------------
started_redis=0
started_pg=0
pids=()
names=()
stopping=0
supervising=0

stop_children() {
    local i pid deadline
    # Edge first (stop taking requests), then the worker, then the demo provider.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        if kill -0 "$pid" 2>/dev/null; then
            say "stopping ${names[i]} (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    # They drain in-flight work for up to BG_SHUTDOWN_GRACE_MS (10 s by default).
    deadline=$((SECONDS + ${BG_SHUTDOWN_GRACE_MS:-10000} / 1000 + 5))
    for ((i = 0; i < ${#pids[@]}; i++)); do
        pid=${pids[i]}
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "${names[i]} (pid $pid) did not stop in time; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    pids=()
    names=()
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    stop_children
    [[ $started_redis -eq 1 ]] && "$scripts/redis.sh" stop "$data/redis"
    [[ $started_pg -eq 1 ]] && "$scripts/pg.sh" stop "$data/pg"
    say "stopped"
    exit "$status"
}
trap cleanup EXIT
# A signal before the processes are up aborts the start-up (cleanup stops what is running);
# afterwards it ends the supervision loop, which stops everything and exits 0.
on_signal() {
    stopping=1
    if [[ $supervising -eq 0 ]]; then
        echo
        say "interrupted during start-up"
        exit 130
    fi
}
trap on_signal INT TERM

# --- stores -------------------------------------------------------------------------------------
if [[ -z ${BG_REDIS_URL:-} ]]; then
    started_redis=1 # first: a signal during the start must still stop it
    "$scripts/redis.sh" start "$data/redis" "$redis_port" --persist
    export BG_REDIS_URL="redis://127.0.0.1:$redis_port/0"
else
    say "using BG_REDIS_URL from the environment"
fi
if [[ -z ${BG_DATABASE_URL:-} ]]; then
    started_pg=1
    "$scripts/pg.sh" start "$data/pg" "$pg_port" --password-file "$data/pg_password"
    BG_DATABASE_URL=$("$scripts/pg.sh" url "$data/pg" "$pg_port" --password-file "$data/pg_password")
    export BG_DATABASE_URL
else
    say "using BG_DATABASE_URL from the environment"
fi

# --- secrets and certificate --------------------------------------------------------------------
random_b64() {
    openssl rand -base64 "$1" | tr -d '\n'
}

if [[ -z ${BG_TLS_CERT:-} && -z ${BG_TLS_KEY:-} && ${BG_HTTPS_PORT:-8443} != 0 ]]; then
    tls=$data/tls
    if [[ ! -s $tls/cert.pem || ! -s $tls/key.pem ]] ||
        ! openssl x509 -checkend 86400 -noout -in "$tls/cert.pem" >/dev/null 2>&1; then
        mkdir -p -- "$tls"
        chmod 700 -- "$tls"
        say "generating a development TLS certificate for localhost, 127.0.0.1 in $tls (1 year)"
        (umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -days 365 -subj /CN=localhost -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
            -keyout "$tls/key.pem" -out "$tls/cert.pem" >/dev/null 2>&1) ||
            die "openssl could not generate the certificate"
    fi
    export BG_TLS_CERT=$tls/cert.pem BG_TLS_KEY=$tls/key.pem
fi

if [[ -z ${BG_JWT_SECRET:-} && -z ${BG_JWT_KEYS:-} ]]; then
    if [[ ! -s $data/jwt_secret ]]; then
        say "generating the JWT signing secret in $data/jwt_secret"
        (umask 077 && random_b64 48 >"$data/jwt_secret")
    fi
    chmod 600 -- "$data/jwt_secret"
    BG_JWT_SECRET=$(<"$data/jwt_secret")
    export BG_JWT_SECRET
fi

# --- schema and the first admin -----------------------------------------------------------------
say "migrating the database (bgctl migrate)"
"$bin/bgctl" migrate || die "bgctl migrate failed (see above); stopping"

admin_email=${BG_DEV_ADMIN_EMAIL:-admin@example.com}
admin_pw_file=$data/admin_password
if [[ ! -s $admin_pw_file ]]; then
    (umask 077 && random_b64 24 | tr '+/' '-_' | cut -c1-24 >"$admin_pw_file")
fi
chmod 600 -- "$admin_pw_file"
admin_ok=1
if ! "$bin/bgctl" user create --admin --if-missing --email "$admin_email" --password-stdin \
    <"$admin_pw_file"; then
    say "WARNING: could not create the admin $admin_email (see above); continuing without it"
    admin_ok=0
fi
# The admin gets a complimentary yearly plan so it can chat and use the API at once. The fixed
# subscription id makes this a no-op on every later start.
if [[ $admin_ok -eq 1 ]] &&
    ! "$bin/bgctl" plan grant --email "$admin_email" --plan yearly --days 365 \
        --id 00000000-0000-4000-8000-0000000ad001 >/dev/null; then
    say "WARNING: could not grant the admin a plan (see above)"
fi

# --- processes ----------------------------------------------------------------------------------
# Children run in sessions of their own, so a Ctrl-C in the terminal reaches only this script,
# which then stops them in order with one SIGTERM each (a second signal would cut their graceful
# drain short). setsid does not fork here (a background job is no group leader): $! is the child.
start_child() {
    local name=$1
    shift
    setsid -- "$@" &
    pids+=($!)
    names+=("$name")
}

# Waits until url answers (any HTTP status) or the process at pids index $2 exits.
wait_http() {
    local url=$1 idx=$2 tries=$3 i
    for ((i = 0; i < tries; i++)); do
        curl -ks -o /dev/null --max-time 1 "$url" && return 0
        kill -0 "${pids[idx]}" 2>/dev/null || return 1
        [[ $stopping -eq 1 ]] && return 1
        sleep 0.2
    done
    return 1
}

if [[ -z ${BG_LLM_BASE_URL:-} ]]; then
    if [[ -x $bin/bg-demo-llm ]]; then
        start_child bg-demo-llm "$bin/bg-demo-llm" --port "$llm_port"
        export BG_LLM_BASE_URL="http://127.0.0.1:$llm_port/v1"
        wait_http "$BG_LLM_BASE_URL/models" $((${#pids[@]} - 1)) 50 ||
            say "WARNING: the demo provider does not answer on $BG_LLM_BASE_URL yet"
        say "BG_LLM_BASE_URL is not set: using the bundled demo provider at $BG_LLM_BASE_URL"
    else
        say "BG_LLM_BASE_URL is not set and $bin/bg-demo-llm is not built: no LLM provider is" \
            "configured, chat replies will fail (set BG_LLM_BASE_URL in .env)"
    fi
else
    say "LLM provider: $BG_LLM_BASE_URL"
fi

# Without --roles bg-worker runs every role it has (llm, telegram, usage, billing, notify).
start_child bg-worker "$bin/bg-worker"
start_child bg-edge "$bin/bg-edge"

http_port=${BG_HTTP_PORT:-8080}
https_port=${BG_HTTPS_PORT:-8443}
worker_port=${BG_WORKER_PORT:-9100}
edge_idx=$((${#pids[@]} - 1))
if wait_http "http://127.0.0.1:$http_port/healthz" "$edge_idx" 100; then
    echo
    say "bot-generic is up"
    say "  web + API (HTTP/1.1, h2c):  http://127.0.0.1:$http_port"
    [[ $https_port != 0 ]] && say "  TLS (h2, dev certificate): https://127.0.0.1:$https_port"
    [[ $worker_port != 0 ]] && say "  worker metrics:            http://127.0.0.1:$worker_port/metrics"
    if [[ $admin_ok -eq 1 ]]; then
        say "  admin login:               $admin_email, password in $admin_pw_file"
    fi
    say "  data:                      $data (logs: $data/*.log)"
    say "Ctrl-C stops everything started here"
    echo
elif [[ $stopping -eq 0 ]] && kill -0 "${pids[edge_idx]}" 2>/dev/null; then
    say "WARNING: bg-edge does not answer http://127.0.0.1:$http_port/healthz after 20 s"
fi

# --- supervise ----------------------------------------------------------------------------------
status=0
supervising=1
while [[ $stopping -eq 0 ]]; do
    died=''
    set +e
    wait -n -p died "${pids[@]}"
    rc=$?
    set -e
    [[ $stopping -eq 1 ]] && break
    if [[ -z $died ]]; then
        say "wait failed (status $rc); stopping"
        status=1
        break
    fi
    for ((i = 0; i < ${#pids[@]}; i++)); do
        if [[ ${pids[i]} == "$died" ]]; then
            say "${names[i]} exited (status $rc); stopping the rest"
            unset 'pids[i]' 'names[i]'
            pids=("${pids[@]}")
            names=("${names[@]}")
            break
        fi
    done
    status=1
    break
done
echo
[[ $stopping -eq 1 ]] && say "stopping (signal)"
exit "$status"
