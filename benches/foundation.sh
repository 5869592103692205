#!/usr/bin/env bash
# Foundation benchmarks (issue: speed targets for status, health and audit verify).
#   - `status --json` and `health` median wall time (target <= 5 ms and <= 1/10 of `node -e 0`)
#   - `status` on a 1,000,000-event log vs an empty one (target ratio <= 1.5)
#   - `audit verify` throughput vs `sha256sum` on the same file (target >= 70%)
# Usage: benches/foundation.sh   (results also written to benches/out/foundation.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v hyperfine >/dev/null || { apt-get update -qq && apt-get install -y -qq hyperfine >/dev/null; }
cargo build --release -q
BIN=$PWD/target/release/claude-max-market
OUT=benches/out; mkdir -p $OUT
EMPTY=$(mktemp -d); BIG=$(mktemp -d); trap 'rm -rf "$EMPTY" "$BIG"' EXIT
chmod 700 "$EMPTY" "$BIG"
CMM_HOME=$EMPTY $BIN opt-in --accept-terms >/dev/null
python3 benches/gen_log.py "$BIG" 1000000
cp "$EMPTY/config.json" "$BIG/config.json"

median() { python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print(' '.join('%.3f' % (x['median']*1000) for x in r))" "$1"; }

# health exits 1 (WARNING: no runner image) on this bare install; time it anyway.
hyperfine -N -i --warmup 20 --runs 200 --export-json $OUT/startup.json \
  "env CMM_HOME=$EMPTY $BIN status --json" \
  "env CMM_HOME=$EMPTY $BIN health" \
  "node -e 0" >/dev/null
read -r S H N < <(median $OUT/startup.json)

hyperfine -N --warmup 20 --runs 200 --export-json $OUT/biglog.json \
  "env CMM_HOME=$EMPTY $BIN status --json" \
  "env CMM_HOME=$BIG $BIN status --json" >/dev/null
read -r SE SB < <(median $OUT/biglog.json)

SIZE=$(stat -c %s "$BIG/audit.jsonl")
CMM_HOME=$BIG $BIN audit verify >/dev/null   # must pass before timing
hyperfine -N --warmup 2 --runs 10 --export-json $OUT/verify.json \
  "env CMM_HOME=$BIG $BIN audit verify" \
  "sha256sum $BIG/audit.jsonl" >/dev/null
read -r V SHA < <(median $OUT/verify.json)

python3 - "$S" "$H" "$N" "$SE" "$SB" "$V" "$SHA" "$SIZE" <<'PY' | tee $OUT/foundation.txt
import sys
s, h, n, se, sb, v, sha, size = map(float, sys.argv[1:])
mb = size / 1e6
print(f"status --json median      {s:8.3f} ms   (target <= 5 ms; node -e 0 = {n:.1f} ms, ratio {s/n:.3f}, target <= 0.1)")
print(f"health median             {h:8.3f} ms   (ratio to node {h/n:.3f})")
print(f"status, empty log         {se:8.3f} ms")
print(f"status, 1,000,000 events  {sb:8.3f} ms   (ratio {sb/se:.2f}, target <= 1.5)")
print(f"audit verify {mb:.0f} MB        {v:8.1f} ms   = {mb/(v/1000):.0f} MB/s")
print(f"sha256sum same file       {sha:8.1f} ms   = {mb/(sha/1000):.0f} MB/s   (verify at {100*sha/v:.0f}% of sha256sum, target >= 70%)")
PY
