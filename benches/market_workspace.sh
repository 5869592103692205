#!/bin/sh
# What the market adds to a workspace job: `bid --wait --workspace DIR
# --accept-cmd true` (select and pack DIR, seal it to the provider, relay it
# through the coordinator in payload frames, the provider's unpack and job,
# the delta back, the requester's rebuild, diff and acceptance container,
# settle) against a local `execute --workspace DIR` of the same job, paired
# run by run on the instant fake `claude`. Coordinator, provider and
# requester all run here, on loopback.
#
#   benches/market_workspace.sh [N] [FILES] [KIB]   (default 10 pairs of a
#                                                  2,000-file, 20 MiB tree)
#
# Needs a Docker engine, a static busybox (`apt-get install busybox-static`)
# and a built binary (BIN=..., default target/release/claude-max-market).
# Prints each pair, and the median extra wall time.
set -eu

N="${1:-10}"
FILES="${2:-2000}"
KIB="${3:-10}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release/claude-max-market}"
IMAGE=cmm-fake-claude:bench
KEY=sk-ant-api03-bench-provider-not-a-secret

[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release, or set BIN)" >&2; exit 2; }

WORK="$(mktemp -d)"
chmod 700 "$WORK"
WS="$WORK/ws"
mkdir -p "$WS" "$WORK/srv" "$WORK/prov" "$WORK/req" "$WORK/local"
chmod 700 "$WORK/srv" "$WORK/prov" "$WORK/req" "$WORK/local"
cleanup() {
    for p in ${ADV:-} ${SRV:-}; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    CMM_HOME="$WORK/prov" "$BIN" -q clean >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
. "$ROOT/benches/fake_image.sh"
. "$ROOT/benches/pairs.sh"
build_fake_image "$IMAGE"

make_tree "$WS" "$FILES" "$KIB"
echo "workspace: $(find "$WS" -type f | wc -l) files, $(du -sm "$WS" | cut -f1) MiB"

export ANTHROPIC_API_KEY="$KEY"
for h in prov local; do
    CMM_HOME="$WORK/$h" "$BIN" -q opt-in --accept-terms --claude-jobs >/dev/null
    CMM_HOME="$WORK/$h" "$BIN" -q limits --daily 1000 --tokens 100000000000 --daily-cost none >/dev/null
    CMM_HOME="$WORK/$h" "$BIN" -q config --set docker.workspaceLimit=200m >/dev/null
done
CMM_HOME="$WORK/req" "$BIN" -q config --set docker.workspaceLimit=200m >/dev/null

CMM_HOME="$WORK/srv" "$BIN" market serve --listen 127.0.0.1:0 --initial-grant 100000 >"$WORK/srv.out" 2>&1 &
SRV=$!
wait_line "$WORK/srv.out" 'ws://'
EP="$(grep -o 'ws://[0-9.:]*' "$WORK/srv.out" | head -1)"
CMM_HOME="$WORK/prov" "$BIN" --json advertise --slots 1 --price 1 --auto-accept --image "$IMAGE" \
    --endpoint "$EP" >"$WORK/adv.out" 2>&1 &
ADV=$!
wait_line "$WORK/adv.out" '"event":"offer"'

local_job() {
    CMM_HOME="$WORK/local" "$BIN" -q execute --approve-all --image "$IMAGE" --workspace "$WS" \
        --prompt "scenario:answer" >/dev/null 2>&1
}
market_job() {
    CMM_HOME="$WORK/req" "$BIN" -q bid --wait --max-price 5 --max-tokens 30000 --endpoint "$EP" \
        --workspace "$WS" --accept-cmd true --accept-image "$IMAGE" --prompt "scenario:answer" >/dev/null 2>"$WORK/bid.err" \
        || { cat "$WORK/bid.err" >&2; exit 1; }
}

local_job; market_job
run_pairs "$N" market market_job local local_job
echo "median extra wall time of the market round trip: ${MEDIAN} ms (goal: <= 1500 ms)"
