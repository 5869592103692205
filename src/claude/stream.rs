//! Parser for Claude Code's `--output-format stream-json --verbose` events.
//! Pure: it does no I/O and decides nothing about caps or kills itself.
//!
//! One JSON object per line. The shapes we read (everything else, including
//! event types we do not know, is ignored so a newer Claude Code keeps working):
//!
//! - `{"type":"system","subtype":"init","model":..,"session_id":..}`
//! - `{"type":"assistant"|"user","message":{"id":..,"usage":{..}},"error":..}`:
//!   one line per content block, each repeating its message's usage, so usage
//!   is counted once per message id.
//! - `{"type":"system","subtype":"api_retry","attempt":n,"max_retries":m,"retry_delay_ms":d,"error":..}`
//! - `{"type":"rate_limit_event","rate_limit_info":{"status":..,"resetsAt":unix_s,"rateLimitType":..}}`
//! - `{"type":"stream_event","event":{"type":"message_start","message":{"id":..,"usage":{..}}},
//!   "api_message_id":..}` and `message_delta` (`event.usage`): the raw API events
//!   `--include-partial-messages` adds. They carry the usage the API has already
//!   reported while an answer is still streaming, so a job stopped mid-answer
//!   still counts what it spent. Counted under the same message id as the
//!   `assistant` line that follows, so nothing is counted twice.
//! - `{"type":"result","subtype":..,"is_error":b,"terminal_reason":..,"duration_ms":..,
//!   "num_turns":..,"result":..,"total_cost_usd":..,"usage":{..}}`: the only event
//!   that decides success. Claude Code reports a failed login as
//!   `subtype: "success"` with `is_error: true`, so `subtype` is never trusted.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Token counts as Claude Code reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    #[serde(default)]
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// What the token caps count: input + cache creation + output. Cache
    /// reads are kept apart (see `usage.rs`).
    pub fn fresh(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_input_tokens)
    }

    /// Every token: fresh ones and cache reads.
    pub fn total(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(self.cache_read_input_tokens)
    }

    fn add(&mut self, o: &Usage) {
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cache_creation_input_tokens += o.cache_creation_input_tokens;
        self.cache_read_input_tokens += o.cache_read_input_tokens;
    }

    /// Field by field, the larger: a message's usage only grows while it
    /// streams, and its final report repeats what came before.
    fn max(&mut self, o: &Usage) {
        self.input_tokens = self.input_tokens.max(o.input_tokens);
        self.output_tokens = self.output_tokens.max(o.output_tokens);
        self.cache_creation_input_tokens = self.cache_creation_input_tokens.max(o.cache_creation_input_tokens);
        self.cache_read_input_tokens = self.cache_read_input_tokens.max(o.cache_read_input_tokens);
    }

    /// The JSON shape used in audit events and job records (with the total).
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "fresh_tokens": self.fresh(),
            "total_tokens": self.total(),
        })
    }
}

/// A retry Claude Code announced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retry {
    pub attempt: u64,
    pub max_retries: u64,
    pub retry_delay_ms: u64,
    /// The HTTP status of the failed request (`null` when none came back,
    /// e.g. the connection failed).
    pub error_status: Option<u64>,
    pub error: Option<String>,
}

impl Retry {
    /// The API refused the credential: retrying cannot help.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self.error_status, Some(401 | 403))
            || self
                .error
                .as_deref()
                .is_some_and(|e| e.contains("authentication_error") || e.contains("permission_error"))
    }
}

/// Rate-limit state from a `rate_limit_event`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimit {
    /// `allowed`, `allowed_warning` or `rejected`.
    pub status: String,
    /// Unix seconds when the limit resets, if given.
    pub resets_at: Option<i64>,
    pub kind: Option<String>,
}

impl RateLimit {
    pub fn rejected(&self) -> bool {
        self.status == "rejected"
    }

    /// The reset time in local time, for messages.
    pub fn resets_at_text(&self) -> Option<String> {
        let t = chrono::DateTime::from_timestamp(self.resets_at?, 0)?;
        Some(t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M %Z").to_string())
    }
}

/// The final `result` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub is_error: bool,
    pub subtype: Option<String>,
    /// `completed`, `max_turns`, `budget_exhausted`, `api_error`,
    /// `aborted_streaming`, ...
    pub terminal_reason: Option<String>,
    pub duration_ms: Option<u64>,
    pub num_turns: Option<u64>,
    pub result: Option<String>,
    /// What ended a job that has no `result` text (`Reached maximum number
    /// of turns (2)`, `Reached maximum budget ($1)`).
    pub errors: Vec<String>,
    /// The HTTP status of the API error that ended the job.
    pub api_error_status: Option<u64>,
    pub total_cost_usd: Option<f64>,
    /// The usage of the whole job: the result's `usage`, or, where Claude
    /// Code leaves that at zero (a budget or an interrupt ended it), the
    /// sum of its per-model `modelUsage`.
    pub usage: Usage,
}

/// The sum over `modelUsage` (`{"model": {"inputTokens":..,"outputTokens":..,
/// "cacheReadInputTokens":..,"cacheCreationInputTokens":..}}`).
fn model_usage(v: &Value) -> Usage {
    let mut u = Usage::default();
    for m in v.as_object().into_iter().flat_map(|o| o.values()) {
        let n = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
        u.add(&Usage {
            input_tokens: n("inputTokens"),
            output_tokens: n("outputTokens"),
            cache_creation_input_tokens: n("cacheCreationInputTokens"),
            cache_read_input_tokens: n("cacheReadInputTokens"),
        });
    }
    u
}

/// What one line meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Init {
        model: Option<String>,
    },
    /// An assistant/user message; `tokens_so_far` is the running total.
    Message {
        error: Option<String>,
        tokens_so_far: u64,
        turns: u64,
    },
    Retry(Retry),
    RateLimit(RateLimit),
    /// A raw API event (`stream_event`, from `--include-partial-messages`);
    /// with the running totals when it carried usage.
    Partial(Option<PartialUsage>),
    Result(Outcome),
    /// Valid JSON we do not use.
    Other,
    /// Not a JSON object: kept in the job record and warned about.
    Invalid(String),
}

/// The running totals after a raw API event that carried usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialUsage {
    pub tokens_so_far: u64,
    pub turns: u64,
}

impl Event {
    /// Did the line come from `--include-partial-messages` (so a consumer
    /// of Claude Code's plain stream would not have seen it)?
    pub fn is_raw_api_event(&self) -> bool {
        matches!(self, Event::Partial(_))
    }
}

/// Accumulates state over the stream.
#[derive(Debug, Default)]
pub struct StreamState {
    per_message: HashMap<String, Usage>,
    /// The message each stream of raw API events is on, by
    /// `parent_tool_use_id` (a sub-agent streams beside its parent).
    streaming: HashMap<String, String>,
    anonymous: Usage,
    pub turns: u64,
    pub model: Option<String>,
    pub retries: Vec<Retry>,
    pub rate_limit: Option<RateLimit>,
    /// The last `error` field seen on a message (`authentication_failed`, ...).
    pub message_error: Option<String>,
    pub outcome: Option<Outcome>,
    pub invalid_lines: Vec<String>,
    pub invalid_count: u64,
}

/// Invalid lines kept in the record, and how much of each.
const KEEP_INVALID: usize = 20;
const INVALID_LINE_CHARS: usize = 300;

impl StreamState {
    /// Fresh tokens seen so far (what the per-task cap counts; the final
    /// result replaces this).
    pub fn tokens_so_far(&self) -> u64 {
        self.usage_so_far().fresh()
    }

    pub fn usage_so_far(&self) -> Usage {
        match &self.outcome {
            Some(o) => o.usage,
            None => self.streamed_usage(),
        }
    }

    /// What the messages of the stream add up to.
    fn streamed_usage(&self) -> Usage {
        let mut u = self.anonymous;
        for m in self.per_message.values() {
            u.add(m);
        }
        u
    }

    /// Feed one line (without its newline).
    pub fn feed(&mut self, line: &str) -> Event {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            return Event::Other;
        }
        let v: Value = match serde_json::from_str(line) {
            Ok(v @ Value::Object(_)) => v,
            _ => return self.invalid(line),
        };
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
        match (
            v.get("type").and_then(Value::as_str),
            v.get("subtype").and_then(Value::as_str),
        ) {
            (Some("system"), Some("init")) => {
                self.model = s(&v, "model");
                Event::Init {
                    model: self.model.clone(),
                }
            }
            (Some("system"), Some("api_retry")) => {
                let r = Retry {
                    attempt: n(&v, "attempt").unwrap_or(0),
                    max_retries: n(&v, "max_retries").unwrap_or(0),
                    retry_delay_ms: n(&v, "retry_delay_ms").unwrap_or(0),
                    error_status: n(&v, "error_status"),
                    error: s(&v, "error"),
                };
                self.retries.push(r.clone());
                Event::Retry(r)
            }
            (Some("rate_limit_event"), _) => {
                let info = v.get("rate_limit_info").cloned().unwrap_or(Value::Null);
                let r = RateLimit {
                    status: s(&info, "status").unwrap_or_else(|| "unknown".into()),
                    resets_at: info.get("resetsAt").and_then(Value::as_i64),
                    kind: s(&info, "rateLimitType"),
                };
                self.rate_limit = Some(r.clone());
                Event::RateLimit(r)
            }
            (Some("stream_event"), _) => self.stream_event(&v),
            (Some(kind @ ("assistant" | "user")), _) => {
                let msg = v.get("message").cloned().unwrap_or(Value::Null);
                if let Some(u) = msg
                    .get("usage")
                    .and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok())
                {
                    match s(&msg, "id") {
                        Some(id) => {
                            if !self.per_message.contains_key(&id) && kind == "assistant" {
                                self.turns += 1;
                            }
                            self.per_message.entry(id).or_default().max(&u);
                        }
                        None => self.anonymous.add(&u),
                    }
                }
                let error = s(&v, "error");
                if error.is_some() {
                    self.message_error = error.clone();
                }
                Event::Message {
                    error,
                    tokens_so_far: self.tokens_so_far(),
                    turns: self.turns,
                }
            }
            (Some("result"), _) => {
                let mut usage = v
                    .get("usage")
                    .and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok())
                    .unwrap_or_default();
                // Claude Code zeroes `usage` when a budget or an interrupt
                // ends the job; `modelUsage` still has what was spent.
                usage.max(&model_usage(v.get("modelUsage").unwrap_or(&Value::Null)));
                // Never less than what the stream already showed.
                usage.max(&self.streamed_usage());
                let o = Outcome {
                    // A result without `is_error` is not proof of success.
                    is_error: v.get("is_error").and_then(Value::as_bool).unwrap_or(true),
                    subtype: s(&v, "subtype"),
                    terminal_reason: s(&v, "terminal_reason"),
                    duration_ms: n(&v, "duration_ms"),
                    num_turns: n(&v, "num_turns"),
                    result: s(&v, "result"),
                    errors: v
                        .get("errors")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_string)).collect())
                        .unwrap_or_default(),
                    api_error_status: n(&v, "api_error_status"),
                    total_cost_usd: v.get("total_cost_usd").and_then(Value::as_f64),
                    usage,
                };
                self.outcome = Some(o.clone());
                Event::Result(o)
            }
            _ => Event::Other,
        }
    }

    /// A raw API event (`--include-partial-messages`): only its usage
    /// matters here; everything else is already in the `assistant` lines.
    fn stream_event(&mut self, v: &Value) -> Event {
        let event = v.get("event").unwrap_or(&Value::Null);
        let stream = v
            .get("parent_tool_use_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let usage_of = |u: Option<&Value>| u.and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok());
        let (id, usage) = match event.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let msg = event.get("message").unwrap_or(&Value::Null);
                let id = msg
                    .get("id")
                    .and_then(Value::as_str)
                    .or_else(|| v.get("api_message_id").and_then(Value::as_str))
                    .map(str::to_string);
                if let Some(id) = &id {
                    self.streaming.insert(stream.clone(), id.clone());
                }
                (id, usage_of(msg.get("usage")))
            }
            Some("message_delta") => (
                v.get("api_message_id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| self.streaming.get(&stream).cloned()),
                usage_of(event.get("usage")),
            ),
            _ => return Event::Partial(None),
        };
        let (Some(id), Some(u)) = (id, usage) else {
            return Event::Partial(None);
        };
        if !self.per_message.contains_key(&id) {
            self.turns += 1;
        }
        self.per_message.entry(id).or_default().max(&u);
        Event::Partial(Some(PartialUsage {
            tokens_so_far: self.tokens_so_far(),
            turns: self.turns,
        }))
    }

    fn invalid(&mut self, line: &str) -> Event {
        self.invalid_count += 1;
        let kept: String = line.chars().take(INVALID_LINE_CHARS).collect();
        if self.invalid_lines.len() < KEEP_INVALID {
            self.invalid_lines.push(kept.clone());
        }
        Event::Invalid(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_once_per_message_and_result_wins() {
        let mut s = StreamState::default();
        let a = r#"{"type":"assistant","message":{"id":"m1","usage":{"input_tokens":4,"output_tokens":10,"cache_creation_input_tokens":100,"cache_read_input_tokens":20}}}"#;
        s.feed(a);
        s.feed(a);
        assert_eq!(s.tokens_so_far(), 114, "cache reads are not fresh tokens");
        assert_eq!(s.usage_so_far().total(), 134);
        assert_eq!(s.turns, 1);
        let r = r#"{"type":"result","subtype":"success","is_error":false,"num_turns":1,"result":"hi","total_cost_usd":0.01,"usage":{"input_tokens":4,"output_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":20}}"#;
        match s.feed(r) {
            Event::Result(o) => {
                assert!(!o.is_error);
                assert_eq!(o.usage.total(), 136);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(s.tokens_so_far(), 116);
    }

    #[test]
    fn raw_api_events_count_usage_before_the_message_is_complete() {
        let mut s = StreamState::default();
        s.feed(r#"{"type":"stream_event","event":{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":4,"cache_creation_input_tokens":12000,"cache_read_input_tokens":9000,"output_tokens":1}}},"parent_tool_use_id":null,"api_message_id":"msg_1"}"#);
        assert_eq!(s.usage_so_far().total(), 21005, "counted while the answer streams");
        assert_eq!(s.turns, 1);
        s.feed(r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}},"parent_tool_use_id":null}"#);
        s.feed(r#"{"type":"stream_event","event":{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":60}},"parent_tool_use_id":null}"#);
        assert_eq!(s.usage_so_far().output_tokens, 60);
        // The complete message repeats the same usage: not counted twice.
        s.feed(r#"{"type":"assistant","message":{"id":"msg_1","usage":{"input_tokens":4,"cache_creation_input_tokens":12000,"cache_read_input_tokens":9000,"output_tokens":60}}}"#);
        assert_eq!(s.usage_so_far().total(), 21064);
        assert_eq!(s.usage_so_far().fresh(), 12064);
        assert_eq!(s.turns, 1);
    }

    #[test]
    fn a_budget_ending_zeroes_usage_but_model_usage_keeps_it() {
        let mut s = StreamState::default();
        s.feed(r#"{"type":"result","subtype":"error_max_budget_usd","is_error":true,"terminal_reason":"budget_exhausted","errors":["Reached maximum budget ($1)"],"total_cost_usd":8.02,"usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0},"modelUsage":{"claude-opus-5-5":{"inputTokens":2000000,"outputTokens":60,"cacheReadInputTokens":9000,"cacheCreationInputTokens":12000,"costUSD":8.02}}}"#);
        let o = s.outcome.clone().unwrap();
        assert_eq!(o.usage.input_tokens, 2_000_000);
        assert_eq!(o.usage.fresh(), 2_012_060);
        assert_eq!(o.errors, vec!["Reached maximum budget ($1)".to_string()]);
        assert_eq!(o.terminal_reason.as_deref(), Some("budget_exhausted"));
    }

    #[test]
    fn a_refused_credential_is_told_from_other_retries() {
        let mut s = StreamState::default();
        let auth = |status: &str, error: &str| {
            format!(
                r#"{{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":500,"error_status":{status},"error":"{error}"}}"#
            )
        };
        match s.feed(&auth("401", "authentication_failed")) {
            Event::Retry(r) => assert!(r.is_auth_failure()),
            e => panic!("{e:?}"),
        }
        match s.feed(&auth("529", "overloaded_error")) {
            Event::Retry(r) => assert!(!r.is_auth_failure()),
            e => panic!("{e:?}"),
        }
        match s.feed(&auth("null", "unknown")) {
            Event::Retry(r) => assert!(!r.is_auth_failure() && r.error_status.is_none()),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn failed_login_is_an_error_despite_success_subtype() {
        let mut s = StreamState::default();
        s.feed(r#"{"type":"assistant","message":{"id":"x","usage":{"input_tokens":0,"output_tokens":0}},"error":"authentication_failed"}"#);
        assert_eq!(s.message_error.as_deref(), Some("authentication_failed"));
        match s.feed(r#"{"type":"result","subtype":"success","is_error":true,"result":"Invalid API key"}"#) {
            Event::Result(o) => assert!(o.is_error),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn unknown_events_and_fields_are_ignored_and_garbage_is_kept() {
        let mut s = StreamState::default();
        assert_eq!(s.feed(r#"{"type":"brand_new","x":1}"#), Event::Other);
        assert!(matches!(s.feed("not json"), Event::Invalid(_)));
        assert!(matches!(s.feed("[1,2]"), Event::Invalid(_)));
        assert_eq!(s.invalid_lines, vec!["not json".to_string(), "[1,2]".to_string()]);
        match s.feed(r#"{"type":"system","subtype":"api_retry","attempt":2,"max_retries":10,"retry_delay_ms":5,"error":"overloaded_error","new":true}"#) {
            Event::Retry(r) => assert_eq!((r.attempt, r.max_retries), (2, 10)),
            e => panic!("{e:?}"),
        }
        match s.feed(r#"{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1700000000,"rateLimitType":"five_hour"}}"#) {
            Event::RateLimit(r) => {
                assert!(r.rejected());
                assert!(r.resets_at_text().is_some());
            }
            e => panic!("{e:?}"),
        }
    }
}
