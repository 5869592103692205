#!/bin/sh
# What the market adds to a job: `bid --wait` (post, lease, sealed payload,
# job on the provider, sealed result, verify, settle) against a local
# `execute` of the same job on the same machine, paired run by run, with the
# instant fake `claude`. One coordinator, one provider, one requester, each
# with its own CMM_HOME, all on loopback.
#
#   benches/federation.sh [N]      (N >= 10 pairs; default 15)
#
# Needs a Docker engine, a static busybox (`apt-get install busybox-static`)
# and a built binary (BIN=..., default target/release/claude-max-market).
# Prints each pair and the medians; goal: the market adds <= 300 ms at the median.
set -eu

N="${1:-15}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release/claude-max-market}"
IMAGE=cmm-fake-claude:bench-fed
PROMPT="scenario:ok benchmark"
TOKEN=sk-ant-oat01-bench-token

[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release, or set BIN)" >&2; exit 2; }
[ "$N" -ge 10 ] || { echo "use at least 10 pairs" >&2; exit 2; }

SRV="$(mktemp -d)"; PROV="$(mktemp -d)"; REQ="$(mktemp -d)"; OUT="$(mktemp -d)"
chmod 700 "$SRV" "$PROV" "$REQ"
cleanup() {
    [ -n "${ADV:-}" ] && kill "$ADV" 2>/dev/null || true
    [ -n "${SERVE:-}" ] && kill "$SERVE" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$SRV" "$PROV" "$REQ" "$OUT"
}
trap cleanup EXIT
. "$ROOT/benches/fake_image.sh"
(CMM_HOME="$PROV"; export CMM_HOME; build_fake_image "$IMAGE")

CMM_HOME="$SRV" "$BIN" market serve --listen 127.0.0.1:0 --initial-grant 100000 >"$OUT/serve" 2>&1 &
SERVE=$!
i=0
until grep -q 'ws://' "$OUT/serve" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -lt 100 ] || { cat "$OUT/serve" >&2; exit 1; }; sleep 0.1
done
EP="$(grep -o 'ws://[0-9.:]*' "$OUT/serve" | head -1)"

export CLAUDE_CODE_OAUTH_TOKEN="$TOKEN"
CMM_HOME="$PROV" "$BIN" -q opt-in --accept-terms --claude-jobs >/dev/null
CMM_HOME="$PROV" "$BIN" -q limits --daily 1000 --tokens 100000000 >/dev/null
CMM_HOME="$PROV" "$BIN" -q advertise --slots 1 --price 1 --auto-accept --image "$IMAGE" --endpoint "$EP" >"$OUT/adv" 2>&1 &
ADV=$!
i=0
until grep -q 'registered' "$OUT/adv" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -lt 100 ] || { cat "$OUT/adv" >&2; exit 1; }; sleep 0.1
done
CMM_HOME="$REQ" "$BIN" -q keys generate >/dev/null 2>&1 || true

now_ms() { date +%s%3N; }
local_job() { CMM_HOME="$PROV" "$BIN" -q execute --approve-all --image "$IMAGE" --prompt "$PROMPT" >/dev/null 2>&1; }
market_job() { CMM_HOME="$REQ" "$BIN" -q bid --wait --prompt "$PROMPT" --max-price 2 --max-tokens 20000 --endpoint "$EP" >"$OUT/bid" 2>&1 || { cat "$OUT/bid" >&2; exit 1; }; }

# Warm both paths once.
local_job
market_job

L="$(mktemp)"; M="$(mktemp)"; D="$(mktemp)"
i=1
while [ "$i" -le "$N" ]; do
    # Alternate which goes first, so drift does not favour one side.
    if [ $((i % 2)) -eq 0 ]; then
        t0=$(now_ms); local_job; t1=$(now_ms); market_job; t2=$(now_ms)
        loc=$((t1 - t0)); mkt=$((t2 - t1))
    else
        t0=$(now_ms); market_job; t1=$(now_ms); local_job; t2=$(now_ms)
        mkt=$((t1 - t0)); loc=$((t2 - t1))
    fi
    echo "pair $i: bid --wait ${mkt} ms, execute ${loc} ms, difference $((mkt - loc)) ms"
    echo "$loc" >> "$L"; echo "$mkt" >> "$M"; echo "$((mkt - loc))" >> "$D"
    i=$((i + 1))
done
median() { sort -n "$1" | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
echo "median bid --wait: $(median "$M") ms"
echo "median execute:    $(median "$L") ms"
echo "median difference: $(median "$D") ms (goal: <= 300 ms)"
rm -f "$L" "$M" "$D"
