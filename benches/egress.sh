#!/usr/bin/env bash
# Egress overhead: 10 MiB transfers from a real job container (no network;
# the relay on its loopback, our proxy on the other end of its socket)
# against the same transfers direct, from a container on the server's own
# network. No internet needed.
#
#   bulk     a container serving 10 MiB per connection (busybox nc), on an
#            ordinary labelled test network
#   direct   a container on that network running TRANSFERS transfers
#   proxied  `execute` of the fake `claude`'s `bulk` scenario: the same
#            transfers as CONNECTs to `api.anthropic.com:443`, which the job's
#            proxy maps to the bulk server (CMM_EGRESS_RESOLVE, test only)
#
# Both sides time their TRANSFERS transfers inside their container with
# busybox `time` (10 ms resolution, hence several per run), so container
# start-up is not counted on either side. Direct and proxied runs alternate
# in pairs; the result is the median of proxied/direct over the pairs.
# Goal: median ratio <= 1.2.
#
# Usage: benches/egress.sh [pairs]   (env: BIN, TRANSFERS, CMM_BUSYBOX)
set -euo pipefail

PAIRS=${1:-9}
TRANSFERS=${TRANSFERS:-5}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN=${BIN:-$ROOT/target/release/claude-max-market}
IMAGE=cmm-fake-claude:bench-egress
LABEL=dev.claude-max-market.test=bench
SIZE=$((10 * 1024 * 1024))
NET=cmm-egress-bench-$$
TOKEN=sk-ant-oat01-bench-token

[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release, or set BIN)" >&2; exit 2; }

export CMM_HOME="$(mktemp -d)"
cleanup() {
    docker rm -f "cmm-bench-bulk-$$" "cmm-bench-client-$$" >/dev/null 2>&1 || true
    docker network rm "$NET" >/dev/null 2>&1 || true
    rm -rf "$CMM_HOME"
}
trap cleanup EXIT

. "$ROOT/benches/fake_image.sh"
build_fake_image "$IMAGE"
"$BIN" -q opt-in --accept-terms >/dev/null
"$BIN" -q limits --daily 1000 --tokens 100000000 >/dev/null
export CLAUDE_CODE_OAUTH_TOKEN="$TOKEN"

docker network create --label "$LABEL" "$NET" >/dev/null
docker run -d --name "cmm-bench-bulk-$$" --label "$LABEL" --network "$NET" --entrypoint /bin/busybox "$IMAGE" \
    nc -ll -p 9000 -e /bin/sh -c "head -c $SIZE /dev/zero" >/dev/null
docker run -d --user 0:0 --name "cmm-bench-client-$$" --label "$LABEL" --network "$NET" --entrypoint /bin/busybox "$IMAGE" \
    sleep 3600 >/dev/null
BULK=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "cmm-bench-bulk-$$")
export CMM_EGRESS_RESOLVE="api.anthropic.com:443=$BULK:9000"
echo "bulk $BULK:9000 ($BIN), $TRANSFERS x 10 MiB per run, $PAIRS pairs"

# One proxied run: "<bytes of one transfer> <seconds for TRANSFERS>".
proxied() {
    "$BIN" execute --json --approve-all --image "$IMAGE" --prompt "scenario:bulk n=$TRANSFERS" 2>/dev/null \
        | sed -n 's/.*"result": *"bulk bytes=\([0-9]*\) seconds=\([0-9.]*\)".*/\1 \2/p'
}

# Check both paths deliver exactly 10 MiB (the proxied one plus its 200 head).
direct_bytes=$(docker exec "cmm-bench-client-$$" sh -c "nc $BULK 9000 </dev/null | wc -c")
[ "$direct_bytes" -eq "$SIZE" ] || { echo "direct delivered $direct_bytes bytes" >&2; exit 1; }
read -r proxied_bytes _ < <(proxied)
[ "${proxied_bytes:-0}" -eq $((SIZE + 39)) ] || { echo "proxied delivered ${proxied_bytes:-0} bytes" >&2; exit 1; }

docker exec -i "cmm-bench-client-$$" sh -c 'cat >/tmp/direct.sh' <<EOF
i=0; while [ \$i -lt $TRANSFERS ]; do nc $BULK 9000 </dev/null >/dev/null; i=\$((i+1)); done
EOF
direct() {
    docker exec "cmm-bench-client-$$" sh -c "time sh /tmp/direct.sh" 2>&1 \
        | sed -n 's/^real[[:space:]]*\([0-9]*\)m[[:space:]]*\([0-9.]*\)s$/\1 \2/p' | awk '{print $1*60+$2}'
}

ratios=()
for i in $(seq "$PAIRS"); do
    if [ $((i % 2)) -eq 0 ]; then
        d=$(direct); read -r _ p < <(proxied)
    else
        read -r _ p < <(proxied); d=$(direct)
    fi
    r=$(awk -v p="$p" -v d="$d" 'BEGIN { printf "%.3f", p / d }')
    ratios+=("$r")
    printf 'pair %2d: direct %6.3f s  proxied %6.3f s  (%d x 10 MiB)  ratio %s\n' "$i" "$d" "$p" "$TRANSFERS" "$r"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END { print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2 }')
echo "median proxied/direct: $median (goal <= 1.2)"
awk -v m="$median" 'BEGIN { exit (m <= 1.2) ? 0 : 1 }'
