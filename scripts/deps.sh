#!/usr/bin/env bash
# Installs the Debian 12 packages that building, testing, running and linting bot-generic need.
#
# It asks dpkg first and touches the network only when something is missing, so a second run is
# instant and works offline. As root it calls apt-get directly; otherwise through sudo.
# Prints one line per action. Usage: scripts/deps.sh [--check]   (--check: report, install nothing)
#
# Then the npm packages of the Node.js tests (test/node/package-lock.json) are installed with
# `npm ci`, again only when they are missing or the lock file changed since the last install (a
# stamp in test/node/node_modules records the lock's checksum).
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)

packages=(
    # build
    build-essential cmake pkg-config
    libh2o-dev libuv1-dev libssl-dev libhiredis-dev libyajl-dev libpq-dev libcurl4-openssl-dev
    libjwt-dev libsodium-dev libcriterion-dev
    # stores for make run and the tests (psql comes with postgresql)
    redis-server postgresql postgresql-contrib
    # tests, benchmarks and make run (dev certificate, health checks, free ports)
    nghttp2-client openssl curl ca-certificates python3 nodejs npm
    # the web client's browser tests (test/browser: headless, driven by playwright-core)
    chromium
    # lint
    clang clang-tidy cppcheck clang-format shellcheck
    # make fuzz: libFuzzer and the sanitizer runtimes of clang
    libclang-rt-14-dev
)

check_only=0
if [[ ${1:-} == --check ]]; then
    check_only=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--check]" >&2
    exit 2
fi

# One dpkg-query call for all packages keeps the no-op run fast.
declare -A status=()
while IFS=' ' read -r name state; do
    status[${name%%:*}]=$state # multi-arch packages print as name:arch
done < <(dpkg-query -W -f='${binary:Package} ${db:Status-Status}\n' "${packages[@]}" 2>/dev/null || true)

missing=()
for p in "${packages[@]}"; do
    state=${status[$p]:-}
    if [[ $state == installed ]]; then
        continue
    fi
    # Node.js from another source (e.g. NodeSource) bundles npm and conflicts with Debian's npm
    # package: a working node/npm on PATH is as good as the Debian packages.
    if [[ $p == nodejs ]] && command -v node >/dev/null 2>&1; then
        continue
    fi
    if [[ $p == npm ]] && command -v npm >/dev/null 2>&1; then
        continue
    fi
    missing+=("$p")
done

# npm ci in test/node when node_modules does not match package-lock.json (or is missing).
node_packages() {
    local dir=$root/test/node stamp sum
    [[ -f $dir/package-lock.json ]] || return 0
    stamp=$dir/node_modules/.bg-lock.sha256
    sum=$(cat -- "$dir/package.json" "$dir/package-lock.json" | sha256sum | cut -d' ' -f1)
    if [[ -f $stamp && $(<"$stamp") == "$sum" ]]; then
        echo "deps: npm packages of test/node present"
        return 0
    fi
    if [[ $check_only -eq 1 ]]; then
        echo "deps: npm packages of test/node missing or out of date (npm ci)"
        return 1
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "deps: npm is not installed, so the Node.js tests cannot get their packages;" \
            "install nodejs and npm (Debian: apt-get install nodejs npm), then run scripts/deps.sh" >&2
        return 1
    fi
    echo "deps: npm ci in test/node"
    if ! (cd -- "$dir" && npm ci --no-audit --no-fund --loglevel=error); then
        echo "deps: npm ci in test/node failed (see above): the registry must be reachable," \
            "or its packages in the npm cache" >&2
        return 1
    fi
    printf '%s\n' "$sum" >"$stamp"
}

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "deps: all ${#packages[@]} packages present"
    node_packages
    exit 0
fi
echo "deps: missing: ${missing[*]}"
if [[ $check_only -eq 1 ]]; then
    exit 1
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "deps: not root and sudo is not installed; install as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    sudo=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
echo "deps: apt-get update"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
echo "deps: apt-get install ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
echo "deps: installed ${#missing[@]} package(s)"
node_packages
