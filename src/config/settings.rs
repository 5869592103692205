//! Typed settings: every schema key as a field, resolved once when the
//! config loads.
//!
//! The rest of the program reads settings only through [`Settings`]: a key
//! that does not exist is a compile error, and a key's type and default live
//! in one place, [`super::SCHEMA`]. This module holds no defaults of its own:
//! each field is the key's effective value (env, then file, then the schema's
//! default), already validated by [`super::Config::load`]. It must not read
//! the file or the environment itself.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::{parse_size, ConfigError};

/// The effective value of every user-settable key.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub docker: Docker,
    pub security: Security,
    pub limits: Limits,
    pub market: Market,
    pub compliance: Compliance,
    pub credentials: Credentials,
}

/// `docker.*`: the job container.
#[derive(Debug, Clone, PartialEq)]
pub struct Docker {
    pub image: String,
    /// `docker.memory` in bytes.
    pub memory: u64,
    pub cpu_shares: i64,
    pub timeout: Duration,
    pub model: String,
    pub network: String,
    /// `docker.egress` is `restricted` (the default): the job reaches only
    /// the Claude API, through the relay.
    pub egress_restricted: bool,
    /// `docker.workspaceLimit` in bytes.
    pub workspace_limit: u64,
    pub permission_mode: Option<String>,
    pub claude_binary: Option<String>,
}

/// `security.*`: keys and sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct Security {
    pub enable_encryption: bool,
    pub key_rotation_days: i64,
    pub max_session_age: Duration,
}

/// `limits.*`: the usage caps (`None`: no cap).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Limits {
    pub daily_tasks: u64,
    pub daily_tokens: u64,
    pub weekly_tasks: Option<u64>,
    pub weekly_tokens: Option<u64>,
    pub monthly_tasks: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub max_tokens_per_task: u64,
    pub max_turns_per_task: u64,
    pub max_cost_per_task: Option<f64>,
    pub daily_cost_usd: Option<f64>,
    pub weekly_cost_usd: Option<f64>,
    pub monthly_cost_usd: Option<f64>,
    pub concurrent_jobs: u64,
}

/// `market.*`: this node's market defaults and standing rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Market {
    /// The coordinator's store (`market.db`): `None` for the default file.
    pub db: Option<String>,
    /// The raw value: one coordinator URL, or a comma-separated list of
    /// replicas (parsed by `market::client::Endpoints`).
    pub endpoint: String,
    pub default_price: u64,
    pub max_bid_price: u64,
    pub bid_timeout: Duration,
    pub auto_accept_bids: bool,
    pub min_price: u64,
    pub allowed_models: Option<Vec<String>>,
    pub allowed_requesters: Option<Vec<String>>,
    pub own_nodes: Option<Vec<String>>,
    /// Standing rule: the largest workspace another node's task may bring.
    pub max_workspace_bytes: u64,
    /// Standing rule: the permission modes others' tasks may run in.
    pub permission_modes: Vec<String>,
    /// Standing rule: the lowest requester standing accepted.
    pub min_requester_reputation: f64,
}

/// `compliance.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct Compliance {
    pub require_approval: bool,
    pub log_all_activity: bool,
    pub enable_audit_trail: bool,
    pub check_interval: Duration,
}

/// `credentials.*`: where the Claude credential is read at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    /// `auto`, `oauth-env`, `api-key-env`, `command` or `file`.
    pub source: String,
    pub token_command: Option<String>,
    pub token_file: Option<PathBuf>,
}

/// Reads one resolved value by key; the only string-keyed reads there are.
struct Reader<'a> {
    value: &'a dyn Fn(&'static str) -> &'a Value,
}

impl<'a> Reader<'a> {
    fn int(&self, key: &'static str) -> i64 {
        (self.value)(key).as_i64().unwrap_or_default()
    }
    fn count(&self, key: &'static str) -> u64 {
        self.int(key).max(0) as u64
    }
    fn opt_count(&self, key: &'static str) -> Option<u64> {
        (self.value)(key).as_i64().map(|v| v.max(0) as u64)
    }
    fn usd(&self, key: &'static str) -> Option<f64> {
        (self.value)(key).as_f64().map(|v| v.max(0.0))
    }
    fn ms(&self, key: &'static str) -> Duration {
        Duration::from_millis(self.count(key))
    }
    fn flag(&self, key: &'static str) -> bool {
        (self.value)(key).as_bool().unwrap_or_default()
    }
    fn opt_text(&self, key: &'static str) -> Option<String> {
        (self.value)(key).as_str().map(str::to_string)
    }
    fn text(&self, key: &'static str) -> String {
        self.opt_text(key).unwrap_or_default()
    }
    fn list(&self, key: &'static str) -> Option<Vec<String>> {
        (self.value)(key).as_str().map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
    }
    fn bytes(&self, key: &'static str) -> Result<u64, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: key.into(),
            origin: String::new(),
            reason,
        };
        match (self.value)(key) {
            Value::Number(n) => n.as_u64().ok_or_else(|| invalid(format!("{n} is not a size"))),
            Value::String(s) => parse_size(s).map_err(invalid),
            other => Err(invalid(format!("{other} is not a size"))),
        }
    }
}

impl Settings {
    /// Every key at its schema default: what a missing or unreadable config
    /// means to a check that must still run.
    pub fn defaults() -> Settings {
        let values: std::collections::BTreeMap<&'static str, Value> =
            super::SCHEMA.iter().map(|d| (d.key, super::default_of(d))).collect();
        Settings::resolve(&|key| &values[key]).expect("schema defaults are valid")
    }

    /// Resolve from each key's effective value. `value` must know every
    /// schema key (a test checks that every key is read here).
    pub(super) fn resolve<'a>(value: &'a dyn Fn(&'static str) -> &'a Value) -> Result<Settings, ConfigError> {
        let r = Reader { value };
        Ok(Settings {
            docker: Docker {
                image: r.text("docker.image"),
                memory: r.bytes("docker.memory")?,
                cpu_shares: r.int("docker.cpuShares"),
                timeout: r.ms("docker.timeout"),
                model: r.text("docker.model"),
                network: r.text("docker.network"),
                egress_restricted: r.text("docker.egress") != "open",
                workspace_limit: r.bytes("docker.workspaceLimit")?,
                permission_mode: r.opt_text("docker.permissionMode"),
                claude_binary: r.opt_text("docker.claudeBinary"),
            },
            security: Security {
                enable_encryption: r.flag("security.enableEncryption"),
                key_rotation_days: r.int("security.keyRotationDays").max(1),
                max_session_age: r.ms("security.maxSessionAge"),
            },
            limits: Limits {
                daily_tasks: r.count("limits.dailyTasks"),
                daily_tokens: r.count("limits.dailyTokens"),
                weekly_tasks: r.opt_count("limits.weeklyTasks"),
                weekly_tokens: r.opt_count("limits.weeklyTokens"),
                monthly_tasks: r.opt_count("limits.monthlyTasks"),
                monthly_tokens: r.opt_count("limits.monthlyTokens"),
                max_tokens_per_task: r.count("limits.maxTokensPerTask").max(1),
                max_turns_per_task: r.count("limits.maxTurnsPerTask").max(1),
                max_cost_per_task: r.usd("limits.maxCostPerTask"),
                daily_cost_usd: r.usd("limits.dailyCostUsd"),
                weekly_cost_usd: r.usd("limits.weeklyCostUsd"),
                monthly_cost_usd: r.usd("limits.monthlyCostUsd"),
                concurrent_jobs: r.count("limits.concurrentJobs").max(1),
            },
            market: Market {
                db: r.opt_text("market.db"),
                endpoint: r.text("market.endpoint"),
                default_price: r.count("market.defaultPrice"),
                max_bid_price: r.count("market.maxBidPrice"),
                bid_timeout: r.ms("market.bidTimeout"),
                auto_accept_bids: r.flag("market.autoAcceptBids"),
                min_price: r.count("market.minPrice"),
                allowed_models: r.list("market.allowedModels"),
                allowed_requesters: r.list("market.allowedRequesters"),
                own_nodes: r.list("market.ownNodes"),
                max_workspace_bytes: r.bytes("market.maxWorkspaceBytes")?,
                permission_modes: r
                    .list("market.permissionModes")
                    .unwrap_or_else(|| vec!["acceptEdits".to_string()]),
                min_requester_reputation: (r.value)("market.minRequesterReputation").as_f64().unwrap_or(0.0),
            },
            compliance: Compliance {
                require_approval: r.flag("compliance.requireApproval"),
                log_all_activity: r.flag("compliance.logAllActivity"),
                enable_audit_trail: r.flag("compliance.enableAuditTrail"),
                check_interval: r.ms("compliance.checkInterval"),
            },
            credentials: Credentials {
                source: r.text("credentials.source"),
                token_command: r.opt_text("credentials.tokenCommand"),
                token_file: r.opt_text("credentials.tokenFile").map(PathBuf::from),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::{default_value, SCHEMA};

    /// Every schema key has a field: resolving reads each one exactly once.
    #[test]
    fn every_schema_key_is_a_setting() {
        let defaults: Vec<(&'static str, Value)> = SCHEMA
            .iter()
            .map(|d| (d.key, default_value(d.key).expect("schema default")))
            .collect();
        let read = RefCell::new(Vec::new());
        let lookup = |key: &'static str| -> &Value {
            read.borrow_mut().push(key);
            &defaults
                .iter()
                .find(|(k, _)| *k == key)
                .unwrap_or_else(|| panic!("`{key}` is not in SCHEMA"))
                .1
        };
        let s = Settings::resolve(&lookup).unwrap();
        let read = read.into_inner();
        let unique: BTreeSet<_> = read.iter().collect();
        assert_eq!(unique.len(), read.len(), "a key is read twice: {read:?}");
        let all: BTreeSet<_> = SCHEMA.iter().map(|d| &d.key).collect();
        assert_eq!(unique, all, "settings and schema disagree");
        assert_eq!(s.docker.memory, 1 << 30);
        assert_eq!(s.docker.workspace_limit, 100 << 20);
        assert_eq!(s.limits.max_tokens_per_task, 500_000);
        assert!(s.docker.egress_restricted);
        assert_eq!(s.market.own_nodes, None);
    }
}
