//! One JSON config: schema, defaults, validation, env overrides, atomic save.
//!
//! [`SCHEMA`] is the single source of truth for every user-settable key: its
//! type, default, range and help. Defaults, `config --list`, env overrides
//! (`CMM_<SECTION>_<KEY>`), validation and the README table all derive from
//! it. The file keeps the seed's camelCase sections so existing configs load.
//!
//! The `consent` section lives in the same file but is written only by
//! `opt-in` / `opt-out`, never by `config --set`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::exit::{Exit, HasExit};
use crate::fsutil::{self, FileLock};
use crate::paths::Paths;

mod settings;
pub use settings::{Limits, Market, Settings};

/// The type of a config value; drives parsing and validation.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Bool,
    /// Integer within an inclusive range.
    Int {
        min: i64,
        max: i64,
    },
    /// Integer within a range, or `null` meaning "no cap".
    OptInt {
        min: i64,
        max: i64,
    },
    Str,
    /// Optional string (`null` when unset).
    OptStr,
    /// Docker-style byte size: `512m`, `1g`, `262144k`, plain bytes; from
    /// 6m to `max` bytes.
    Size {
        max: u64,
    },
    /// One of a fixed set of words.
    Enum(&'static [&'static str]),
    /// One of a fixed set of words, or `null` (the per-job default).
    OptEnum(&'static [&'static str]),
    /// An amount of US dollars from 0 to `max` (`5`, `0.25`, `$2.50`).
    Usd {
        max: f64,
    },
    /// An amount of US dollars, or `null` meaning "no cap".
    OptUsd {
        max: f64,
    },
    /// A number from 0 to 1 (a score).
    Fraction,
    /// A comma-separated list (`null` when unset), each item checked.
    OptList(ListItem),
    /// Market coordinator replicas: a `ws://` / `wss://` URL, or a
    /// comma-separated list of them tried in order.
    Endpoints,
}

/// What the items of an [`Kind::OptList`] must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListItem {
    /// A model name: 1..=64 of `[A-Za-z0-9-_.:/]` (what the market accepts).
    Model,
    /// A node id: 64 lowercase hex digits.
    NodeId,
    /// One of Claude Code's permission modes ([`PERMISSION_MODES`]).
    PermissionMode,
}

impl ListItem {
    fn check(self, item: &str) -> Result<(), String> {
        let ok = match self {
            ListItem::Model => {
                !item.is_empty()
                    && item.len() <= 64
                    && item.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
            }
            ListItem::NodeId => {
                item.len() == 64 && item.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            }
            ListItem::PermissionMode => PERMISSION_MODES.contains(&item),
        };
        if ok {
            Ok(())
        } else {
            Err(match self {
                ListItem::Model => format!("`{item}` is not a model name (1 to 64 of A-Z a-z 0-9 - _ . : /)"),
                ListItem::NodeId => format!("`{item}` is not a node id (64 lowercase hex digits)"),
                ListItem::PermissionMode => format!(
                    "`{item}` is not a permission mode (one of: {})",
                    PERMISSION_MODES.join(", ")
                ),
            })
        }
    }
}

/// One user-settable key.
#[derive(Debug)]
pub struct KeyDef {
    pub key: &'static str,
    pub kind: Kind,
    /// Default as JSON text (parsed on use; the table stays `const`).
    pub default: &'static str,
    pub help: &'static str,
}

macro_rules! key {
    ($k:literal, $kind:expr, $def:literal, $help:literal) => {
        KeyDef {
            key: $k,
            kind: $kind,
            default: $def,
            help: $help,
        }
    };
}

const MS_DAY: i64 = 86_400_000;

/// Claude Code's permission modes a job may run in (`--permission-mode`).
pub const PERMISSION_MODES: &[&str] = &["default", "acceptEdits", "plan", "bypassPermissions", "dontAsk"];

/// Every key, in display order.
pub const SCHEMA: &[KeyDef] = &[
    key!(
        "docker.image",
        Kind::Str,
        r#""synaptic-mesh/claude-max:latest""#,
        "Image that runs Claude Code jobs"
    ),
    key!(
        "docker.memory",
        Kind::Size { max: MAX_SIZE },
        r#""1g""#,
        "Memory limit per job container (memory-swap is set equal); Claude Code itself peaks near 220 MiB, and a workspace's tmpfs counts here too"
    ),
    key!(
        "docker.cpuShares",
        Kind::Int { min: 2, max: 262_144 },
        "512",
        "Relative CPU weight per job container"
    ),
    key!(
        "docker.timeout",
        Kind::Int {
            min: 1_000,
            max: MS_DAY
        },
        "300000",
        "Job timeout in milliseconds"
    ),
    key!(
        "docker.model",
        Kind::Str,
        r#""sonnet""#,
        "Default Claude Code model alias or id for jobs"
    ),
    key!(
        "docker.network",
        Kind::Str,
        r#""bridge""#,
        "Docker network mode for job containers when `docker.egress` is `open`"
    ),
    key!(
        "docker.egress",
        Kind::Enum(&["restricted", "open"]),
        r#""restricted""#,
        "`restricted`: job containers reach only the Claude API, through the egress proxy; `open`: `docker.network` as is (compliance WARNING)"
    ),
    key!(
        "docker.workspaceLimit",
        Kind::Size { max: MAX_SIZE },
        r#""100m""#,
        "Largest workspace `execute --workspace` copies into a job (after .gitignore excludes); also the job's writable workspace size"
    ),
    key!(
        "docker.permissionMode",
        Kind::OptEnum(PERMISSION_MODES),
        "null",
        "Claude Code permission mode for jobs (null: acceptEdits with a workspace, default without)"
    ),
    key!(
        "docker.claudeBinary",
        Kind::OptStr,
        "null",
        "Native Claude Code binary to build the default image from when it is missing and cannot be pulled (null: the native `claude` on PATH, else the embedded Dockerfile)"
    ),
    key!(
        "security.enableEncryption",
        Kind::Bool,
        "true",
        "Encrypt market payloads and results end to end"
    ),
    key!(
        "security.keyRotationDays",
        Kind::Int { min: 1, max: 3650 },
        "30",
        "Days before node keys should be rotated; old keys decrypt this long after"
    ),
    key!(
        "security.maxSessionAge",
        Kind::Int {
            min: 60_000,
            max: 30 * MS_DAY
        },
        "3600000",
        "Longest market session in milliseconds before re-authentication"
    ),
    key!(
        "limits.dailyTasks",
        Kind::Int { min: 0, max: 1_000_000 },
        "25",
        "Jobs per local calendar day"
    ),
    key!(
        "limits.dailyTokens",
        Kind::Int {
            min: 0,
            max: 1_000_000_000_000
        },
        "5000000",
        "Fresh tokens (input + cache creation + output; cache reads apart) per local calendar day"
    ),
    key!(
        "limits.weeklyTasks",
        Kind::OptInt { min: 0, max: 1_000_000 },
        "null",
        "Jobs per ISO week (null: no weekly cap)"
    ),
    key!(
        "limits.weeklyTokens",
        Kind::OptInt {
            min: 0,
            max: 1_000_000_000_000
        },
        "null",
        "Fresh tokens per ISO week (null: no weekly cap)"
    ),
    key!(
        "limits.monthlyTasks",
        Kind::OptInt { min: 0, max: 1_000_000 },
        "null",
        "Jobs per calendar month (null: no monthly cap)"
    ),
    key!(
        "limits.monthlyTokens",
        Kind::OptInt {
            min: 0,
            max: 1_000_000_000_000
        },
        "null",
        "Fresh tokens per calendar month (null: no monthly cap)"
    ),
    key!(
        "limits.maxTokensPerTask",
        Kind::Int {
            min: 1,
            max: 100_000_000
        },
        "500000",
        "Fresh-token cap for one job; reserved up front against the token caps; the job is stopped past it"
    ),
    key!(
        "limits.maxTurnsPerTask",
        Kind::Int { min: 1, max: 10_000 },
        "100",
        "Turns one job may take (passed to Claude Code as --max-turns)"
    ),
    key!(
        "limits.maxCostPerTask",
        Kind::OptUsd { max: 100_000.0 },
        "5.0",
        "Cost cap for one job in USD (passed to Claude Code as --max-budget-usd; reserved up front against the cost caps; null: none)"
    ),
    key!(
        "limits.dailyCostUsd",
        Kind::OptUsd { max: 1_000_000.0 },
        "25.0",
        "USD per local calendar day, from the cost Claude Code reports (null: no daily cost cap)"
    ),
    key!(
        "limits.weeklyCostUsd",
        Kind::OptUsd { max: 1_000_000.0 },
        "null",
        "USD per ISO week (null: no weekly cost cap)"
    ),
    key!(
        "limits.monthlyCostUsd",
        Kind::OptUsd { max: 1_000_000.0 },
        "null",
        "USD per calendar month (null: no monthly cost cap)"
    ),
    key!(
        "limits.concurrentJobs",
        Kind::Int { min: 1, max: 64 },
        "1",
        "Jobs that may run at the same time"
    ),
    key!(
        "market.db",
        Kind::OptStr,
        "null",
        "Coordinator store for `market serve`, `market ledger` and `market grant`: a SQLite file, or postgres://USER@HOST:PORT/DB shared by replicas (null: market.db in the data dir; put a password in CMM_MARKET_DB, not the file)"
    ),
    key!(
        "market.endpoint",
        Kind::Endpoints,
        r#""ws://127.0.0.1:7700""#,
        "Market coordinator WebSocket URL, or replicas of one market as a comma-separated list tried in order"
    ),
    key!(
        "market.defaultPrice",
        Kind::Int { min: 0, max: 1_000_000 },
        "5",
        "Default asking price per task in RUV"
    ),
    key!(
        "market.maxBidPrice",
        Kind::Int { min: 0, max: 1_000_000 },
        "100",
        "Highest price this node will bid for a task in RUV"
    ),
    key!(
        "market.bidTimeout",
        Kind::Int {
            min: 1_000,
            max: MS_DAY
        },
        "300000",
        "How long a posted task waits for a provider, in milliseconds"
    ),
    key!(
        "market.autoAcceptBids",
        Kind::Bool,
        "false",
        "Accept matching market tasks without asking"
    ),
    key!(
        "market.minPrice",
        Kind::Int { min: 0, max: 1_000_000 },
        "0",
        "Standing rule: accept only market tasks bidding at least this many RUV"
    ),
    key!(
        "market.allowedModels",
        Kind::OptList(ListItem::Model),
        "null",
        "Standing rule: models this node runs for the market, comma-separated (null: any advertised)"
    ),
    key!(
        "market.allowedRequesters",
        Kind::OptList(ListItem::NodeId),
        "null",
        "Standing rule: requester node ids whose tasks may be accepted, comma-separated (null: anyone)"
    ),
    key!(
        "market.maxWorkspaceBytes",
        Kind::Size { max: MAX_SIZE },
        r#""50m""#,
        "Standing rule: the largest workspace a market task may bring to this node; bigger ones are declined before anything is downloaded"
    ),
    key!(
        "market.permissionModes",
        Kind::OptList(ListItem::PermissionMode),
        r#""acceptEdits""#,
        "Standing rule: permission modes other people's tasks may run in here, comma-separated (null: acceptEdits only; bypassPermissions only if listed)"
    ),
    key!(
        "market.minRequesterReputation",
        Kind::Fraction,
        "0",
        "Standing rule: decline tasks from requesters whose standing (how they judged results, 0 to 1; new ones stand at 0.5) is below this"
    ),
    key!(
        "market.ownNodes",
        Kind::OptList(ListItem::NodeId),
        "null",
        "Node ids of your own other nodes, comma-separated: with a subscription login, advertise serves only these"
    ),
    key!(
        "compliance.requireApproval",
        Kind::Bool,
        "true",
        "Ask before every job unless approved for that job"
    ),
    key!(
        "compliance.logAllActivity",
        Kind::Bool,
        "true",
        "Record every state change in the audit log"
    ),
    key!(
        "compliance.enableAuditTrail",
        Kind::Bool,
        "true",
        "Keep the hash-chained audit log"
    ),
    key!(
        "compliance.checkInterval",
        Kind::Int {
            min: 60_000,
            max: 30 * MS_DAY
        },
        "3600000",
        "How often scheduled compliance checks run, in milliseconds"
    ),
    key!(
        "credentials.source",
        Kind::Enum(&["auto", "oauth-env", "api-key-env", "command", "file"]),
        r#""auto""#,
        "Where the Claude credential is read at run time (never stored)"
    ),
    key!(
        "credentials.tokenCommand",
        Kind::OptStr,
        "null",
        "Command whose stdout is the credential (source=command or auto)"
    ),
    key!(
        "credentials.tokenFile",
        Kind::OptStr,
        "null",
        "File (mode 0600) holding the credential (source=file or auto)"
    ),
];

/// Sections the file may contain that are not user-settable keys.
const RECORD_SECTIONS: &[&str] = &["consent"];

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File,
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File => f.write_str("file"),
            Origin::Env(var) => write!(f, "env {var}"),
        }
    }
}

/// Config errors. All are usage errors (exit 2): the user's input is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}:{line}:{column}: config is not valid JSON: {msg}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },
    #[error("{path}: config must be a JSON object with sections like \"docker\" and \"limits\"")]
    NotObject { path: PathBuf },
    #[error("unknown config key `{key}`")]
    UnknownKey { key: String, suggestion: Option<String> },
    #[error("`{key}` is managed by `{command}` and cannot be set with `config`")]
    ReadOnly { key: String, command: &'static str },
    #[error("invalid value for `{key}`{origin}: {reason}")]
    Invalid {
        key: String,
        origin: String,
        reason: String,
    },
    #[error("expected KEY=VALUE, got `{0}`")]
    NotAssignment(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: it is larger than the limit of {} for a config file", fsutil::human_bytes(*limit))]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl HasExit for ConfigError {
    fn exit(&self) -> Exit {
        match self {
            ConfigError::Read { .. } | ConfigError::Write { .. } => Exit::Failed,
            _ => Exit::Usage,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            ConfigError::Corrupt { path, .. } | ConfigError::NotObject { path } => Some(format!(
                "fix the file by hand or move it aside (it was left untouched): `mv {} {}.bad`",
                path.display(),
                path.display()
            )),
            ConfigError::UnknownKey { suggestion, .. } => Some(match suggestion {
                Some(s) => format!("did you mean `{s}`? `claude-max-market config --list` shows every key"),
                None => "`claude-max-market config --list` shows every key".into(),
            }),
            ConfigError::ReadOnly { command, .. } => Some(format!("use `claude-max-market {command}`")),
            ConfigError::Invalid { key, .. } => def(key).map(|d| format!("`{key}` takes {}", kind_help(d.kind))),
            ConfigError::NotAssignment(_) => Some("for example: `config --set limits.dailyTasks=10`".into()),
            ConfigError::TooLarge { .. } => {
                Some("a config file is a small JSON object: pass the file `config --export` wrote".into())
            }
            _ => None,
        }
    }
}

/// Look up a key's definition.
pub fn def(key: &str) -> Option<&'static KeyDef> {
    SCHEMA.iter().find(|d| d.key == key)
}

/// The key definition, or an `UnknownKey` error with the nearest suggestion.
pub fn def_or_suggest(key: &str) -> Result<&'static KeyDef, ConfigError> {
    if let Some(d) = def(key) {
        return Ok(d);
    }
    if RECORD_SECTIONS
        .iter()
        .any(|s| key == *s || key.starts_with(&format!("{s}.")))
    {
        return Err(ConfigError::ReadOnly {
            key: key.to_string(),
            command: "opt-in` / `opt-out",
        });
    }
    let lower = key.to_ascii_lowercase();
    let best = SCHEMA
        .iter()
        .map(|d| (strsim::jaro_winkler(&lower, &d.key.to_ascii_lowercase()), d.key))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .filter(|(score, _)| *score > 0.7)
        .map(|(_, k)| k.to_string());
    Err(ConfigError::UnknownKey {
        key: key.to_string(),
        suggestion: best,
    })
}

/// Human description of what a kind accepts.
pub fn kind_help(kind: Kind) -> String {
    match kind {
        Kind::Bool => "`true` or `false`".into(),
        Kind::Int { min, max } => format!("a whole number from {min} to {max}"),
        Kind::OptInt { min, max } => format!("a whole number from {min} to {max}, or `none` for no cap"),
        Kind::Str => "text".into(),
        Kind::OptStr => "text, or `none` to clear".into(),
        Kind::Size { max } => format!(
            "a size such as `512m`, `1g` or `262144k`, from 6m to {}",
            size_text(max)
        ),
        Kind::Enum(words) => format!("one of: {}", words.join(", ")),
        Kind::OptEnum(words) => format!("one of: {}, or `none` for the default", words.join(", ")),
        Kind::Usd { max } => format!("an amount of US dollars from 0 to {max} (e.g. `5` or `0.25`)"),
        Kind::OptUsd { max } => {
            format!("an amount of US dollars from 0 to {max} (e.g. `5` or `0.25`), or `none` for no cap")
        }
        Kind::OptList(ListItem::Model) => "comma-separated model names, or `none` to clear".into(),
        Kind::OptList(ListItem::NodeId) => "comma-separated node ids (64 hex digits), or `none` to clear".into(),
        Kind::OptList(ListItem::PermissionMode) => format!(
            "comma-separated permission modes ({}), or `none` for the default",
            PERMISSION_MODES.join(", ")
        ),
        Kind::Fraction => "a number from 0 to 1 (e.g. `0.4`)".into(),
        Kind::Endpoints => "a ws:// or wss:// URL, or a comma-separated list of them tried in order".into(),
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Bool => "bool",
        Kind::Int { .. } => "int",
        Kind::OptInt { .. } => "int|null",
        Kind::Str => "string",
        Kind::OptStr => "string|null",
        Kind::Size { .. } => "size",
        Kind::Enum(_) => "enum",
        Kind::OptEnum(_) => "enum|null",
        Kind::Usd { .. } => "usd",
        Kind::OptUsd { .. } => "usd|null",
        Kind::Fraction => "number",
        Kind::OptList(_) => "list|null",
        Kind::Endpoints => "string",
    }
}

/// Parse user text (from `--set` or an env var) by the key's type.
pub fn parse_text(d: &KeyDef, text: &str) -> Result<Value, String> {
    let t = text.trim();
    match d.kind {
        Kind::Bool => match t.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(Value::Bool(true)),
            "false" | "no" | "off" | "0" => Ok(Value::Bool(false)),
            _ => Err(format!("`{t}` is not a boolean")),
        },
        Kind::Int { .. } | Kind::OptInt { .. } => {
            if matches!(d.kind, Kind::OptInt { .. }) && matches!(t, "none" | "null" | "") {
                return Ok(Value::Null);
            }
            let digits = t.replace('_', "");
            match digits.parse::<i64>() {
                Ok(n) => check(d, &Value::from(n)),
                Err(_) => {
                    let (Kind::Int { min, max } | Kind::OptInt { min, max }) = d.kind else {
                        unreachable!("matched above")
                    };
                    let body = digits.strip_prefix('-').unwrap_or(&digits);
                    if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
                        Err(format!("`{t}` is out of range ({min} to {max})"))
                    } else {
                        Err(format!("`{t}` is not a whole number"))
                    }
                }
            }
        }
        Kind::OptStr | Kind::OptList(_) | Kind::OptEnum(_) | Kind::OptUsd { .. }
            if matches!(t, "none" | "null" | "") =>
        {
            Ok(Value::Null)
        }
        Kind::Usd { max } | Kind::OptUsd { max } => {
            let n = parse_usd(t).map_err(|e| {
                // Digits too many for a float: say the range, not "not an amount".
                let plain = t.strip_prefix('$').unwrap_or(t).replace('_', "");
                if !plain.is_empty() && plain.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                    format!("`{t}` is out of range (0 to {max} US dollars)")
                } else {
                    e
                }
            })?;
            check(
                d,
                &serde_json::Number::from_f64(n)
                    .map(Value::Number)
                    .unwrap_or(Value::Null),
            )
        }
        Kind::Fraction => match t.parse::<f64>() {
            Ok(x) => check(
                d,
                &serde_json::Number::from_f64(x)
                    .map(Value::Number)
                    .unwrap_or(Value::Null),
            ),
            Err(_) => Err(format!("`{t}` is not a number from 0 to 1")),
        },
        Kind::OptList(_) | Kind::Endpoints => check(d, &Value::String(t.to_string())),
        Kind::Str | Kind::OptStr | Kind::Size { .. } | Kind::Enum(_) | Kind::OptEnum(_) => {
            check(d, &Value::String(t.to_string()))
        }
    }
}

/// Validate a JSON value against the key's type; returns the normalised value.
pub fn check(d: &KeyDef, v: &Value) -> Result<Value, String> {
    match (d.kind, v) {
        (Kind::Bool, Value::Bool(_)) => Ok(v.clone()),
        (Kind::Int { min, max }, Value::Number(n)) | (Kind::OptInt { min, max }, Value::Number(n)) => {
            let n = match n.as_i64() {
                Some(n) => n,
                None if n.is_u64() => return Err(format!("{n} is out of range ({min} to {max})")),
                None => return Err(format!("`{n}` is not a whole number")),
            };
            if n < min || n > max {
                Err(format!("{n} is out of range ({min} to {max})"))
            } else {
                Ok(Value::from(n))
            }
        }
        (
            Kind::OptInt { .. } | Kind::OptStr | Kind::OptList(_) | Kind::OptEnum(_) | Kind::OptUsd { .. },
            Value::Null,
        ) => Ok(Value::Null),
        (Kind::Usd { max } | Kind::OptUsd { max }, Value::Number(n)) => {
            let x = n
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("`{n}` is not an amount"))?;
            if !(0.0..=max).contains(&x) {
                return Err(format!("{x} is out of range (0 to {max} US dollars)"));
            }
            // Whole micro-dollars: what the caps ledger counts in.
            let micros = (x * 1e6).round() / 1e6;
            serde_json::Number::from_f64(micros)
                .map(Value::Number)
                .ok_or_else(|| format!("`{n}` is not an amount"))
        }
        (Kind::Fraction, Value::Number(n)) => match n.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => Ok(v.clone()),
            _ => Err(format!("{n} is out of range (0 to 1)")),
        },
        (Kind::OptList(item), Value::String(s)) => {
            let items: Vec<&str> = s.split(',').map(str::trim).filter(|x| !x.is_empty()).collect();
            if items.is_empty() {
                return Err("list an item, or use `none` to clear".into());
            }
            for i in &items {
                item.check(i)?;
            }
            Ok(Value::String(items.join(",")))
        }
        (Kind::Endpoints, Value::String(s)) => crate::market::client::Endpoints::parse(s)
            .map(|e| Value::String(e.to_string()))
            .map_err(|e| e.to_string()),
        (Kind::Str, Value::String(s)) | (Kind::OptStr, Value::String(s)) => {
            if s.is_empty() && matches!(d.kind, Kind::Str) {
                Err("must not be empty".into())
            } else {
                Ok(v.clone())
            }
        }
        (Kind::Size { max }, Value::String(s)) => parse_size_in(s, max).map(|_| Value::String(s.to_ascii_lowercase())),
        (Kind::Size { max }, Value::Number(n)) => match n.as_u64() {
            Some(b) if (MIN_MEMORY..=max).contains(&b) => Ok(v.clone()),
            _ => Err(format!(
                "{n} bytes is out of range (6m to {}, that is {MIN_MEMORY} to {max} bytes)",
                size_text(max)
            )),
        },
        (Kind::Enum(words) | Kind::OptEnum(words), Value::String(s)) => {
            if words.contains(&s.as_str()) {
                Ok(v.clone())
            } else {
                Err(format!("`{s}` is not one of {}", words.join(", ")))
            }
        }
        (kind, other) => Err(format!("expected {}, found {}", kind_name(kind), json_type(other))),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Docker refuses memory limits below 6 MiB.
const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// The largest size a key takes: 1 TiB (`1024g`). Docker reads sizes as
/// signed 64-bit byte counts; this keeps every size far inside that, and
/// above any machine a job runs on.
pub const MAX_SIZE: u64 = 1 << 40;

/// A size in the unit it is a whole number of: `1024g`, `6m`, `1536k`.
fn size_text(bytes: u64) -> String {
    for (shift, unit) in [(30, 'g'), (20, 'm'), (10, 'k')] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parse a Docker-style size (`512m`, `1g`, `100k`, `1048576`) into bytes,
/// from 6m to [`MAX_SIZE`].
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size_in(s, MAX_SIZE)
}

/// [`parse_size`] with the key's own upper bound.
fn parse_size_in(s: &str, max: u64) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{s}` is not a size like 512m or 1g"));
    }
    let range = || format!("6m to {}", size_text(max));
    // Digits only: a parse failure means it does not fit in 64 bits.
    let bytes = num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult));
    match bytes {
        Some(b) if (MIN_MEMORY..=max).contains(&b) => Ok(b),
        Some(b) if b < MIN_MEMORY => Err(format!("`{s}` is below the minimum of 6m (the range is {})", range())),
        _ => Err(format!("`{s}` is too large (the range is {})", range())),
    }
}

/// Parse an amount of US dollars (`5`, `0.25`, `$2.50`, `1_000`).
pub fn parse_usd(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let t = t.strip_prefix('$').unwrap_or(t).replace('_', "");
    let ok = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') && t.matches('.').count() <= 1;
    match t.parse::<f64>() {
        Ok(x) if ok && x.is_finite() => Ok(x),
        _ => Err(format!("`{text}` is not an amount of US dollars such as 5 or 0.25")),
    }
}

/// The env var that overrides `key`: `limits.dailyTasks` -> `CMM_LIMITS_DAILYTASKS`.
pub fn env_var(key: &str) -> String {
    format!("CMM_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// The loaded config: the file's JSON plus resolved values with origins.
#[derive(Debug, Clone)]
pub struct Config {
    path: PathBuf,
    /// The file as read (or an empty object when absent).
    file: Map<String, Value>,
    /// Effective value and origin per schema key.
    values: BTreeMap<&'static str, (Value, Origin)>,
    /// Every key's effective value, typed.
    settings: Settings,
    /// Keys present in the file that the schema does not know.
    pub unknown: Vec<String>,
}

impl Config {
    /// Load `config.json` (absent = all defaults) and apply env overrides.
    pub fn load(paths: &Paths) -> Result<Config, ConfigError> {
        let path = paths.config_file();
        let file = read_file(&path)?;
        Config::resolve(path, file)
    }

    /// The config an edited file object would load as (env applied), for
    /// recording effective values before the file is written.
    pub fn from_file_object(paths: &Paths, file: Map<String, Value>) -> Result<Config, ConfigError> {
        Config::resolve(paths.config_file(), file)
    }

    fn resolve(path: PathBuf, file: Map<String, Value>) -> Result<Config, ConfigError> {
        let mut values = BTreeMap::new();
        for d in SCHEMA {
            let (value, origin) = if let Some(text) = std::env::var_os(env_var(d.key)) {
                let var = env_var(d.key);
                let text = text.to_string_lossy();
                let v = parse_text(d, &text).map_err(|reason| ConfigError::Invalid {
                    key: d.key.into(),
                    origin: format!(" (from env {var})"),
                    reason,
                })?;
                (v, Origin::Env(var))
            } else if let Some(v) = lookup(&file, d.key) {
                let v = check(d, v).map_err(|reason| ConfigError::Invalid {
                    key: d.key.into(),
                    origin: format!(" in {}", path.display()),
                    reason,
                })?;
                (v, Origin::File)
            } else {
                (default_of(d), Origin::Default)
            };
            values.insert(d.key, (value, origin));
        }
        let mut unknown = Vec::new();
        for (section, body) in &file {
            if RECORD_SECTIONS.contains(&section.as_str()) {
                continue;
            }
            match body {
                Value::Object(m) => {
                    for k in m.keys() {
                        let full = format!("{section}.{k}");
                        if def(&full).is_none() {
                            unknown.push(full);
                        }
                    }
                }
                _ => unknown.push(section.clone()),
            }
        }
        let settings = Settings::resolve(&|key| &values[key].0)?;
        Ok(Config {
            path,
            file,
            values,
            settings,
            unknown,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every key's effective value, typed: how the program reads its config.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Effective value of a schema key (as `config --get` shows it). Code
    /// reads [`Config::settings`] instead.
    pub fn get(&self, d: &KeyDef) -> &Value {
        &self.values[d.key].0
    }

    /// Where a key's effective value came from.
    pub fn origin(&self, d: &KeyDef) -> &Origin {
        &self.values[d.key].1
    }

    /// A record section (e.g. `consent`) as stored in the file.
    pub fn record(&self, section: &str) -> Option<&Value> {
        self.file.get(section)
    }

    /// All effective values, in schema order: (def, value, origin).
    pub fn entries(&self) -> impl Iterator<Item = (&'static KeyDef, &Value, &Origin)> {
        SCHEMA.iter().map(move |d| {
            let (v, o) = &self.values[d.key];
            (d, v, o)
        })
    }

    /// The effective config as nested JSON (sections of camelCase keys).
    pub fn to_nested(&self) -> Value {
        let mut root = Map::new();
        for (d, v, _) in self.entries() {
            let (section, key) = d.key.split_once('.').expect("schema keys are section.key");
            root.entry(section)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("sections are objects")
                .insert(key.to_string(), v.clone());
        }
        Value::Object(root)
    }
}

fn default_of(d: &KeyDef) -> Value {
    // The defaults are literals in SCHEMA; a test parses every one of them.
    serde_json::from_str(d.default).expect("SCHEMA default is valid JSON")
}

/// Default value of a key.
pub fn default_value(key: &str) -> Option<Value> {
    def(key).map(default_of)
}

fn lookup<'a>(file: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    let (section, k) = key.split_once('.')?;
    file.get(section)?.as_object()?.get(k)
}

/// The largest config file read (`config.json`, `config --import`): 1 MiB,
/// a thousand times what the schema can fill. Reading stops one byte past it.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Read a config file through [`MAX_CONFIG_BYTES`]; `None` when absent.
fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, ConfigError> {
    match fsutil::read_file_capped(path, MAX_CONFIG_BYTES) {
        Ok(b) => Ok(Some(b)),
        Err(fsutil::ReadCapError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(fsutil::ReadCapError::Io(source)) => Err(ConfigError::Read {
            path: path.into(),
            source,
        }),
        Err(fsutil::ReadCapError::TooLarge { limit }) => Err(ConfigError::TooLarge {
            path: path.into(),
            limit,
        }),
    }
}

fn read_file(path: &Path) -> Result<Map<String, Value>, ConfigError> {
    match read_bounded(path)? {
        Some(bytes) => parse_object(path, &bytes),
        None => Ok(Map::new()),
    }
}

fn parse_object(path: &Path, bytes: &[u8]) -> Result<Map<String, Value>, ConfigError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ConfigError::NotObject { path: path.into() }),
        Err(e) => Err(ConfigError::Corrupt {
            path: path.into(),
            line: e.line(),
            column: e.column(),
            msg: e.to_string().split(" at line").next().unwrap_or_default().to_string(),
        }),
    }
}

/// A change made to the file: `(key, old, new)` where `old`/`new` are the
/// values stored in the file (`None` = absent, i.e. default).
pub type Change = (String, Option<Value>, Option<Value>);

/// Edit `config.json` under the config lock: re-read, let `edit` change the
/// object, validate the result, write atomically. Returns what `edit` returned.
///
/// Re-reading under the lock matters: two concurrent `config --set` calls
/// must both land, not the second overwrite the first with a stale copy.
pub fn edit<T>(
    paths: &Paths,
    edit: impl FnOnce(&mut Map<String, Value>) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let prepared = prepare_edit(paths, lock(paths)?, edit)?;
    prepared.write()?;
    Ok(prepared.out)
}

/// Take the config lock (creating the directories first).
pub fn lock(paths: &Paths) -> Result<FileLock, ConfigError> {
    let werr = |source| ConfigError::Write {
        path: paths.config_file(),
        source,
    };
    paths.ensure().map_err(werr)?;
    FileLock::exclusive(&paths.config_lock()).map_err(werr)
}

/// An edit computed and validated under the config lock but not yet
/// written: the audited path (`crate::txn`) records it in the audit log
/// first, then calls [`PreparedEdit::write`]. The lock is held until drop.
#[derive(Debug)]
pub struct PreparedEdit<T> {
    _lock: FileLock,
    pub path: PathBuf,
    /// The file's bytes before the edit (`None`: there was no file).
    pub old: Option<Vec<u8>>,
    /// The bytes the edit will write.
    pub new: Vec<u8>,
    /// The edited object, validated.
    pub file: Map<String, Value>,
    /// What the edit closure returned.
    pub out: T,
}

impl<T> PreparedEdit<T> {
    /// Replace the file atomically (still under the lock).
    pub fn write(&self) -> Result<(), ConfigError> {
        fsutil::atomic_write(&self.path, &self.new).map_err(|source| ConfigError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Under the config lock (from [`lock`]): re-read the file, apply `edit`
/// and validate the result as a load would; nothing is written yet.
pub fn prepare_edit<T>(
    paths: &Paths,
    lock: FileLock,
    edit: impl FnOnce(&mut Map<String, Value>) -> Result<T, ConfigError>,
) -> Result<PreparedEdit<T>, ConfigError> {
    let path = paths.config_file();
    fsutil::sweep_stale_temps(&paths.config_dir, fsutil::STALE_TEMP_AGE);
    let old = read_bounded(&path)?;
    let mut file = match &old {
        Some(b) => parse_object(&path, b)?,
        None => Map::new(),
    };
    let out = edit(&mut file)?;
    // Validate the whole result as a load would (env ignored: it is not
    // written), so a save can never produce a file that fails to load.
    for d in SCHEMA {
        if let Some(v) = lookup(&file, d.key) {
            check(d, v).map_err(|reason| ConfigError::Invalid {
                key: d.key.into(),
                origin: String::new(),
                reason,
            })?;
        }
    }
    let mut text = serde_json::to_string_pretty(&Value::Object(file.clone())).expect("JSON values serialise");
    text.push('\n');
    Ok(PreparedEdit {
        _lock: lock,
        path,
        old,
        new: text.into_bytes(),
        file,
        out,
    })
}

/// Set (or with `None`, remove) a schema key in the file object.
pub fn set_in(file: &mut Map<String, Value>, key: &str, value: Option<Value>) -> Option<Value> {
    let (section, k) = key.split_once('.').expect("schema keys are section.key");
    let sec = file.entry(section).or_insert_with(|| Value::Object(Map::new()));
    if !sec.is_object() {
        *sec = Value::Object(Map::new());
    }
    let obj = sec.as_object_mut().expect("just made an object");
    let old = match value {
        Some(v) => obj.insert(k.to_string(), v),
        None => obj.remove(k),
    };
    if obj.is_empty() {
        file.remove(section);
    }
    old
}

/// Parse and validate `K=V` for `config --set`.
pub fn parse_assignment(text: &str) -> Result<(&'static KeyDef, Value), ConfigError> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| ConfigError::NotAssignment(text.to_string()))?;
    let d = def_or_suggest(k.trim())?;
    let value = parse_text(d, v).map_err(|reason| ConfigError::Invalid {
        key: d.key.into(),
        origin: String::new(),
        reason,
    })?;
    Ok((d, value))
}

/// Read and validate a config file for `config --import`: returns the schema
/// keys it sets and the keys it has that we do not know (dropped).
/// What `config --import` read from a file.
pub struct Import {
    /// Schema keys the file sets, validated.
    pub set: Vec<(&'static KeyDef, Value)>,
    /// Keys the file has that the schema does not know (dropped).
    pub unknown: Vec<String>,
}

pub fn read_import(path: &Path) -> Result<Import, ConfigError> {
    let bytes = read_bounded(path)?.ok_or_else(|| ConfigError::Read {
        path: path.into(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let file = parse_object(path, &bytes)?;
    let mut set = Vec::new();
    for d in SCHEMA {
        if let Some(v) = lookup(&file, d.key) {
            let v = check(d, v).map_err(|reason| ConfigError::Invalid {
                key: d.key.into(),
                origin: format!(" in {}", path.display()),
                reason,
            })?;
            set.push((d, v));
        }
    }
    let tmp = Config::resolve(path.into(), file)?;
    Ok(Import {
        set,
        unknown: tmp.unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_is_valid_for_its_kind() {
        for d in SCHEMA {
            let v = default_of(d);
            check(d, &v).unwrap_or_else(|e| panic!("{}: default {}: {e}", d.key, d.default));
            assert!(d.key.split_once('.').is_some(), "{} has no section", d.key);
        }
    }

    #[test]
    fn env_var_names_follow_the_seed_convention() {
        assert_eq!(env_var("limits.dailyTasks"), "CMM_LIMITS_DAILYTASKS");
    }

    #[test]
    fn values_parse_by_type() {
        let d = def("limits.dailyTasks").unwrap();
        assert_eq!(parse_text(d, "12").unwrap(), Value::from(12));
        assert!(parse_text(d, "abc").is_err());
        assert!(parse_text(d, "-1").is_err());
        let d = def("limits.weeklyTasks").unwrap();
        assert_eq!(parse_text(d, "none").unwrap(), Value::Null);
        let d = def("docker.memory").unwrap();
        assert!(parse_text(d, "1g").is_ok());
        assert!(parse_text(d, "1k").is_err());
        assert!(parse_text(d, "lots").is_err());
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        match def_or_suggest("limits.dailytask") {
            Err(ConfigError::UnknownKey { suggestion, .. }) => {
                assert_eq!(suggestion.as_deref(), Some("limits.dailyTasks"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_market_endpoint_takes_a_list_of_replicas() {
        let d = def("market.endpoint").unwrap();
        assert_eq!(parse_text(d, "ws://a:1").unwrap(), Value::from("ws://a:1"));
        assert_eq!(
            parse_text(d, " ws://a:1 , wss://b:2 ").unwrap(),
            Value::from("ws://a:1,wss://b:2")
        );
        let e = parse_text(d, "ws://a:1,http://b:2").unwrap_err();
        assert!(e.contains("`http://b:2`"), "{e}");
        let e = parse_text(d, "ws://a:1,,ws://b:2").unwrap_err();
        assert!(e.contains("empty item (item 2)"), "{e}");
        assert!(check(d, &Value::from(3)).is_err());
    }

    #[test]
    fn approval_rule_lists_are_checked_item_by_item() {
        let d = def("market.allowedModels").unwrap();
        assert_eq!(parse_text(d, " sonnet , opus ").unwrap(), Value::from("sonnet,opus"));
        assert_eq!(parse_text(d, "none").unwrap(), Value::Null);
        assert!(parse_text(d, "son net").is_err());
        let d = def("market.allowedRequesters").unwrap();
        let id = "a".repeat(64);
        assert_eq!(parse_text(d, &id).unwrap(), Value::from(id.as_str()));
        assert!(parse_text(d, "abc").is_err());
        assert!(check(d, &Value::from(",")).is_err());
        assert!(parse_text(def("market.minPrice").unwrap(), "-1").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1024g").unwrap(), MAX_SIZE);
        assert!(parse_size("5m").is_err());
        for huge in ["1025g", "18446744073709551615", "18446744073709551616", "99999999999g"] {
            assert!(parse_size(huge).unwrap_err().contains("range is 6m to 1024g"), "{huge}");
        }
        assert!(parse_size("-1g").unwrap_err().contains("not a size"));
        let d = def("docker.memory").unwrap();
        assert!(check(d, &Value::from(u64::MAX)).unwrap_err().contains("out of range"));
    }

    #[test]
    fn numbers_that_do_not_fit_name_the_range() {
        let d = def("limits.dailyTasks").unwrap();
        for huge in ["18446744073709551615", "-99999999999999999999", "1000001"] {
            assert!(
                parse_text(d, huge).unwrap_err().contains("out of range (0 to 1000000)"),
                "{huge}"
            );
        }
        assert!(check(d, &serde_json::json!(18446744073709551615u64))
            .unwrap_err()
            .contains("out of range"));
    }
}
