//! Stages 10-12 of a job: what the stream and the container's ending mean
//! (success is decided by the final `result` event's `is_error`, never by
//! its `subtype`), the job record, and the terminal audit event's fields.
//! Pure: it must not write, count or audit anything (that is [`super::record`]).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::{JobRecord, JobSpec, Status};
use crate::claude::stream::{Outcome, StreamState};
use crate::claude::{one_line_redacted, pricing};
use crate::docker::container::{self, Ending, KillReason, Run};
use crate::docker::egress::EgressReport;

/// How long Claude Code's own error text may be in messages and records.
const CLAUDE_ERROR_CHARS: usize = 400;

/// What is known about a job apart from how it ended.
pub(super) struct Facts<'a> {
    pub job_id: &'a str,
    pub spec: &'a JobSpec,
    pub prompt_sha: String,
    pub credential_kind: &'static str,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub egress: EgressReport,
}

/// Status, error in words, kill reason, container exit code.
type Decided = (Status, Option<String>, Option<String>, Option<i64>);

fn decide(ending: &Ending, state: &StreamState) -> Decided {
    let outcome = state.outcome.as_ref();
    match ending {
        Ending::Cancelled => (Status::Cancelled, Some("cancelled".to_string()), None, None),
        // Ended by us at the first refusal: a failure of the login, not a
        // kill at a cap.
        Ending::Killed(KillReason::AuthFailed) => (
            Status::Failed,
            Some("authentication_failed".to_string()),
            Some(KillReason::AuthFailed.name().to_string()),
            None,
        ),
        Ending::Killed(r) => (
            Status::Killed,
            Some(format!("killed ({})", r.name())),
            Some(r.name().to_string()),
            None,
        ),
        // Ended at its result: the result decides, and the process's exit
        // code was not waited for.
        Ending::Finished => match outcome {
            Some(o) if !o.is_error => (Status::Completed, None, None, None),
            Some(o) => (Status::Failed, Some(why_failed(o, state)), None, None),
            None => (
                Status::Failed,
                Some("Claude Code ended without a result".into()),
                None,
                None,
            ),
        },
        Ending::Exited(code) => match outcome {
            Some(o) if !o.is_error => (Status::Completed, None, None, Some(*code)),
            Some(o) => (Status::Failed, Some(why_failed(o, state)), None, Some(*code)),
            None if *code == container::EXIT_OOM => (
                Status::Failed,
                Some("the container ran out of memory (raise `docker.memory`)".into()),
                None,
                Some(*code),
            ),
            None if *code == container::EXIT_REMOVED => (
                Status::Failed,
                Some("the container was stopped from outside (opt-out or `clean --force`) before a result".into()),
                None,
                Some(*code),
            ),
            None => (
                Status::Failed,
                Some(format!("Claude Code exited with code {code} without a result")),
                None,
                Some(*code),
            ),
        },
    }
}

/// A short machine-readable reason for an error result.
fn why_failed(o: &Outcome, state: &StreamState) -> String {
    if state.rate_limit.as_ref().is_some_and(|r| r.rejected()) {
        return "rate limit rejected".to_string();
    }
    if matches!(o.api_error_status, Some(401 | 403))
        || looks_like_auth_failure(o.result.as_deref())
        || state.retries.last().is_some_and(|r| r.is_auth_failure())
    {
        return "authentication_failed".to_string();
    }
    if let Some(e) = &state.message_error {
        return e.clone();
    }
    if let Some(t) = &o.terminal_reason {
        return t.clone();
    }
    match o.subtype.as_deref() {
        Some(s) if s != "success" => s.to_string(),
        other => format!("Claude Code reported an error (subtype {})", other.unwrap_or("none")),
    }
}

fn looks_like_auth_failure(text: Option<&str>) -> bool {
    text.is_some_and(|t| {
        t.contains("authentication_error")
            || t.contains("Invalid API key")
            || t.contains("invalid x-api-key")
            || t.contains("OAuth token has expired")
            || t.starts_with("API Error: 401")
            || t.starts_with("API Error: 403")
    })
}

/// Claude Code's own words for what went wrong: an error result's text,
/// else the last retry's error, else the message error, else the last line
/// it wrote on stderr.
fn claude_error(state: &StreamState, stderr_tail: &str) -> Option<String> {
    let text = match &state.outcome {
        Some(o) if o.is_error => o
            .result
            .clone()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| (!o.errors.is_empty()).then(|| o.errors.join("; "))),
        Some(_) => return None,
        None => None,
    }
    .or_else(|| {
        state.retries.last().map(|r| match r.error_status {
            Some(s) => format!("HTTP {s}: {}", r.error.as_deref().unwrap_or("error")),
            None => format!(
                "{} (no HTTP response: the connection failed)",
                r.error.as_deref().unwrap_or("error")
            ),
        })
    })
    .or_else(|| state.message_error.clone())
    .or_else(|| {
        stderr_tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(str::to_string)
    })?;
    Some(one_line_redacted(&text, CLAUDE_ERROR_CHARS))
}

/// The record of a job whose container ran and stopped.
pub(super) fn record(f: &Facts<'_>, state: &StreamState, run: &Run) -> JobRecord {
    let (status, error, kill_reason, exit_code) = decide(&run.ending, state);
    let claude_error = if status == Status::Completed {
        None
    } else {
        claude_error(state, &run.stderr_tail)
    };
    build(
        f,
        state,
        status,
        error,
        claude_error,
        kill_reason,
        exit_code,
        run.stderr_tail.clone(),
        run.container_id.clone(),
    )
}

/// The record of a job whose engine failed under it, with what was seen.
pub(super) fn engine_failed(f: &Facts<'_>, state: &StreamState) -> JobRecord {
    build(
        f,
        state,
        Status::Failed,
        Some("engine-error".into()),
        None,
        None,
        None,
        String::new(),
        String::new(),
    )
}

#[allow(clippy::too_many_arguments)]
fn build(
    f: &Facts<'_>,
    state: &StreamState,
    status: Status,
    error: Option<String>,
    claude_error: Option<String>,
    kill_reason: Option<String>,
    exit_code: Option<i64>,
    stderr_tail: String,
    container_id: String,
) -> JobRecord {
    let outcome = state.outcome.as_ref();
    let usage = state.usage_so_far();
    let model = state.model.as_deref().unwrap_or(&f.spec.model);
    // Claude Code's own figure when it gave one; otherwise (stopped before
    // its result) an estimate, so stopping a job never escapes the caps.
    let (cost_usd, cost_estimated) = match outcome.and_then(|o| o.total_cost_usd) {
        Some(c) => (Some(c), false),
        None if usage.total() > 0 => (Some(pricing::estimate_usd(model, &usage)), true),
        None => (None, false),
    };
    JobRecord {
        job_id: f.job_id.to_string(),
        status,
        source: f.spec.source.clone(),
        model: f.spec.model.clone(),
        model_resolved: state.model.clone(),
        image: f.spec.image.clone(),
        prompt_sha256: f.prompt_sha.clone(),
        prompt_bytes: f.spec.prompt.len(),
        max_tokens: f.spec.max_tokens,
        max_turns: f.spec.max_turns,
        max_budget_usd: f.spec.max_budget_usd,
        permission_mode: f.spec.effective_permission_mode().to_string(),
        credential_kind: f.credential_kind,
        timeout_s: f.spec.timeout.as_secs(),
        started_at: f.started_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        finished_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        duration_ms: f.duration_ms,
        claude_duration_ms: outcome.and_then(|o| o.duration_ms),
        num_turns: outcome.and_then(|o| o.num_turns).unwrap_or(state.turns),
        usage,
        fresh_tokens: usage.fresh(),
        total_tokens: usage.total(),
        cost_usd,
        cost_estimated,
        result: outcome.and_then(|o| o.result.clone()),
        is_error: outcome.map(|o| o.is_error),
        subtype: outcome.and_then(|o| o.subtype.clone()),
        terminal_reason: outcome.and_then(|o| o.terminal_reason.clone()),
        error,
        claude_error,
        kill_reason,
        exit_code,
        exit: status.exit(),
        retries: state.retries.clone(),
        rate_limit: state.rate_limit.clone(),
        invalid_lines: state.invalid_lines.clone(),
        invalid_line_count: state.invalid_count,
        stderr_tail,
        container_id,
        egress: f.egress.clone(),
        changes: None,
        workspace: None,
    }
}

/// The terminal audit event's fields: numbers, ids and reasons, never the
/// result text. Egress targets (which a job's content chooses) stay in the
/// job record, out of the hash chain.
pub(super) fn terminal_fields(r: &JobRecord) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("job_id".into(), json!(r.job_id));
    m.insert("model".into(), json!(r.model));
    m.insert("duration_ms".into(), json!(r.duration_ms));
    m.insert("usage".into(), r.usage.to_json());
    m.insert("cost_usd".into(), json!(r.cost_usd));
    if r.cost_estimated {
        m.insert("cost_estimated".into(), json!(true));
    }
    m.insert("num_turns".into(), json!(r.num_turns));
    m.insert("exit_code".into(), json!(r.exit_code));
    if let Some(k) = &r.kill_reason {
        m.insert("reason".into(), json!(k));
    }
    if let Some(t) = &r.terminal_reason {
        m.insert("terminal_reason".into(), json!(t));
    }
    if r.status == Status::Failed {
        m.insert("error".into(), json!(r.error));
    }
    if r.invalid_line_count > 0 {
        m.insert("invalid_lines".into(), json!(r.invalid_line_count));
    }
    m.insert("egress".into(), json!(r.egress.mode));
    m.insert("egress_allowed".into(), json!(r.egress.allowed));
    m.insert("egress_failed".into(), json!(r.egress.failed));
    m.insert("egress_refused".into(), json!(r.egress.refused));
    super::workspace::audit_fields(&mut m, r);
    Value::Object(m)
}

/// A sentence for the user when the job did not complete.
pub(super) fn failure_message(r: &JobRecord) -> String {
    let said = r
        .claude_error
        .as_ref()
        .map(|e| format!("; Claude Code said: {e}"))
        .unwrap_or_default();
    match r.status {
        Status::Completed => "completed".into(),
        Status::Cancelled => "cancelled; the container was removed".into(),
        Status::Killed => match r.kill_reason.as_deref() {
            Some("timeout") => format!("killed: it ran past the {} s timeout", r.timeout_s),
            _ => format!(
                "killed: it used {} fresh tokens, past the per-task cap of {}",
                r.fresh_tokens, r.max_tokens
            ),
        },
        Status::Failed => {
            if let Some(l) = r.rate_limit.as_ref().filter(|l| l.rejected()) {
                return format!(
                    "Claude's rate limit{} was reached{}",
                    l.kind.as_ref().map(|k| format!(" ({k})")).unwrap_or_default(),
                    l.resets_at_text()
                        .map(|t| format!("; it resets {t}"))
                        .unwrap_or_default()
                );
            }
            match r.error.as_deref() {
                Some("authentication_failed") => format!(
                    "Claude Code could not log in: the {} was rejected{said}",
                    credential_words(r.credential_kind)
                ),
                Some("max_turns" | "error_max_turns") => format!(
                    "Claude Code stopped at the job's turn limit ({} turns){said}",
                    r.max_turns
                ),
                Some("budget_exhausted" | "error_max_budget_usd") => format!(
                    "Claude Code stopped at the job's budget ({}){said}",
                    r.max_budget_usd
                        .map(|b| format!("${b}"))
                        .unwrap_or_else(|| "no budget".into())
                ),
                Some(e) => format!("{e}{said}"),
                None => format!("failed{said}"),
            }
        }
    }
}

fn credential_words(kind: &str) -> &'static str {
    match kind {
        "api-key" => "API key",
        "subscription" => "subscription token",
        _ => "credential",
    }
}

/// What to do next, fitted to the failure and the credential kind in use.
pub(super) fn failure_hint(r: &JobRecord) -> Option<String> {
    if r.status == Status::Completed {
        return None;
    }
    let see = format!("see the record with `claude-max-market logs --job {}`", r.job_id);
    let what = match (r.error.as_deref(), r.credential_kind) {
        (Some("authentication_failed"), "api-key") => {
            "check `ANTHROPIC_API_KEY` (or `credentials.tokenFile` / `tokenCommand`): create or copy a valid key at console.anthropic.com".to_string()
        }
        (Some("authentication_failed"), _) => {
            "renew your subscription token with `claude setup-token` and set `CLAUDE_CODE_OAUTH_TOKEN` (or your `credentials.tokenFile`)".to_string()
        }
        _ if r.kill_reason.as_deref() == Some("token-cap") => {
            "raise the cap with `claude-max-market limits --max-tokens-per-task N`, or give the job `--max-tokens N`".to_string()
        }
        (Some("max_turns" | "error_max_turns"), _) => {
            "give the job more turns with `--max-turns N` (at most `limits.maxTurnsPerTask`)".to_string()
        }
        (Some("budget_exhausted" | "error_max_budget_usd"), _) => {
            "give the job a larger budget with `--max-budget-usd X` (at most `limits.maxCostPerTask`)".to_string()
        }
        _ if r.kill_reason.as_deref() == Some("timeout") => {
            "give the job more time with `--timeout S` or `claude-max-market limits --timeout S`".to_string()
        }
        _ if r.egress.failed > 0 => format!(
            "the Claude API could not be reached from the egress proxy ({}); check this machine's network and DNS",
            r.egress
                .targets
                .iter()
                .find_map(|t| t.last_error.clone())
                .unwrap_or_else(|| "connect failed".into())
        ),
        _ => return Some(see),
    };
    Some(format!("{what}; {see}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claude::stream::StreamState;

    #[test]
    fn a_refused_login_is_a_failure_not_a_kill_and_says_why() {
        let mut s = StreamState::default();
        s.feed(r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":500,"error_status":401,"error":"authentication_failed"}"#);
        let (status, error, reason, _) = decide(&Ending::Killed(KillReason::AuthFailed), &s);
        assert_eq!(status, Status::Failed);
        assert_eq!(error.as_deref(), Some("authentication_failed"));
        assert_eq!(reason.as_deref(), Some("auth-failed"));
        assert_eq!(claude_error(&s, "").as_deref(), Some("HTTP 401: authentication_failed"));
    }

    #[test]
    fn an_error_result_is_quoted_redacted_on_one_line() {
        let mut s = StreamState::default();
        s.feed(r#"{"type":"result","subtype":"success","is_error":true,"result":"API Error: 401 {\"type\":\"error\",\"error\":{\"type\":\"authentication_error\",\"message\":\"invalid x-api-key sk-ant-api03-zzz\"}}\n"}"#);
        let (status, error, _, _) = decide(&Ending::Exited(1), &s);
        assert_eq!(
            (status, error.as_deref()),
            (Status::Failed, Some("authentication_failed"))
        );
        let said = claude_error(&s, "").unwrap();
        assert!(
            said.contains("sk-ant-[redacted]") && !said.contains("zzz") && !said.contains('\n'),
            "{said}"
        );
    }
}
