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
# Argument 1 is the model (alias or id). The credential is never written to
# disk, never echoed, and only the one matching variable is exported.
set -eu

model="${1:-sonnet}"

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
# --dangerously-skip-permissions: the job runs with Claude Code's defaults.
exec claude -p --output-format stream-json --verbose --model "$model"
