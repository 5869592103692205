#!/bin/sh
# `docker build --claude-binary` of the real Claude Code (~400 MB), cold and
# warm, N runs each: min / median / max wall time.
#
#   benches/native_image.sh [N]      (N >= 3; default 5)
#
# Cold: the image removed and the build cache pruned first, and the build run
# with --no-cache, so no layer is reused even if another image shares them.
# Warm: the same inputs again, right after; every step must come from cache.
# Goals: warm <= 20 s, cold <= 60 s.
#
# Needs a Docker engine, a built binary (BIN=..., default
# target/release/claude-max-market) and the native Claude Code
# (CMM_CLAUDE_BINARY=..., default target/claude-code/2.1.332/claude).
set -eu

N="${1:-5}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release/claude-max-market}"
CLAUDE="${CMM_CLAUDE_BINARY:-$ROOT/target/claude-code/2.1.332/claude}"
TAG=cmm-bench/native-image:bench

[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release, or set BIN)" >&2; exit 2; }
[ -x "$CLAUDE" ] || { echo "no Claude Code at $CLAUDE (set CMM_CLAUDE_BINARY)" >&2; exit 2; }
[ "$N" -ge 3 ] || { echo "use at least 3 runs" >&2; exit 2; }

export CMM_HOME="$(mktemp -d)"
COLD="$(mktemp)"
WARM="$(mktemp)"
OUT="$(mktemp)"
trap 'rm -rf "$CMM_HOME" "$COLD" "$WARM" "$OUT"; docker rmi -f "$TAG" >/dev/null 2>&1 || true' EXIT

now_ms() { date +%s%3N; }
field() { sed -n "s/.*\"$1\": *\\([0-9]*\\).*/\\1/p" "$OUT" | head -n 1; }

# Build once and report what goes in; this also warms the page cache.
"$BIN" --json docker build --claude-binary "$CLAUDE" --tag "$TAG" >"$OUT" 2>/dev/null
echo "context: $(field bytes) bytes, $(field steps) steps"

i=1
while [ "$i" -le "$N" ]; do
    docker rmi -f "$TAG" >/dev/null
    docker builder prune -f >/dev/null 2>&1 || true
    t0=$(now_ms)
    "$BIN" --json docker build --no-cache --claude-binary "$CLAUDE" --tag "$TAG" >"$OUT" 2>/dev/null
    t1=$(now_ms)
    cold=$((t1 - t0)); cold_cached=$(field cached_steps)
    "$BIN" --json docker build --claude-binary "$CLAUDE" --tag "$TAG" >"$OUT" 2>/dev/null
    t2=$(now_ms)
    warm=$((t2 - t1)); warm_cached=$(field cached_steps); steps=$(field steps)
    echo "run $i: cold ${cold} ms, warm ${warm} ms (${warm_cached}/${steps} steps cached)"
    # FROM scratch counts as cached; nothing else may be, cold.
    [ "$cold_cached" -le 1 ] || { echo "the cold build reused $cold_cached steps" >&2; exit 1; }
    [ "$warm_cached" = "$steps" ] || { echo "the warm build missed the cache" >&2; exit 1; }
    echo "$cold" >>"$COLD"
    echo "$warm" >>"$WARM"
    i=$((i + 1))
done

# min median max, in seconds.
stats() {
    sort -n "$1" | awk '{ a[NR] = $1 } END {
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "min %.1f s, median %.1f s, max %.1f s", a[1] / 1000, m / 1000, a[NR] / 1000 }'
}
median_ms() { sort -n "$1" | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
verdict() { [ "$(median_ms "$1")" -le "$2" ] && echo "goal met" || echo "goal MISSED"; }
echo "cold: $(stats "$COLD") (goal: <= 60 s; $(verdict "$COLD" 60000))"
echo "warm: $(stats "$WARM") (goal: <= 20 s; $(verdict "$WARM" 20000))"
