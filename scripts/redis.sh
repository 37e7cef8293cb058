#!/usr/bin/env bash
# A private redis-server for `make run` and the tests.
#
#   scripts/redis.sh start DIR PORT [--persist]
#   scripts/redis.sh stop DIR
#   scripts/redis.sh status DIR
#
# The server daemonizes with its working directory, pid file (DIR/redis.pid) and port record
# (DIR/port) in DIR, logs to <parent of DIR>/<name of DIR>.log and listens on 127.0.0.1:PORT only.
# --persist (make run) keeps data across restarts with the append-only file plus RDB snapshots
# in DIR; without it (tests) nothing is written to disk.
set -euo pipefail

die() {
    echo "redis: $*" >&2
    exit 1
}

usage() {
    sed -n '4,6p' "$0" | sed 's/^# *//' >&2
    exit 2
}

abspath() {
    local p=$1
    [[ $p == /* ]] || p=$PWD/$p
    realpath -m -- "$p"
}

# True while pid $1 runs; an exited server that its parent has not reaped yet (a zombie) is gone.
alive() {
    local stat
    kill -0 "$1" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# Prints the pid of the server running in $1, or fails.
running_pid() {
    local dir=$1 pid
    [[ -f $dir/redis.pid ]] || return 1
    IFS= read -r pid <"$dir/redis.pid" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    # Guard against a recycled pid: it must still be a redis-server.
    [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) != redis-server* ]] && return 1
    printf '%s\n' "$pid"
}

cmd_start() {
    local dir port persist=0
    [[ $# -ge 2 ]] || usage
    dir=$(abspath "$1")
    port=$2
    shift 2
    while [[ $# -gt 0 ]]; do
        case $1 in
        --persist) persist=1; shift ;;
        *) usage ;;
        esac
    done
    [[ $port =~ ^[0-9]+$ ]] || die "port \"$port\" is not a number"
    command -v redis-server >/dev/null || die "redis-server not found (scripts/deps.sh installs it)"

    local log
    log=$(dirname -- "$dir")/$(basename -- "$dir").log
    if running_pid "$dir" >/dev/null; then
        echo "redis: already running in $dir"
        return 0
    fi
    mkdir -p -- "$dir"
    chmod 700 -- "$dir"
    rm -f -- "$dir/redis.pid"

    local persistence=(--save '' --appendonly no)
    if [[ $persist -eq 1 ]]; then
        persistence=(--appendonly yes --appendfsync everysec --save '3600 1 300 100 60 10000')
    fi
    echo "redis: starting redis-server on 127.0.0.1:$port (dir $dir, log $log$([[ $persist -eq 1 ]] && echo ', append-only'))"
    (cd "$dir" && redis-server --port "$port" --bind 127.0.0.1 --protected-mode yes \
        --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$log" \
        "${persistence[@]}") || die "redis-server failed to start; see $log"
    printf '%s\n' "$port" >"$dir/port"

    local i reply
    for ((i = 0; i < 100; i++)); do
        reply=$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null || true)
        if [[ $reply == PONG ]] && running_pid "$dir" >/dev/null; then
            echo "redis: ready on 127.0.0.1:$port"
            return 0
        fi
        sleep 0.1
    done
    echo "redis: no PONG on port $port after 10 s; last lines of $log:" >&2
    tail -n 10 -- "$log" >&2 || true
    cmd_stop "$dir" >/dev/null 2>&1 || true
    exit 1
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    local dir pid i
    dir=$(abspath "$1")
    if ! pid=$(running_pid "$dir"); then
        echo "redis: not running in $dir"
        rm -f -- "$dir/redis.pid"
        return 0
    fi
    echo "redis: stopping redis-server (pid $pid) in $dir"
    # SIGTERM makes Redis flush the append-only file (or save) before it exits.
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        echo "redis: still running after 15 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f -- "$dir/redis.pid"
}

cmd_status() {
    [[ $# -eq 1 ]] || usage
    local dir pid
    dir=$(abspath "$1")
    if pid=$(running_pid "$dir"); then
        echo "redis: running in $dir (pid $pid)"
    else
        echo "redis: not running in $dir"
        return 1
    fi
}

[[ $# -ge 1 ]] || usage
cmd=$1
shift
case $cmd in
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
status) cmd_status "$@" ;;
*) usage ;;
esac
