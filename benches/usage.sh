#!/usr/bin/env bash
# Benchmark `usage` on a synthetic 1,000,000-event audit log.
#
#   benches/usage.sh            # EVENTS=1000000 DAYS=90 RUNS=20 LIMIT_MS=200
#
# Builds the release binary and examples/gen_audit, writes a chained log of
# EVENTS events (jobs mixed with config and market events) over DAYS days,
# checks that `usage` reports the generator's totals, then times:
#   cold         `usage --format json` with no usage.idx (full rebuild)
#   warm         `usage --format json` with an index in step with the log
#   incremental  one new audit event (`config --set`), then `usage`
# Exits 1 if the warm median exceeds LIMIT_MS. Uses hyperfine when installed
# (apt-get install hyperfine), else a `date +%s%N` loop.
set -euo pipefail

EVENTS=${EVENTS:-1000000}
DAYS=${DAYS:-90}
RUNS=${RUNS:-20}
LIMIT_MS=${LIMIT_MS:-200}

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet --bin claude-max-market --example gen_audit
target=${CARGO_TARGET_DIR:-$root/target}
bin=$target/release/claude-max-market
gen=$target/release/examples/gen_audit

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CMM_HOME=$work NO_COLOR=1

t0=$(date +%s%N)
expected=$("$gen" "$work" "$EVENTS" "$DAYS")
t1=$(date +%s%N)
echo "log:         $expected ($(( (t1 - t0) / 1000000 )) ms to generate)"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2] + a[NR/2+1]) / 2)}'; }
# Time one command RUNS-ish times with `prepare` before each; print the median in ms.
time_ms() {
    local runs=$1 prepare=$2; shift 2
    for _ in $(seq "$runs"); do
        eval "$prepare"
        local a; a=$(now_ms)
        "$@" >/dev/null
        echo $(( $(now_ms) - a ))
    done | median
}

# Correctness first: the index must give the generator's totals.
"$bin" usage --format json >"$work/report.json"
python3 - "$work/report.json" "$expected" <<'PY'
import json, sys
r, e = json.load(open(sys.argv[1])), json.loads(sys.argv[2])
t = r["totals"]
got = {"tasks": t["tasks"], "succeeded": t["succeeded"], "total_tokens": t["tokens"]["total"]}
want = {k: e[k] for k in got}
assert got == want, f"usage says {got}, generator wrote {want}"
print(f"check:       usage totals match the generator ({got})")
PY

cold=$(time_ms 3 'rm -f "$CMM_HOME/usage.idx"' "$bin" usage --format json)
echo "cold:        ${cold} ms median of 3 (index rebuilt from $(stat -c %s "$work/audit.jsonl") bytes)"

if command -v hyperfine >/dev/null; then
    hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$work/warm.json" "$bin usage --format json" >&2
    warm=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print(round(r["median"]*1000, 1))' "$work/warm.json")
else
    warm=$(time_ms "$RUNS" ':' "$bin" usage --format json)
fi
echo "warm:        ${warm} ms median of $RUNS (index in step with the log)"

inc=$(time_ms 5 '"$bin" -q config --set limits.dailyTasks=$((RANDOM % 50 + 1)) >/dev/null' "$bin" usage --format json)
echo "incremental: ${inc} ms median of 5 (one event appended before each run)"

python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)" "$warm" "$LIMIT_MS" \
    || { echo "FAIL: warm median ${warm} ms exceeds ${LIMIT_MS} ms" >&2; exit 1; }
echo "ok:          warm median ${warm} ms <= ${LIMIT_MS} ms"
