#!/bin/sh
# What a workspace costs a job: `execute --workspace DIR` (copy in, the
# job, copy out, diff on the host, patch saved) against the same job
# without a workspace, paired run by run on the instant fake `claude`.
#
#   benches/execute_workspace.sh [N] [FILES] [KIB]   (default 10 pairs of a
#                                                   5,000-file, 50 MiB tree)
#
# Needs a Docker engine, a static busybox (`apt-get install busybox-static`)
# and a built binary (BIN=..., default target/release/claude-max-market).
# The job edits the workspace (adds, modifies, deletes, chmods a few files),
# so the patch is real. Prints each pair, and the median extra wall time.
set -eu

N="${1:-10}"
FILES="${2:-5000}"
KIB="${3:-10}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release/claude-max-market}"
IMAGE=cmm-fake-claude:bench
TOKEN=sk-ant-oat01-bench-token

[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release, or set BIN)" >&2; exit 2; }

export CMM_HOME="$(mktemp -d)"
WS="$(mktemp -d)"
trap 'rm -rf "$CMM_HOME" "$WS"' EXIT
. "$ROOT/benches/fake_image.sh"
. "$ROOT/benches/pairs.sh"

build_fake_image "$IMAGE"
"$BIN" -q opt-in --accept-terms >/dev/null
"$BIN" -q limits --daily 1000 --tokens 100000000000 --daily-cost none >/dev/null
"$BIN" -q config --set docker.workspaceLimit=200m >/dev/null
export CLAUDE_CODE_OAUTH_TOKEN="$TOKEN"

# FILES files of KIB KiB each in 50 directories, plus what the job edits.
make_tree "$WS" "$FILES" "$KIB"
printf 'old\n' > "$WS/delete-me.txt"
printf '#!/bin/sh\n' > "$WS/run.sh"
echo "workspace: $(find "$WS" -type f | wc -l) files, $(du -sm "$WS" | cut -f1) MiB"

plain() { "$BIN" -q execute --approve-all --image "$IMAGE" --prompt "scenario:ok" >/dev/null 2>&1; }
# The job edits its copy; DIR itself is never changed without --apply, so
# every run starts from the same tree.
with_ws() { "$BIN" -q execute --approve-all --image "$IMAGE" --workspace "$WS" --prompt "scenario:workspace" >/dev/null 2>&1; }

plain; with_ws
run_pairs "$N" "with workspace" with_ws without plain
echo "median extra wall time of the workspace: ${MEDIAN} ms (goal: <= 2000 ms)"
"$BIN" -q clean >/dev/null
