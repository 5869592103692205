# Sourced by the workspace benches.
#
#   make_tree DIR FILES KIB    FILES files of KIB KiB each in 50 directories,
#                              plus README.md
#   median FILE                the median of the numbers in FILE, one a line
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
