//! `health`: quick checks for monitors, mapped to Nagios levels.
//!
//! Each check is cheap (no log scans): config loads, the data dir accepts a
//! file, the audit head matches the log's tail, and modes are private.
//! Later capabilities (Docker engine, keys) add their own checks here.
//! Levels and the permission scan come from [`crate::checks`], the
//! credential kind from [`crate::claude::credentials`]; `health` must not
//! show or keep a secret, run `tokenCommand` or change any state.

use chrono::Local;
use serde::Serialize;

use crate::audit::AuditLog;
use crate::caps::{Caps, Ledger};
use crate::checks::{loose_permissions, Level};
use crate::config::Config;
use crate::fsutil;
use crate::paths::Paths;

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub message: String,
}

/// One perfdata value: `'label'=value;warn;crit;min;max`.
#[derive(Debug, Clone, Serialize)]
pub struct Perf {
    pub label: &'static str,
    pub value: u64,
    pub warn: Option<u64>,
    pub crit: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    pub level: Level,
    pub checks: Vec<Check>,
    pub perf: Vec<Perf>,
}

impl HealthReport {
    /// The one-line Nagios output: `CMM OK - summary | perfdata`.
    pub fn line(&self) -> String {
        let bad: Vec<String> = self
            .checks
            .iter()
            .filter(|c| c.level != Level::Ok)
            .map(|c| format!("{}: {}", c.name, c.message))
            .collect();
        let summary = if bad.is_empty() {
            format!("{} checks passed", self.checks.len())
        } else {
            bad.join("; ")
        };
        let perf: Vec<String> = self
            .perf
            .iter()
            .map(|p| {
                let o = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
                format!("'{}'={};{};{};0;", p.label, p.value, o(p.warn), o(p.crit))
            })
            .collect();
        format!("CMM {} - {} | {}", self.level.name(), summary, perf.join(" "))
    }
}

/// Run the local checks.
pub fn check(paths: &Paths) -> HealthReport {
    let mut checks = Vec::new();
    let mut perf = Vec::new();
    let config = Config::load(paths);
    checks.push(match &config {
        Ok(_) => Check {
            name: "config",
            level: Level::Ok,
            message: "valid".into(),
        },
        Err(e) => Check {
            name: "config",
            level: Level::Critical,
            message: e.to_string(),
        },
    });
    let config = config.ok();
    checks.push(writable(paths));
    checks.push(audit(paths, &mut perf));
    checks.push(permissions(paths));
    checks.push(keys(paths, config.as_ref()));
    if let Some(cfg) = &config {
        if let Err(e) = usage(paths, cfg, &mut perf) {
            checks.push(Check {
                name: "usage",
                level: Level::Critical,
                message: e.to_string(),
            });
        }
        docker_checks(paths, cfg, &mut checks, &mut perf);
    }
    let level = checks.iter().map(|c| c.level).max().unwrap_or(Level::Ok);
    HealthReport { level, checks, perf }
}

/// The audit head matches the log's tail (no scan).
fn audit(paths: &Paths, perf: &mut Vec<Perf>) -> Check {
    match AuditLog::new(paths).quick_check() {
        Ok(head) => {
            perf.push(Perf {
                label: "audit_events",
                value: head.as_ref().map(|h| h.seq + 1).unwrap_or(0),
                warn: None,
                crit: None,
            });
            Check {
                name: "audit",
                level: Level::Ok,
                message: match head {
                    Some(h) => format!("head at seq {}", h.seq),
                    None => "no events yet".into(),
                },
            }
        }
        Err(e) => Check {
            name: "audit",
            level: Level::Critical,
            message: e.to_string(),
        },
    }
}

/// Today's tasks and tokens against their caps, and open reservations.
fn usage(paths: &Paths, cfg: &Config, perf: &mut Vec<Perf>) -> Result<(), crate::caps::CapsError> {
    let caps = Caps::from_config(cfg);
    let s = Ledger::new(paths).snapshot(&caps, Local::now())?;
    let day = &s.windows[0];
    perf.push(Perf {
        label: "tasks_today",
        value: day.tasks,
        warn: None,
        crit: day.task_cap,
    });
    perf.push(Perf {
        label: "tokens_today",
        value: day.tokens,
        warn: None,
        crit: day.token_cap,
    });
    perf.push(Perf {
        label: "reservations",
        value: s.reservations.len() as u64,
        warn: None,
        crit: Some(caps.concurrent_jobs),
    });
    Ok(())
}

fn writable(paths: &Paths) -> Check {
    let dir = &paths.data_dir;
    let result = fsutil::ensure_private_dir(dir).and_then(|_| tempfile::tempfile_in(dir).map(drop));
    match result {
        Ok(()) => Check {
            name: "data_dir",
            level: Level::Ok,
            message: "writable".into(),
        },
        Err(e) => Check {
            name: "data_dir",
            level: Level::Critical,
            message: format!("{} is not writable: {e}", dir.display()),
        },
    }
}

/// WARNING when the current node key is older than `security.keyRotationDays`.
fn keys(paths: &Paths, config: Option<&Config>) -> Check {
    let days = config.map_or_else(
        || crate::config::Settings::defaults().security.key_rotation_days,
        |c| c.settings().security.key_rotation_days,
    );
    match crate::crypto::keys::current_key_created(paths) {
        Ok(None) => Check {
            name: "keys",
            level: Level::Ok,
            message: "no node keys yet".into(),
        },
        Ok(Some(created)) => {
            let age = (chrono::Utc::now() - created).num_days();
            if age >= days {
                Check {
                    name: "keys",
                    level: Level::Warning,
                    message: format!(
                        "current key is {age} days old (rotate every {days}: `claude-max-market keys rotate`)"
                    ),
                }
            } else {
                Check {
                    name: "keys",
                    level: Level::Ok,
                    message: format!("current key is {age} days old"),
                }
            }
        }
        Err(e) => Check {
            name: "keys",
            level: Level::Critical,
            message: e.to_string(),
        },
    }
}

fn permissions(paths: &Paths) -> Check {
    let loose = loose_permissions(paths);
    if loose.is_empty() {
        Check {
            name: "permissions",
            level: Level::Ok,
            message: "private".into(),
        }
    } else {
        Check {
            name: "permissions",
            level: Level::Warning,
            message: format!("{} (fix: chmod go-rwx)", loose.join(", ")),
        }
    }
}

/// How long `health` waits for the Docker engine.
const DOCKER_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Engine reachable (and its API version), runner image present, credentials
/// resolvable (never read or printed; `tokenCommand` is not run), running jobs.
fn docker_checks(paths: &Paths, cfg: &Config, checks: &mut Vec<Check>, perf: &mut Vec<Perf>) {
    let image = crate::job::default_image(cfg);
    // Running jobs are this install's only: another home's jobs are not ours to report.
    let scope = crate::docker::container::Scope::this_install(paths);
    let probe = crate::docker::probe(&image, &scope, DOCKER_TIMEOUT);
    match &probe.engine {
        Ok(api) => checks.push(Check {
            name: "docker",
            level: Level::Ok,
            message: format!("engine reachable (API {api})"),
        }),
        Err(e) => checks.push(Check {
            name: "docker",
            level: Level::Critical,
            message: format!("Docker engine not reachable ({e}); start Docker, no job can run"),
        }),
    }
    match probe.image_present {
        Some(true) => checks.push(Check {
            name: "image",
            level: Level::Ok,
            message: format!("{image} present"),
        }),
        Some(false) => checks.push(Check {
            name: "image",
            level: Level::Warning,
            message: format!(
                "{image} not present; `execute` will pull or build it (or run `claude-max-market docker build`)"
            ),
        }),
        None => {}
    }
    checks.push(egress_check(cfg));
    match crate::claude::credentials::describe(cfg) {
        Ok(m) => checks.push(Check {
            name: "credentials",
            level: Level::Ok,
            message: m,
        }),
        Err(m) => checks.push(Check {
            name: "credentials",
            level: Level::Warning,
            message: m,
        }),
    }
    if let Some(n) = probe.running_jobs {
        perf.push(Perf {
            label: "running_jobs",
            value: n as u64,
            warn: None,
            crit: None,
        });
    }
}

/// Restricted egress is OK; `docker.egress=open` is a WARNING (the job can
/// reach anything its network can).
fn egress_check(cfg: &Config) -> Check {
    if !crate::docker::egress::restricted(cfg) {
        return Check {
            name: "egress",
            level: Level::Warning,
            message: "open: `docker.egress=open`, job containers are not limited to the Claude API; set `docker.egress=restricted`".into(),
        };
    }
    match crate::docker::egress::profile() {
        Ok(e) => Check {
            name: "egress",
            level: Level::Ok,
            message: format!(
                "restricted: no network, relay on {} to a per-job proxy that allows {}",
                e.relay_listen,
                e.allowlist(crate::claude::credentials::kind_name(crate::claude::credentials::kind(
                    cfg
                )))
                .join(", ")
            ),
        },
        Err(err) => Check {
            name: "egress",
            level: Level::Critical,
            message: err.to_string(),
        },
    }
}
