#!/bin/sh
# How long a provider is off the market when its coordinator replica dies:
# from `kill -9` of replica A to the provider's offer registered again on
# replica B, a standby `market serve` on the same database file started at
# once on another port. The provider runs `advertise --endpoint A,B`; no job
# runs, so no Docker engine is needed. Also prints how much of that is B's
# own start (until it listens).
#
#   benches/failover.sh [N]      (N >= 3 runs; default 7)
#
# With CMM_BENCH_PG=postgres://USER@HOST:PORT/DB, A and B are two live
# replicas on that PostgreSQL database from the start (B is not started
# after the kill): the time is then the provider's reconnect alone.
#
# Needs a built binary (BIN=..., default target/release/claude-max-market)
# and GNU date (milliseconds). Prints each run and the medians.
set -eu

N="${1:-7}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release/claude-max-market}"

[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release, or set BIN)" >&2; exit 2; }
[ "$N" -ge 3 ] || { echo "use at least 3 runs" >&2; exit 2; }

WORK="$(mktemp -d)"
chmod 700 "$WORK"
cleanup() {
    for p in ${ADV:-} ${SA:-} ${SB:-}; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }

# Wait until FILE has at least COUNT lines matching PATTERN (10 s at most).
wait_lines() {
    w=0
    while :; do
        c=$(grep -c "$2" "$1" 2>/dev/null) || true
        [ "${c:-0}" -lt "$3" ] || break
        w=$((w + 1)); [ "$w" -lt 1000 ] || { echo "timed out waiting for $2 in $1" >&2; cat "$1" >&2; exit 1; }
        sleep 0.01
    done
}

# Start `market serve` on LISTEN with database DB, output to OUT; sets PID.
serve() {
    CMM_HOME="$WORK/srv" "$BIN" market serve --listen "$1" --db "$2" --initial-grant 1000 >"$3" 2>&1 &
    PID=$!
}

mkdir -p "$WORK/srv" "$WORK/prov"
chmod 700 "$WORK/srv" "$WORK/prov"
export ANTHROPIC_API_KEY=sk-ant-api03-bench-not-a-secret
CMM_HOME="$WORK/prov" "$BIN" -q opt-in --accept-terms --claude-jobs >/dev/null
CMM_HOME="$WORK/prov" "$BIN" -q keys generate >/dev/null 2>&1 || true

T="$(mktemp)"; S="$(mktemp)"
i=1
PG="${CMM_BENCH_PG:-}"
while [ "$i" -le "$N" ]; do
    DB="$WORK/market-$i.db"
    if [ -n "$PG" ]; then
        serve 127.0.0.1:0 "$PG" "$WORK/a-$i"; SA=$PID
        wait_lines "$WORK/a-$i" 'ws://' 1
        serve 127.0.0.2:0 "$PG" "$WORK/b-$i"; SB=$PID
        wait_lines "$WORK/b-$i" 'ws://' 1
        B="$(grep -o 'ws://[0-9.:]*' "$WORK/b-$i" | head -1)"
    else
        # A on a free port; B's port is found the same way, by a throwaway
        # coordinator that is stopped before A starts.
        serve 127.0.0.1:0 "$WORK/probe-$i.db" "$WORK/probe-$i"; P=$PID
        wait_lines "$WORK/probe-$i" 'ws://' 1
        B="$(grep -o 'ws://[0-9.:]*' "$WORK/probe-$i" | head -1)"
        kill "$P"; wait "$P" 2>/dev/null || true
        serve 127.0.0.1:0 "$DB" "$WORK/a-$i"; SA=$PID
        wait_lines "$WORK/a-$i" 'ws://' 1
    fi
    A="$(grep -o 'ws://[0-9.:]*' "$WORK/a-$i" | head -1)"

    CMM_HOME="$WORK/prov" "$BIN" --json advertise --slots 1 --price 1 --endpoint "$A,$B" >"$WORK/adv-$i" 2>&1 &
    ADV=$!
    wait_lines "$WORK/adv-$i" '"event":"offer"' 1

    t0=$(now_ms)
    kill -9 "$SA"; wait "$SA" 2>/dev/null || true; SA=
    if [ -z "$PG" ]; then
        serve "${B#ws://}" "$DB" "$WORK/b-$i"; SB=$PID
        wait_lines "$WORK/b-$i" 'ws://' 1
    fi
    t1=$(now_ms)
    wait_lines "$WORK/adv-$i" '"event":"offer"' 2
    t2=$(now_ms)
    grep -q '"event":"failover"' "$WORK/adv-$i" || { echo "no failover event" >&2; cat "$WORK/adv-$i" >&2; exit 1; }

    echo "run $i: offer live on B $((t2 - t0)) ms after the kill (B listening after $((t1 - t0)) ms)"
    echo "$((t2 - t0))" >> "$T"; echo "$((t1 - t0))" >> "$S"
    kill "$ADV"; wait "$ADV" 2>/dev/null || true; ADV=
    kill "$SB"; wait "$SB" 2>/dev/null || true; SB=
    i=$((i + 1))
done
median() { sort -n "$1" | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
echo "median failover (kill of A to the offer on B): $(median "$T") ms"
echo "median start of B (kill of A to B listening): $(median "$S") ms"
rm -f "$T" "$S"
