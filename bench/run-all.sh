#!/usr/bin/env bash
# Runs every bench/*.sh but itself, one after the other, and prints each result line as it comes
# and again at the end; exits non-zero when any benchmark failed (the others still run).
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
self=$(basename -- "${BASH_SOURCE[0]}")
results=()
failed=()

for bench in "$here"/*.sh; do
    name=$(basename -- "$bench")
    [[ $name == "$self" || $name == lib.sh ]] && continue # lib.sh is sourced, not run
    echo "== $name ==" >&2
    if out=$(bash "$bench"); then
        :
    else
        failed+=("$name")
    fi
    while IFS= read -r line; do
        [[ -n $line ]] || continue
        echo "$line"
        results+=("$line")
    done <<<"$out"
done

echo >&2
echo "== results ==" >&2
for line in "${results[@]}"; do
    echo "$line" >&2
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "bench: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "bench: OK (${#results[@]} result line(s))" >&2
