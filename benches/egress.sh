#!/usr/bin/env bash
# Egress proxy overhead: a 10 MiB transfer through our CONNECT proxy vs the
# same transfer direct, on one labelled test network (no internet needed).
#
#   bulk    a container serving 10 MiB per connection (busybox nc)
#   client  a container on the same (ordinary, routable) network
#   proxy   `claude-max-market docker egress-proxy` on the network's gateway,
#           with `api.anthropic.com:443` mapped to the bulk server
#           (CMM_EGRESS_RESOLVE, test only)
#
# Each run times TRANSFERS transfers in the client (busybox `time`, 10 ms
# resolution, hence several per run); direct and proxied runs alternate in
# pairs; the result is the median of proxied/direct over the pairs.
# Goal: median ratio <= 1.2.
#
# Usage: benches/egress.sh [pairs]   (env: BIN, IMAGE, TRANSFERS)
set -euo pipefail

PAIRS=${1:-9}
TRANSFERS=${TRANSFERS:-5}
BIN=${BIN:-target/debug/claude-max-market}
IMAGE=${IMAGE:-cmm-fake-claude:test}
LABEL=dev.claude-max-market.test=bench
SIZE=$((10 * 1024 * 1024))
NET=cmm-egress-bench-$$
HOME_DIR=$(mktemp -d)

[ -x "$BIN" ] || cargo build --quiet
docker image inspect "$IMAGE" >/dev/null 2>&1 || {
    echo "no $IMAGE: run \`cargo test --test docker_execute\` once to build it, or set IMAGE" >&2
    exit 1
}

PROXY_PID=
cleanup() {
    [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
    docker rm -f "cmm-bench-bulk-$$" "cmm-bench-client-$$" >/dev/null 2>&1 || true
    docker network rm "$NET" >/dev/null 2>&1 || true
    rm -rf "$HOME_DIR"
}
trap cleanup EXIT

docker network create --label "$LABEL" "$NET" >/dev/null
GW=$(docker network inspect -f '{{(index .IPAM.Config 0).Gateway}}' "$NET")
docker run -d --name "cmm-bench-bulk-$$" --label "$LABEL" --network "$NET" --entrypoint /bin/busybox "$IMAGE" \
    nc -ll -p 9000 -e /bin/sh -c "head -c $SIZE /dev/zero" >/dev/null
docker run -d --user 0:0 --name "cmm-bench-client-$$" --label "$LABEL" --network "$NET" --entrypoint /bin/busybox "$IMAGE" \
    sleep 3600 >/dev/null
BULK=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "cmm-bench-bulk-$$")

# The proxy runs until its stdin closes; a FIFO holds it open.
mkfifo "$HOME_DIR/hold"
CMM_HOME="$HOME_DIR" CMM_EGRESS_RESOLVE="api.anthropic.com:443=$BULK:9000" \
    "$BIN" docker egress-proxy --listen "$GW" <"$HOME_DIR/hold" >"$HOME_DIR/proxy.out" &
PROXY_PID=$!
exec 3>"$HOME_DIR/hold"
for _ in $(seq 50); do [ -s "$HOME_DIR/proxy.out" ] && break; sleep 0.1; done
PROXY=$(head -1 "$HOME_DIR/proxy.out")
echo "bulk $BULK:9000, proxy $PROXY ($BIN), $TRANSFERS x 10 MiB per run, $PAIRS pairs"

# Check both paths deliver exactly 10 MiB (the proxied one plus its 200 head).
direct_bytes=$(docker exec "cmm-bench-client-$$" sh -c "nc $BULK 9000 </dev/null | wc -c")
proxied_bytes=$(docker exec "cmm-bench-client-$$" sh -c \
    "printf 'CONNECT api.anthropic.com:443 HTTP/1.1\r\n\r\n' | nc ${PROXY%:*} ${PROXY##*:} | wc -c")
[ "$direct_bytes" -eq "$SIZE" ] || { echo "direct delivered $direct_bytes bytes" >&2; exit 1; }
[ "$proxied_bytes" -eq $((SIZE + 39)) ] || { echo "proxied delivered $proxied_bytes bytes" >&2; exit 1; }

# The two loops, as scripts in the client (quoting stays simple).
docker exec -i "cmm-bench-client-$$" sh -c 'cat >/tmp/direct.sh' <<EOF
i=0; while [ \$i -lt $TRANSFERS ]; do nc $BULK 9000 </dev/null >/dev/null; i=\$((i+1)); done
EOF
docker exec -i "cmm-bench-client-$$" sh -c 'cat >/tmp/proxied.sh' <<EOF
i=0; while [ \$i -lt $TRANSFERS ]; do
  printf 'CONNECT api.anthropic.com:443 HTTP/1.1\\r\\n\\r\\n' | nc ${PROXY%:*} ${PROXY##*:} >/dev/null; i=\$((i+1))
done
EOF

# Seconds for one script's TRANSFERS transfers, timed inside the client.
timed() {
    docker exec "cmm-bench-client-$$" sh -c "time sh /tmp/$1.sh" 2>&1 \
        | sed -n 's/^real[[:space:]]*\([0-9]*\)m[[:space:]]*\([0-9.]*\)s$/\1 \2/p' | awk '{print $1*60+$2}'
}

ratios=()
for i in $(seq "$PAIRS"); do
    if [ $((i % 2)) -eq 0 ]; then
        d=$(timed direct); p=$(timed proxied)
    else
        p=$(timed proxied); d=$(timed direct)
    fi
    r=$(awk -v p="$p" -v d="$d" 'BEGIN { printf "%.3f", p / d }')
    ratios+=("$r")
    printf 'pair %2d: direct %6.3f s  proxied %6.3f s  (%d x 10 MiB)  ratio %s\n' "$i" "$d" "$p" "$TRANSFERS" "$r"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END { print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2 }')
echo "median proxied/direct: $median (goal <= 1.2)"
exec 3>&-
wait "$PROXY_PID" || true
echo "proxy counts: $(tr -d '\n ' <"$HOME_DIR/proxy.out" | sed 's/^[^{]*//')"
awk -v m="$median" 'BEGIN { exit (m <= 1.2) ? 0 : 1 }'
