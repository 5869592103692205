#!/usr/bin/env bash
# Encryption speed and memory against Debian's `age`.
#
#   benches/crypto.sh [RUNS]        (default RUNS=5; BENCH_DIR picks the scratch dir)
#
# 1. Paired runs on a 1 GiB file: `encrypt` vs `age -r`, `decrypt` vs
#    `age -d`, alternating which goes first in each pair so page-cache
#    warmth favours neither. Reports each median and the median of the
#    per-pair ratios (goal: <= 1.0). `decrypt-`: `decrypt --output -`
#    redirected to a file vs `age -d` likewise; ours holds the plaintext in
#    `$TMPDIR` (set to the scratch dir) until it verified, then copies it.
# 2. Peak resident memory (`/usr/bin/time -v`) of encrypt and decrypt for a
#    1 MiB and a 1 GiB file, and of `decrypt --output -` (goal: <= 32 MiB
#    and the same for both sizes).
set -euo pipefail

RUNS=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="$ROOT/target/release/claude-max-market"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need age || ! need age-keygen || ! [ -x /usr/bin/time ]; then
    echo "installing age and time" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get install -y age time >/dev/null
fi

(cd "$ROOT" && cargo build --release --quiet)

WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/cmm-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# Input, two envelopes, two outputs and the stdout spool: about 6 GiB.
if [ "$(df --output=avail -k "$WORK" | tail -1)" -lt $((7 << 20)) ]; then
    echo "need 7 GiB free in $(dirname "$WORK") (set BENCH_DIR)" >&2
    exit 1
fi
export CMM_HOME="$WORK/home"
# The stdout spool lives where the rest of the bench's files do.
export TMPDIR="$WORK"
"$BIN" -q keys generate >/dev/null
age-keygen -o "$WORK/age.key" 2>/dev/null
AGE_RCPT=$(age-keygen -y "$WORK/age.key")

head -c $((1 << 30)) /dev/urandom >"$WORK/big"
head -c $((1 << 20)) /dev/urandom >"$WORK/small"

# wall seconds of one command (stdout/stderr discarded); a failed command
# (a full disk, say) stops the bench instead of timing the failure
wall() {
    local t0 t1
    t0=$(date +%s%N)
    if ! "$@" >/dev/null 2>"$WORK/wall.err"; then
        cat "$WORK/wall.err" >&2
        echo "failed: $*" >&2
        kill "$$"
    fi
    t1=$(date +%s%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) / 1e9 }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Each timed run writes a fresh output file (the previous one is removed
# before the clock starts): replacing a 1 GiB file makes the kernel free and
# flush the old one inside the timed run, which measures the file system, not
# the tool. `encrypt`/`decrypt` refuse to overwrite without `--force` anyway.
ours_enc() { "$BIN" -q encrypt --input "$WORK/big" --output "$WORK/big.cmm"; }
age_enc() { age -r "$AGE_RCPT" -o "$WORK/big.age" "$WORK/big"; }
ours_dec() { "$BIN" -q decrypt --input "$WORK/big.cmm" --output "$WORK/big.out"; }
age_dec() { age -d -i "$WORK/age.key" -o "$WORK/big.age.out" "$WORK/big.age"; }
ours_dec_stdout() { "$BIN" -q decrypt --input "$WORK/big.cmm" --output - >"$WORK/big.stdout"; }
age_dec_stdout() { age -d -i "$WORK/age.key" "$WORK/big.age" >"$WORK/big.age.stdout"; }

# Warm up: page cache for the input, and the envelopes the decrypt runs read.
ours_enc; age_enc

pair() { # NAME OURS AGE OUTPUTS...
    local name=$1 ours=$2 theirs=$3 a b
    shift 3
    : >"$WORK/$name.ours"; : >"$WORK/$name.age"; : >"$WORK/$name.ratio"
    for i in $(seq 1 "$RUNS"); do
        rm -f "$@"
        if [ $((i % 2)) -eq 1 ]; then
            a=$(wall "$ours"); b=$(wall "$theirs")
        else
            b=$(wall "$theirs"); a=$(wall "$ours")
        fi
        echo "$a" >>"$WORK/$name.ours"; echo "$b" >>"$WORK/$name.age"
        awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f\n", a / b }' >>"$WORK/$name.ratio"
        echo "  $name run $i: ours ${a}s  age ${b}s" >&2
    done
    printf '%-8s ours median %6ss   age median %6ss   median ratio %s   (runs: ours %s | age %s)\n' \
        "$name" "$(median <"$WORK/$name.ours")" "$(median <"$WORK/$name.age")" "$(median <"$WORK/$name.ratio")" \
        "$(paste -sd' ' "$WORK/$name.ours")" "$(paste -sd' ' "$WORK/$name.age")"
}

echo "== 1 GiB, $RUNS paired runs ($(nproc) CPUs, $(uname -m))"
pair encrypt ours_enc age_enc "$WORK/big.cmm" "$WORK/big.age"
pair decrypt ours_dec age_dec "$WORK/big.out" "$WORK/big.age.out"
cmp -s "$WORK/big" "$WORK/big.out" || { echo "decrypted 1 GiB differs from the input" >&2; exit 1; }
rm -f "$WORK/big.out" "$WORK/big.age.out"
pair decrypt- ours_dec_stdout age_dec_stdout "$WORK/big.stdout" "$WORK/big.age.stdout"
cmp -s "$WORK/big" "$WORK/big.stdout" || { echo "1 GiB decrypted to stdout differs from the input" >&2; exit 1; }
rm -f "$WORK/big.stdout" "$WORK/big.age.stdout"

rss() { # prints max RSS in KiB of the command
    /usr/bin/time -v "$@" 2>&1 >/dev/null | awk -F': ' '/Maximum resident set size/ { print $2 }'
}
echo "== peak resident memory (KiB)"
for f in small big; do
    "$BIN" -q encrypt --input "$WORK/$f" --output "$WORK/$f.cmm" --force
    e=$(rss "$BIN" -q encrypt --input "$WORK/$f" --output "$WORK/$f.cmm" --force)
    d=$(rss "$BIN" -q decrypt --input "$WORK/$f.cmm" --output "$WORK/$f.out" --force)
    rm -f "$WORK/$f.out"
    o=$(rss sh -c '"$0" -q decrypt --input "$1" --output - >"$2"' "$BIN" "$WORK/$f.cmm" "$WORK/$f.out")
    ae=$(rss age -r "$AGE_RCPT" -o "$WORK/$f.age" "$WORK/$f")
    ad=$(rss age -d -i "$WORK/age.key" -o "$WORK/$f.age.out" "$WORK/$f.age")
    size=$([ "$f" = small ] && echo "1 MiB" || echo "1 GiB")
    printf '%-6s encrypt %6s  decrypt %6s  decrypt to stdout %6s   (age: %6s / %6s)\n' "$size" "$e" "$d" "$o" "$ae" "$ad"
    rm -f "$WORK/$f.out" "$WORK/$f.age.out"
done
