#!/usr/bin/env bash
# Static checks of bot-generic; exits non-zero when any check finds something.
#
#   scripts/lint.sh [FILE…]
#
# 1. clang-tidy (.clang-tidy) over the C files of shared/src, edge and workers, two at a time, with
#    the flags of build/compile_commands.json (configured first when missing or stale);
# 2. cppcheck (warning, performance, portability) over the same files; readdirCalled is off, since
#    the readdir_r it recommends is deprecated by glibc (readdir is thread-safe per directory stream);
# 3. banned functions (strcpy strcat sprintf vsprintf strtok atoi gets localtime gmtime strerror)
#    called anywhere in shared, edge, workers, test and bench, comments and strings excepted;
#    a line that really needs one says so with the comment `lint:allow-banned`;
# 4. clang-format --dry-run over every .c/.h there;
# 5. shellcheck over scripts/*.sh, bench/*.sh and .ci/run.
# With FILE arguments every check looks at those files only.
# BG_BUILD_DIR (default build) names the build tree; LINT_JOBS (default 2) the parallelism;
# LINT_VERBOSE=1 prints every clang-format difference rather than one line per file.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build=${BG_BUILD_DIR:-build}
jobs=${LINT_JOBS:-2}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/bg-lint.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT

failed=()
section() {
    printf '\n== %s ==\n' "$1"
}

# Files: C sources to analyse (tidy, cppcheck) and every C file to scan (banned, format).
mapfile -d '' all_c < <(find shared edge workers test bench -type d -name node_modules -prune -o \
    -type f \( -name '*.c' -o -name '*.h' \) -print0 2>/dev/null | sort -z)
mapfile -d '' analysed < <(find shared/src edge workers -type f -name '*.c' -print0 2>/dev/null | sort -z)
mapfile -d '' shells < <(find scripts bench .ci -type f \( -name '*.sh' -o -path '.ci/run' \) \
    -print0 2>/dev/null | sort -z)
if [[ $# -gt 0 ]]; then
    all_c=() analysed=() shells=()
    for f in "$@"; do
        [[ -f $f ]] || { echo "lint: no such file: $f" >&2; exit 2; }
        case $f in
        *.c | *.h)
            all_c+=("$f")
            case $f in shared/src/*.c | edge/*.c | workers/*.c) analysed+=("$f") ;; esac
            ;;
        *.sh | .ci/run) shells+=("$f") ;;
        esac
    done
fi

# --- 1. clang-tidy --------------------------------------------------------------------------
section "clang-tidy (${#analysed[@]} files)"
if [[ ${#analysed[@]} -gt 0 ]]; then
    # Configuring again picks up files added since the last configure (cheap when nothing changed).
    if [[ -f $build/CMakeCache.txt ]]; then
        cmake -S . -B "$build" >"$tmp/cmake.log" 2>&1 || { cat "$tmp/cmake.log" >&2; exit 1; }
    else
        cmake -S . -B "$build" -DBG_WERROR=ON >"$tmp/cmake.log" 2>&1 || { cat "$tmp/cmake.log" >&2; exit 1; }
    fi
    tidy_one() {
        local f=$1 out
        out=$2/$(printf '%s' "$f" | tr '/' '_').log
        if ! clang-tidy -p "$3" --quiet "$f" >"$out" 2>&1; then
            echo "$f" >>"$2/tidy-failed"
        fi
    }
    export -f tidy_one
    # shellcheck disable=SC2016 # $1.. expand in the child bash
    printf '%s\0' "${analysed[@]}" |
        xargs -0 -P "$jobs" -I{} bash -c 'tidy_one "$1" "$2" "$3"' _ {} "$tmp" "$build"
    if [[ -s $tmp/tidy-failed ]]; then
        while IFS= read -r f; do
            # Drop clang-tidy's own chatter ("N warnings generated.").
            grep -vE '^[0-9]+ (warning|error)s? (and [0-9]+ (warning|error)s? )?generated\.$' \
                "$tmp/$(printf '%s' "$f" | tr '/' '_').log" || true
        done < <(sort "$tmp/tidy-failed")
        echo "clang-tidy: findings in $(wc -l <"$tmp/tidy-failed") file(s)"
        failed+=(clang-tidy)
    else
        echo "clang-tidy: clean"
    fi
fi

# --- 2. cppcheck ----------------------------------------------------------------------------
section "cppcheck"
if [[ ${#analysed[@]} -gt 0 ]]; then
    mkdir -p "$build/cppcheck"
    if ! cppcheck -q -j "$jobs" --std=c11 -D_GNU_SOURCE --library=posix \
        --enable=warning,performance,portability --error-exitcode=1 --inline-suppr \
        --suppress=missingIncludeSystem --suppress=readdirCalled --cppcheck-build-dir="$build/cppcheck" \
        -I shared/include -I edge -I workers \
        --template='{file}:{line}:{column}: {severity}: {message} [{id}]' \
        "${analysed[@]}" 2>"$tmp/cppcheck.log"; then
        cat "$tmp/cppcheck.log"
        echo "cppcheck: findings"
        failed+=(cppcheck)
    elif [[ -s $tmp/cppcheck.log ]]; then
        cat "$tmp/cppcheck.log"
        echo "cppcheck: findings"
        failed+=(cppcheck)
    else
        echo "cppcheck: clean"
    fi
fi

# --- 3. banned functions --------------------------------------------------------------------
section "banned functions"
if [[ ${#all_c[@]} -gt 0 ]]; then
    # Comments and string/char literals are blanked first, so prose may name the functions.
    awk '
        FNR == 1 { incomment = 0 }
        {
            line = $0; out = ""; n = length(line); i = 1; instr = 0
            while (i <= n) {
                c = substr(line, i, 1); c2 = substr(line, i, 2)
                if (incomment) { if (c2 == "*/") { incomment = 0; i += 2 } else i++; continue }
                if (instr) {
                    if (c == "\\") { i += 2; continue }
                    if (c == q) { instr = 0; out = out c }
                    i++; continue
                }
                if (c2 == "/*") { incomment = 1; i += 2; out = out " "; continue }
                if (c2 == "//") break
                if (c == "\"" || c == "\047") { instr = 1; q = c; out = out c; i++; continue }
                out = out c; i++
            }
            if (line ~ /lint:allow-banned/) next
            if (match(out, /(^|[^A-Za-z0-9_])(strcpy|strcat|sprintf|vsprintf|strtok|atoi|gets|localtime|gmtime|strerror)[ \t]*\(/)) {
                call = substr(out, RSTART, RLENGTH); sub(/^[^A-Za-z_]/, "", call); sub(/[ \t]*\($/, "", call)
                printf "%s:%d: banned function %s(): %s\n", FILENAME, FNR, call, line
                found = 1
            }
        }
        END { exit found ? 1 : 0 }
    ' "${all_c[@]}" >"$tmp/banned.log" || true
    if [[ -s $tmp/banned.log ]]; then
        cat "$tmp/banned.log"
        echo "banned functions: $(wc -l <"$tmp/banned.log") call(s); use the bounded or _r forms" \
            "(snprintf, bg_strlcpy, strtok_r, strtol, localtime_r, gmtime_r, strerror_r)"
        failed+=(banned)
    else
        echo "banned functions: none"
    fi
fi

# --- 4. clang-format ------------------------------------------------------------------------
section "clang-format (${#all_c[@]} files)"
if [[ ${#all_c[@]} -gt 0 ]]; then
    if ! clang-format --dry-run -Werror "${all_c[@]}" >"$tmp/format.log" 2>&1; then
        if [[ ${LINT_VERBOSE:-0} == 1 ]]; then
            cat "$tmp/format.log"
        fi
        # One line per file: where it first differs and how many places do (LINT_VERBOSE=1: all).
        grep -oE '^[^:]+:[0-9]+:[0-9]+: error: code should be clang-formatted' "$tmp/format.log" |
            awk -F: '!($1 in n) { first[$1] = $2; order[++k] = $1 } { n[$1]++ }
                END { for (i = 1; i <= k; i++) printf "%s:%s: not clang-formatted (%d place(s))\n", order[i], first[order[i]], n[order[i]] }'
        # Anything else (a broken .clang-format, an unreadable file) is shown as it is.
        grep -q 'code should be clang-formatted' "$tmp/format.log" || cat "$tmp/format.log"
        echo "clang-format: $(grep -c 'code should be clang-formatted' "$tmp/format.log" || true) place(s);" \
            "see them with clang-format --dry-run FILE, fix with make format (or clang-format -i FILE)"
        failed+=(clang-format)
    else
        echo "clang-format: clean"
    fi
fi

# --- 5. shellcheck --------------------------------------------------------------------------
section "shellcheck (${#shells[@]} files)"
if [[ ${#shells[@]} -gt 0 ]]; then
    if ! command -v shellcheck >/dev/null 2>&1; then
        echo "shellcheck: not installed (scripts/deps.sh installs it)"
        failed+=(shellcheck)
    elif ! shellcheck -x "${shells[@]}" >"$tmp/shellcheck.log" 2>&1; then
        cat "$tmp/shellcheck.log"
        echo "shellcheck: findings"
        failed+=(shellcheck)
    else
        echo "shellcheck: clean"
    fi
fi

echo
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "lint: FAILED (${failed[*]})"
    exit 1
fi
echo "lint: OK"
