#!/usr/bin/env bash
# A private PostgreSQL 15 server for `make run` and the tests.
#
#   scripts/pg.sh start DIR PORT [--password-file F] [--superuser] [--fast]
#   scripts/pg.sh stop DIR
#   scripts/pg.sh status DIR
#   scripts/pg.sh url DIR PORT [--password-file F] [--db NAME]
#
# DIR is the data directory (created with initdb on first start). Its parent holds the server log
# (<parent>/<name>.log) and the Unix socket directory (<parent>/<name>.sock, mode 700); the server
# listens on 127.0.0.1:PORT only. Start creates the login role `bg` and the database `bg` (owned by
# bg) when they are missing. --superuser makes bg a superuser (the tests create databases);
# --password-file F sets bg's password from F (generated, mode 600, when F does not exist) and
# requires it on TCP connections, which are otherwise trusted; --fast turns durability off
# (fsync, synchronous_commit, full_page_writes) for throw-away test servers.
#
# PostgreSQL refuses to run as root: as root the server runs as the `postgres` user (created by the
# postgresql package), which then owns DIR, and every directory above DIR is made traversable.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

die() {
    echo "pg: $*" >&2
    exit 1
}

usage() {
    sed -n '4,7p' "$0" | sed 's/^# *//' >&2
    exit 2
}

abspath() {
    local p=$1
    [[ $p == /* ]] || p=$PWD/$p
    # Normalise without requiring the path to exist.
    realpath -m -- "$p"
}

as_root=0
[[ $(id -u) -eq 0 ]] && as_root=1

# Runs a PostgreSQL tool as the server's owner, from / so that an unreadable cwd does not matter.
pg_run() {
    if [[ $as_root -eq 1 ]]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

urlencode() {
    local s=$1 out='' c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
        [a-zA-Z0-9._~-]) out+=$c ;;
        *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s' "$out"
}

# Makes every ancestor of $1 traversable by others (x only, never r), so `postgres` can reach it.
make_traversable() {
    local d
    d=$(dirname -- "$1")
    while [[ $d != / ]]; do
        if [[ -d $d ]] && ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
            echo "pg: chmod o+x $d (so that the postgres user can reach the data directory)"
            chmod o+x -- "$d"
        fi
        d=$(dirname -- "$d")
    done
}

read_password() {
    local f=$1 pw
    if [[ ! -s $f ]]; then
        mkdir -p -- "$(dirname -- "$f")"
        (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$f")
        echo "pg: generated a password for role bg in $f" >&2
    fi
    chmod 600 -- "$f"
    IFS= read -r pw <"$f" || true
    [[ -n $pw ]] || die "empty password in $f"
    printf '%s' "$pw"
}

is_running() {
    local dir=$1
    [[ -f $dir/postmaster.pid ]] || return 1
    pg_run "$PG_BIN/pg_ctl" status -D "$dir" >/dev/null 2>&1
}

cmd_start() {
    local dir port pwfile='' superuser=0 fast=0
    [[ $# -ge 2 ]] || usage
    dir=$(abspath "$1")
    port=$2
    shift 2
    while [[ $# -gt 0 ]]; do
        case $1 in
        --password-file)
            [[ $# -ge 2 ]] || usage
            pwfile=$(abspath "$2")
            shift 2
            ;;
        --superuser) superuser=1; shift ;;
        --fast) fast=1; shift ;;
        *) usage ;;
        esac
    done
    [[ $port =~ ^[0-9]+$ ]] || die "port \"$port\" is not a number"
    [[ -x $PG_BIN/initdb ]] || die "$PG_BIN/initdb not found (install postgresql: scripts/deps.sh)"
    if [[ $as_root -eq 1 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root needs the postgres user (apt-get install postgresql)"
    fi

    local parent name log sock
    parent=$(dirname -- "$dir")
    name=$(basename -- "$dir")
    log=$parent/$name.log
    sock=$parent/$name.sock

    if is_running "$dir"; then
        echo "pg: already running in $dir"
    else
        mkdir -p -- "$parent" "$sock"
        touch -- "$log"
        chmod 700 -- "$sock"
        if [[ $as_root -eq 1 ]]; then
            make_traversable "$dir"
            chown postgres:postgres -- "$sock" "$log"
        fi
        if [[ ! -f $dir/PG_VERSION ]]; then
            mkdir -p -- "$dir"
            chmod 700 -- "$dir"
            [[ $as_root -eq 1 ]] && chown postgres:postgres -- "$dir"
            echo "pg: initdb $dir"
            pg_run "$PG_BIN/initdb" -D "$dir" -U postgres --auth-local=trust --auth-host=trust \
                --encoding=UTF8 --locale=C.UTF-8 >>"$log" 2>&1 ||
                die "initdb failed; see $log"
            echo "include_if_exists = 'bg.conf'" | pg_run tee -a -- "$dir/postgresql.conf" >/dev/null
        elif [[ $as_root -eq 1 ]]; then
            chown -R postgres:postgres -- "$dir"
        fi

        # Settings that may change between starts live in bg.conf, rewritten each time.
        local conf
        conf="listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sock'
logging_collector = off
log_min_messages = warning
log_connections = off
"
        if [[ $fast -eq 1 ]]; then
            conf+="fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
"
        fi
        printf '%s' "$conf" | pg_run tee -- "$dir/bg.conf" >/dev/null

        # TCP needs a password when one was asked for; the socket stays trusted (mode 700 dir).
        local method=trust
        [[ -n $pwfile ]] && method=scram-sha-256
        printf '%s\n' "local all all trust" "host all all 127.0.0.1/32 $method" |
            pg_run tee -- "$dir/pg_hba.conf" >/dev/null

        echo "pg: starting PostgreSQL on 127.0.0.1:$port (data $dir, log $log$([[ $fast -eq 1 ]] && echo ', fast mode'))"
        if ! pg_run "$PG_BIN/pg_ctl" start -D "$dir" -l "$log" -w -t 60 >/dev/null 2>&1; then
            echo "pg: start failed; last lines of $log:" >&2
            tail -n 15 -- "$log" >&2 || true
            exit 1
        fi
    fi

    local i
    for ((i = 0; i < 100; i++)); do
        pg_run "$PG_BIN/pg_isready" -q -h "$sock" -p "$port" && break
        sleep 0.1
    done
    pg_run "$PG_BIN/pg_isready" -q -h "$sock" -p "$port" ||
        die "server in $dir does not accept connections on port $port; see $log"

    local pw='' role_attrs='LOGIN NOSUPERUSER CREATEDB'
    [[ -n $pwfile ]] && pw=$(read_password "$pwfile")
    [[ $superuser -eq 1 ]] && role_attrs='LOGIN SUPERUSER'
    # psql substitutes :'pw' as a quoted literal, so the password is never spliced into SQL text.
    pg_run "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$port" -U postgres -d postgres \
        -v pw="$pw" -v attrs="$role_attrs" >/dev/null <<'SQL' || die "could not create role/database bg; see $log"
SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'bg') AS need_role \gset
\if :need_role
CREATE ROLE bg;
\endif
ALTER ROLE bg :attrs;
SELECT :'pw' = '' AS no_pw \gset
\if :no_pw
ALTER ROLE bg PASSWORD NULL;
\else
ALTER ROLE bg PASSWORD :'pw';
\endif
SELECT NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'bg') AS need_db \gset
\if :need_db
CREATE DATABASE bg OWNER bg;
\endif
SQL
    echo "pg: ready on 127.0.0.1:$port (role bg$([[ $superuser -eq 1 ]] && echo ', superuser'), database bg)"
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    local dir
    dir=$(abspath "$1")
    if ! is_running "$dir"; then
        echo "pg: not running in $dir"
        return 0
    fi
    echo "pg: stopping PostgreSQL in $dir"
    if ! pg_run "$PG_BIN/pg_ctl" stop -D "$dir" -m fast -w -t 60 >/dev/null 2>&1; then
        echo "pg: fast shutdown timed out; sending immediate shutdown" >&2
        pg_run "$PG_BIN/pg_ctl" stop -D "$dir" -m immediate -w -t 30 >/dev/null 2>&1 ||
            die "could not stop the server in $dir"
    fi
}

cmd_status() {
    [[ $# -eq 1 ]] || usage
    local dir
    dir=$(abspath "$1")
    if is_running "$dir"; then
        echo "pg: running in $dir"
    else
        echo "pg: not running in $dir"
        return 1
    fi
}

cmd_url() {
    local port pwfile='' db=bg auth=bg
    [[ $# -ge 2 ]] || usage
    port=$2
    shift 2
    while [[ $# -gt 0 ]]; do
        case $1 in
        --password-file)
            [[ $# -ge 2 ]] || usage
            pwfile=$2
            shift 2
            ;;
        --db)
            [[ $# -ge 2 ]] || usage
            db=$2
            shift 2
            ;;
        *) usage ;;
        esac
    done
    if [[ -n $pwfile ]]; then
        local pw
        IFS= read -r pw <"$pwfile" || true
        [[ -n $pw ]] || die "empty or missing password file $pwfile"
        auth="bg:$(urlencode "$pw")"
    fi
    printf 'postgresql://%s@127.0.0.1:%s/%s\n' "$auth" "$port" "$db"
}

[[ $# -ge 1 ]] || usage
cmd=$1
shift
case $cmd in
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
status) cmd_status "$@" ;;
url) cmd_url "$@" ;;
*) usage ;;
esac
