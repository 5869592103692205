#!/usr/bin/env bash
# Time and peak memory of the binary on endless and oversized inputs, which
# must be refused (exit 2) after reading at most one byte past their cap.
#
#   benches/hostile_inputs.sh [BIN]   (default: target/release/claude-max-market,
#                                      else target/debug/claude-max-market)
#
# Each line: exit code, wall seconds, peak RSS (KiB) from `/usr/bin/time`.
# Goal: exit 2, well under a second, and the same RSS for every case (the
# caps are 1 MiB; without them /dev/zero grew RSS by ~1.3 GB/s).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/claude-max-market}
[ -x "$BIN" ] || BIN=$ROOT/target/debug/claude-max-market
[ -x "$BIN" ] || { echo "build first: cargo build [--release]" >&2; exit 1; }
HOME_DIR=$(mktemp -d)
trap 'rm -rf "$HOME_DIR"' EXIT
export CMM_HOME=$HOME_DIR NO_COLOR=1
"$BIN" opt-in --accept-terms >/dev/null 2>&1

run() {
    local name=$1; shift
    /usr/bin/time -o "$HOME_DIR/time" -f '%x %e %M' "$@" >/dev/null 2>&1 || true
    local code secs rss
    read -r code secs rss < <(tail -1 "$HOME_DIR/time")
    printf '%-40s exit %-3s %6ss %8s KiB\n' "$name" "$code" "$secs" "$rss"
}

run "execute --file /dev/zero" "$BIN" execute --file /dev/zero
run "execute --file - < /dev/zero" sh -c "exec \"$BIN\" execute --file - < /dev/zero"
run "bid --file /dev/zero" "$BIN" bid --file /dev/zero --max-price 1
run "config --import /dev/zero" "$BIN" config --import /dev/zero
run "compliance-check --checklist /dev/zero" "$BIN" compliance-check --checklist /dev/zero
run "keys import p /dev/zero" "$BIN" keys import p /dev/zero
run "logs --since 100000000w" "$BIN" logs --since 100000000w
run "status (baseline)" "$BIN" status
