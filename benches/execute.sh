#!/bin/sh
# Overhead of `execute` against `docker run --rm -i` of the same image and
# command, paired run by run, plus our resident memory during a job.
#
#   benches/execute.sh [N]      (N >= 10 pairs; default 15)
#
# Needs a Docker engine, a static busybox (`apt-get install busybox-static`)
# and a built binary (BIN=..., default target/release/claude-max-market).
# Prints each pair, the median of execute/docker-run ratios, and the peak RSS.
set -eu

N="${1:-15}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release/claude-max-market}"
IMAGE=cmm-fake-claude:bench
PROMPT="scenario:ok benchmark"
TOKEN=sk-ant-oat01-bench-token

[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release, or set BIN)" >&2; exit 2; }
[ "$N" -ge 10 ] || { echo "use at least 10 pairs" >&2; exit 2; }

export CMM_HOME="$(mktemp -d)"
trap 'rm -rf "$CMM_HOME"' EXIT
. "$ROOT/benches/fake_image.sh"

build_fake_image "$IMAGE"
"$BIN" -q opt-in --accept-terms >/dev/null
"$BIN" -q limits --daily 1000 --tokens 100000000 >/dev/null
export CLAUDE_CODE_OAUTH_TOKEN="$TOKEN"

now_ms() { date +%s%3N; }

# Warm both paths once (page cache, engine caches).
"$BIN" -q execute --approve-all --image "$IMAGE" --prompt "$PROMPT" >/dev/null 2>&1
printf 'oauth:%s\n%s' "$TOKEN" "$PROMPT" | docker run --rm -i "$IMAGE" sonnet >/dev/null

RATIOS="$(mktemp)"
i=1
while [ "$i" -le "$N" ]; do
    # Alternate which goes first, so drift does not favour one side.
    if [ $((i % 2)) -eq 0 ]; then
        t0=$(now_ms); "$BIN" -q execute --approve-all --image "$IMAGE" --prompt "$PROMPT" >/dev/null 2>&1; t1=$(now_ms)
        printf 'oauth:%s\n%s' "$TOKEN" "$PROMPT" | docker run --rm -i "$IMAGE" sonnet >/dev/null; t2=$(now_ms)
        ours=$((t1 - t0)); theirs=$((t2 - t1))
    else
        t0=$(now_ms); printf 'oauth:%s\n%s' "$TOKEN" "$PROMPT" | docker run --rm -i "$IMAGE" sonnet >/dev/null; t1=$(now_ms)
        "$BIN" -q execute --approve-all --image "$IMAGE" --prompt "$PROMPT" >/dev/null 2>&1; t2=$(now_ms)
        theirs=$((t1 - t0)); ours=$((t2 - t1))
    fi
    ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.3f", a / b }')
    echo "pair $i: execute ${ours} ms, docker run ${theirs} ms, ratio $ratio"
    echo "$ratio" >> "$RATIOS"
    i=$((i + 1))
done
median=$(sort -n "$RATIOS" | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
rm -f "$RATIOS"
echo "median ratio execute / docker run: $median (goal: <= 1.0)"

# Peak resident memory of our process over a whole job (GNU time).
if [ -x /usr/bin/time ]; then
    rss_kb=$(/usr/bin/time -f '%M' "$BIN" -q execute --approve-all --image "$IMAGE" --prompt "$PROMPT" 2>&1 >/dev/null | tail -1)
    echo "peak RSS of execute: $((rss_kb / 1024)) MiB (${rss_kb} KiB; goal: <= 20 MiB)"
fi
"$BIN" -q clean >/dev/null
