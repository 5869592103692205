#!/bin/sh
# Job entrypoint: the stdin contract (DESIGN.md section 6).
#
#   line 1  the credential, optionally prefixed with its kind:
#             "oauth:<token>"    -> CLAUDE_CODE_OAUTH_TOKEN (subscription login)
#             "api-key:<token>"  -> ANTHROPIC_API_KEY
#           without a prefix the kind is told from the token itself
#           (sk-ant-oat... is an OAuth token, anything else an API key).
#   rest    the prompt, passed on to `claude -p` as its stdin.
#
# Argument 1 is the model (alias or id); the rest are passed on to `claude`,
# and only these options are accepted (each takes one value, but
# --include-partial-messages): --include-partial-messages, --max-turns,
# --max-budget-usd, --permission-mode, --allowed-tools, --disallowed-tools.
# The credential is never written to disk, never echoed, and only the one
# matching variable is exported.
set -eu

model="${1:-sonnet}"
[ $# -gt 0 ] && shift
n=$#
i=0
while [ "$i" -lt "$n" ]; do
    case "$1" in
        --include-partial-messages) set -- "$@" "$1"; shift; i=$((i + 1)) ;;
        --max-turns|--max-budget-usd|--permission-mode|--allowed-tools|--disallowed-tools)
            if [ "$((i + 1))" -ge "$n" ]; then
                echo "entrypoint: $1 needs a value" >&2
                exit 64
            fi
            set -- "$@" "$1" "$2"; shift 2; i=$((i + 2)) ;;
        *)
            echo "entrypoint: refusing claude option \`$1\`" >&2
            exit 64 ;;
    esac
done

if ! IFS= read -r cred; then
    echo "entrypoint: stdin closed before the credential line" >&2
    exit 64
fi

case "$cred" in
    oauth:*) kind=oauth; cred="${cred#oauth:}" ;;
    api-key:*) kind=api-key; cred="${cred#api-key:}" ;;
    sk-ant-oat*) kind=oauth ;;
    *) kind=api-key ;;
esac

if [ -z "$cred" ]; then
    echo "entrypoint: the credential line is empty" >&2
    exit 64
fi

# Whatever the image or engine set, only the variable for this credential
# kind may exist, so Claude Code cannot pick a different login.
unset CLAUDE_CODE_OAUTH_TOKEN ANTHROPIC_API_KEY ANTHROPIC_AUTH_TOKEN
if [ "$kind" = oauth ]; then
    CLAUDE_CODE_OAUTH_TOKEN="$cred"
    export CLAUDE_CODE_OAUTH_TOKEN
else
    ANTHROPIC_API_KEY="$cred"
    export ANTHROPIC_API_KEY
fi
unset cred kind

# Never --bare (it ignores subscription tokens) and never
# --dangerously-skip-permissions: the permission mode is chosen per job
# (`--permission-mode`), and audited with it.
exec claude -p --output-format stream-json --verbose --model "$model" "$@"
