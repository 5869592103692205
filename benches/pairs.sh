# Sourced by the benches that time one command against another.
#
#   make_tree DIR FILES KIB    FILES files of KIB KiB each in 50 directories,
#                              plus README.md
#   median FILE                the median of the numbers in FILE, one a line
#   wait_line FILE PATTERN     wait (at most 20 s) for a line of FILE to match
#   run_pairs N A_NAME A B_NAME B
#                              N pairs of the commands A and B, their order
#                              alternating; prints each pair and sets MEDIAN
#                              to the median of A's extra time over B's (ms)
make_tree() {
    python3 - "$1" "$2" "$3" <<'PY'
import os, sys
root, files, kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
line = b"0123456789abcdef" * 4 + b"\n"
body = line * (kib * 1024 // len(line))
for i in range(files):
    d = os.path.join(root, "pkg%02d" % (i % 50))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "file%05d.txt" % i), "wb") as f:
        f.write(body[:-6] + b"%05d\n" % i)
with open(os.path.join(root, "README.md"), "wb") as f:
    f.write(b"# bench\n")
PY
}

median() {
    sort -n "$1" | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

wait_line() {
    _w=0
    until grep -q "$2" "$1" 2>/dev/null; do
        _w=$((_w + 1)); [ "$_w" -lt 2000 ] || { cat "$1" >&2; exit 1; }
        sleep 0.01
    done
}

run_pairs() {
    _extra="$(mktemp)"
    _i=1
    while [ "$_i" -le "$1" ]; do
        if [ $((_i % 2)) -eq 0 ]; then
            _t0=$(date +%s%3N); $3; _t1=$(date +%s%3N); $5; _t2=$(date +%s%3N)
            _a=$((_t1 - _t0)); _b=$((_t2 - _t1))
        else
            _t0=$(date +%s%3N); $5; _t1=$(date +%s%3N); $3; _t2=$(date +%s%3N)
            _b=$((_t1 - _t0)); _a=$((_t2 - _t1))
        fi
        echo "pair $_i: $2 ${_a} ms, $4 ${_b} ms, extra $((_a - _b)) ms"
        echo "$((_a - _b))" >> "$_extra"
        _i=$((_i + 1))
    done
    MEDIAN=$(median "$_extra")
    rm -f "$_extra"
}
