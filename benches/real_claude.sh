#!/bin/sh
# What the sandbox costs a real job: `execute` of the real Claude Code in
# the hardened container (relay, proxy, read-only root, uid 10001) against
# the same `claude -p --output-format stream-json --verbose` run directly on
# the host, both against the local API stand-in, paired run by run.
#
#   benches/real_claude.sh [N]     (N >= 10 pairs; default 10)
#
# Needs a Docker engine, the real Claude Code (CMM_CLAUDE_BINARY, default
# target/claude-code/2.1.332/claude; `.ci/run fetch-claude` fetches it) and
# release builds of the binary and the stand-in
# (`cargo build --release --example api_standin`).
# Prints each pair, both medians and their difference (goal: <= 300 ms).
set -eu

N="${1:-10}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release/claude-max-market}"
STANDIN="${STANDIN:-$ROOT/target/release/examples/api_standin}"
CLAUDE="${CMM_CLAUDE_BINARY:-$ROOT/target/claude-code/2.1.332/claude}"
KEY=sk-ant-api03-bench-key-not-a-secret
PROMPT="scenario:text say=bench"

for f in "$BIN" "$STANDIN" "$CLAUDE"; do
    [ -x "$f" ] || { echo "missing $f (see the header of this script)" >&2; exit 2; }
done
[ "$N" -ge 10 ] || { echo "use at least 10 pairs" >&2; exit 2; }

WORK="$(mktemp -d)"
export CMM_HOME="$WORK/home"
mkdir -p "$CMM_HOME"
"$STANDIN" --listen 127.0.0.1:0 --ca-out "$WORK/ca.pem" > "$WORK/standin.out" 2>&1 &
SPID=$!
trap 'kill $SPID 2>/dev/null; rm -rf "$WORK"' EXIT
while ! grep -q '^proxy ' "$WORK/standin.out" 2>/dev/null; do sleep 0.05; done
API="$(sed -n 's/^listening //p' "$WORK/standin.out")"
PROXY="$(sed -n 's/^proxy //p' "$WORK/standin.out")"
IMAGE="cmm-real-claude:bench-$(sha256sum "$WORK/ca.pem" | cut -c1-12)"

"$BIN" -q docker build --claude-binary "$CLAUDE" --extra-ca "$WORK/ca.pem" --tag "$IMAGE" >/dev/null
"$BIN" -q opt-in --accept-terms >/dev/null
"$BIN" -q limits --daily 1000 --tokens 100000000000 --daily-cost none >/dev/null
export ANTHROPIC_API_KEY="$KEY" CMM_EGRESS_RESOLVE="api.anthropic.com:443=$API"

now_ms() { date +%s%3N; }
ours() { "$BIN" -q execute --approve-all --image "$IMAGE" --prompt "$PROMPT" >/dev/null 2>&1; }
# The same Claude Code with the same arguments and settings the container
# gives it (a fresh HOME, the proxy, nonessential traffic off).
host() {
    h="$(mktemp -d)"
    printf '%s' "$PROMPT" | env -i PATH=/usr/bin:/bin HOME="$h" TMPDIR="$h" ANTHROPIC_API_KEY="$KEY" \
        HTTPS_PROXY="http://$PROXY" NODE_EXTRA_CA_CERTS="$WORK/ca.pem" \
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 DISABLE_TELEMETRY=1 \
        "$CLAUDE" -p --output-format stream-json --verbose --model sonnet --include-partial-messages \
        --max-turns 100 --permission-mode default --max-budget-usd 5 >/dev/null 2>&1
    rm -rf "$h"
}

ours; host
OURS="$(mktemp)"; HOST="$(mktemp)"
i=1
while [ "$i" -le "$N" ]; do
    if [ $((i % 2)) -eq 0 ]; then
        t0=$(now_ms); ours; t1=$(now_ms); host; t2=$(now_ms)
        o=$((t1 - t0)); h=$((t2 - t1))
    else
        t0=$(now_ms); host; t1=$(now_ms); ours; t2=$(now_ms)
        h=$((t1 - t0)); o=$((t2 - t1))
    fi
    echo "pair $i: execute ${o} ms, host ${h} ms, difference $((o - h)) ms"
    echo "$o" >> "$OURS"; echo "$h" >> "$HOST"
    i=$((i + 1))
done
med() { sort -n "$1" | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
mo=$(med "$OURS"); mh=$(med "$HOST")
rm -f "$OURS" "$HOST"
echo "median execute ${mo} ms, median host ${mh} ms, difference $(awk -v a="$mo" -v b="$mh" 'BEGIN { print a - b }') ms (goal: <= 300 ms)"
docker rmi "$IMAGE" >/dev/null 2>&1 || true
