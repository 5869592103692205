//! Terms, usage policy and user rights: the text users accept at `opt-in`.
//!
//! The version and SHA-256 identify exactly what was accepted; consent
//! records both, and `status` / `compliance-check` compare them with these.

use sha2::{Digest, Sha256};

/// Bump when [`TERMS`] changes in substance; users are asked to accept again.
pub const TERMS_VERSION: &str = "2026-12-1";

/// The usage policy in one sentence, for orchestration layers that check it.
pub const USAGE_POLICY: &str = "claude-max-market never proxies, pools, shares or resells access to Claude: \
each node runs jobs only on its own operator's own login, on that operator's own machine, \
participation is voluntary and revocable at any time, and credentials are never transmitted, stored or forwarded.";

/// Full terms text.
pub const TERMS: &str = "\
CLAUDE-MAX-MARKET: TERMS, USAGE POLICY AND YOUR RIGHTS

1. What this tool does
   claude-max-market runs Claude Code jobs on your own computer, with your own
   Claude login, inside a locked-down Docker container, only after you consent,
   within the caps you set, and with every action written to a tamper-evident
   audit log on your machine. You may also volunteer spare capacity to a peer
   market: tasks arrive encrypted to you alone and run here, on your account.

2. Usage policy
   - Each node runs jobs only with its own operator's own login. Your
     credential is read at run time from a source you choose and handed to the
     job container over its standard input. It is never written to disk by this
     tool, never put in logs, job records, images or market messages, and never
     sent to another node or to the market coordinator.
   - Nothing here proxies, pools, shares or resells access to Claude. On a
     subscription login no one else's jobs run at all (section 5); on an API
     key, another user's job runs only if you accept it (or set a standing
     rule yourself), and you can see every one of them in the audit log.
   - RUV tokens reward completed contribution (work your machine finished). They
     are not a price for access to anyone's account.

3. Your rights
   - Participation is voluntary. `opt-out` revokes your consent at once: running
     jobs of ours are stopped and market offers withdrawn.
   - You set the caps (tasks and tokens per day, week and month; tokens per job;
     jobs at once; time per job) and can change them at any time with `limits`.
   - Every job needs your approval unless you approve it explicitly for that job
     or set a standing rule. Without a terminal to ask on, the answer is no.
   - You can read, export and verify the audit log at any time (`logs`, `audit`,
     `audit verify`). Prompts and results are never written to it, only hashes
     and numbers.

4. No legal certification
   This tool checks its own configuration and state (`compliance-check`). That
   is not legal advice and does not certify compliance with any law or with
   any provider's terms. Read your own plan's terms before you volunteer
   capacity to the market; you are responsible for how you use your account.

5. Subscription logins serve only your own nodes
   Anthropic's Claude Code terms say subscription (Free, Pro, Max) credentials
   are for ordinary, individual use, and that third-party tools may not route
   requests through them on behalf of other users. So when your login is a
   subscription (OAuth) token, `advertise` runs market tasks only from your own
   nodes (node ids in `market.ownNodes`, or keys imported with
   `keys import --own`) and declines every other task, writing the reason to
   the audit log. There is no override. To serve other people's tasks, use an
   API key (`credentials.source=api-key-env`) within its own terms.

6. No warranty
   The software is provided under the MIT licence, without warranty of any kind.
";

/// Hex SHA-256 of [`TERMS`].
pub fn terms_sha256() -> String {
    hex::encode(Sha256::digest(TERMS.as_bytes()))
}
