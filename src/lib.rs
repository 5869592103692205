//! claude-max-market: run Claude Code jobs on your own login, inside a
//! locked-down container, under your consent, caps and approval, with every
//! action in a tamper-evident audit log.
//!
//! The binary is a thin layer over this library: every command is one of
//! its operations (docs/ARCHITECTURE.md). The programmatic facade:
//!
//! ```no_run
//! use claude_max_market::{audit, status, AuditLog, Config, Paths};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let paths = Paths::resolve()?;
//! let config = Config::load(&paths)?;
//! println!("daily task cap: {}", config.settings().limits.daily_tasks);
//! let report = status::read(&paths, &config)?;
//! println!("opted in: {}", report.consent.accepted);
//!
//! let log = AuditLog::new(&paths);
//! log.append(audit::Event::ConfigChanged, serde_json::json!({ "key": "example" }))?;
//! assert!(log.verify()?.ok);
//! # Ok(()) }
//! ```

pub mod audit;
pub mod audit_report;
pub mod caps;
pub mod checks;
pub mod claude;
pub mod cli;
pub mod compliance;
pub mod config;
pub mod consent;
pub mod context;
pub mod crypto;
pub mod docker;
pub mod exit;
pub mod fsutil;
pub mod health;
pub mod job;
pub mod legal;
pub mod market;
pub mod mcp;
pub mod paths;
pub mod runtime;
pub mod status;
pub mod timespec;
pub mod txn;
pub mod usage_report;
pub mod workspace;

pub use audit::{AuditError, AuditLog, VerifyReport};
pub use caps::{Budget, Caps, Reservation, Spent};
pub use config::{Config, ConfigError};
pub use consent::Consent;
pub use exit::Exit;
pub use job::{Approval, ApprovedBy, Cancel, JobRecord, JobSource, JobSpec, Progress, Unattended};
pub use paths::Paths;
