//! Audited config changes, write-ahead: the audit events first, then the
//! change, so a `kill -9` can never leave a state change the log does not
//! record (DESIGN.md invariant 5; README "The audit log").
//!
//! A change (`config --set`, `limits`, `opt-in`, `opt-out`) runs under the
//! config lock:
//!
//! 1. compute and validate the new `config.json` bytes;
//! 2. write `config.intent` (atomically): a random transaction id, the audit
//!    log length before the events, the SHA-256 of the old and new file, the
//!    events and the new file's text;
//! 3. append the events, each carrying `"txn":"<id>"`, under the audit lock;
//! 4. replace `config.json` atomically;
//! 5. remove `config.intent`.
//!
//! Recovery ([`recover`], run at the start of every command and before every
//! change, under the same config lock) finds a leftover intent and settles it
//! by looking only at the log lines written after it (O(new events)):
//!
//! * none of its events in the log: nothing happened; the intent goes;
//! * some or all events logged, `config.json` still the old file: the missing
//!   events are appended and the change is completed (`config.json` written),
//!   then a `change.completed` event says recovery did it;
//! * all logged and `config.json` is the new file: only step 5 was lost;
//! * `config.json` is neither (edited by hand meanwhile): the change is not
//!   applied, and a `change.aborted` event marks its events void.
//!
//! A change whose write fails without a crash (disk full) is marked the same
//! way, so every event in the log either took effect or is marked void.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::audit::{AuditError, AuditLog};
use crate::config::{self, ConfigError, PreparedEdit};
use crate::exit::{Exit, HasExit};
use crate::fsutil;
use crate::paths::Paths;

/// File name of the pending-change record, next to `config.json`.
pub const INTENT_FILE: &str = "config.intent";

/// One audit event: name and fields.
pub type Event = (String, Value);

/// Errors from an audited change.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot use {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a pending-change record: {reason}")]
    BadIntent { path: PathBuf, reason: String },
}

impl HasExit for TxnError {
    fn exit(&self) -> Exit {
        match self {
            TxnError::Config(e) => e.exit(),
            TxnError::Audit(e) => e.exit(),
            TxnError::Io { .. } => Exit::Failed,
            TxnError::BadIntent { .. } => Exit::Integrity,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            TxnError::Config(e) => e.hint(),
            TxnError::Audit(e) => e.hint(),
            TxnError::Io { .. } => Some("check that the config directory exists and is writable".into()),
            TxnError::BadIntent { path, .. } => Some(format!(
                "it was not written by this tool; move it aside (`mv {} {}.bad`) and run `claude-max-market audit verify`",
                path.display(),
                path.display()
            )),
        }
    }
}

/// `config.intent` on disk.
#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    v: u32,
    txn: String,
    /// Audit log length (bytes) before the events: they are at or after it.
    log_from: u64,
    old_sha256: Option<String>,
    new_sha256: String,
    events: Vec<Event>,
    /// The new `config.json` text, to complete the change on recovery.
    config: String,
}

/// What recovery did with a leftover intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovered {
    /// No event was logged; the change never happened.
    NotStarted,
    /// The events were logged and the change was completed now.
    Completed,
    /// The change had been made; only the intent was left.
    AlreadyApplied,
    /// `config.json` was changed by something else; the events are marked void.
    Aborted,
}

fn intent_path(paths: &Paths) -> PathBuf {
    paths.config_dir.join(INTENT_FILE)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn tagged(events: &[Event], txn: &str) -> Vec<(String, Value)> {
    events
        .iter()
        .map(|(name, fields)| {
            let mut m = match fields {
                Value::Object(m) => m.clone(),
                _ => Map::new(),
            };
            m.insert("txn".into(), Value::String(txn.to_string()));
            (name.clone(), Value::Object(m))
        })
        .collect()
}

fn append_all(log: &AuditLog, events: &[(String, Value)]) -> Result<(), AuditError> {
    if events.is_empty() {
        return Ok(());
    }
    let refs: Vec<(&str, Value)> = events.iter().map(|(n, f)| (n.as_str(), f.clone())).collect();
    log.append_many(&refs).map(|_| ())
}

/// Change `config.json` and record `events` write-ahead (module doc).
/// `edit` changes the file object; `events` sees the validated result and
/// names the events that record it. With no events the file is written
/// only if its bytes changed, and nothing is logged.
pub fn edit_audited<T>(
    paths: &Paths,
    edit: impl FnOnce(&mut Map<String, Value>) -> Result<T, ConfigError>,
    events: impl FnOnce(&PreparedEdit<T>) -> Result<Vec<Event>, ConfigError>,
) -> Result<T, TxnError> {
    let log = AuditLog::new(paths);
    let lock = config::lock(paths)?;
    recover_locked(paths, &log)?;
    let prepared = config::prepare_edit(paths, lock, edit)?;
    let events = events(&prepared)?;
    if events.is_empty() {
        if prepared.old.as_deref() != Some(prepared.new.as_slice()) {
            prepared.write()?;
        }
        return Ok(prepared.out);
    }
    // The log must take the events before anything is promised: this also
    // settles a crash's leftovers and refuses a broken chain.
    log.recover()?;
    let txn = hex::encode(rand::random::<[u8; 8]>());
    let intent = Intent {
        v: 1,
        txn: txn.clone(),
        log_from: log.read_head()?.map(|h| h.len).unwrap_or(0),
        old_sha256: prepared.old.as_deref().map(sha),
        new_sha256: sha(&prepared.new),
        events: events.clone(),
        config: String::from_utf8(prepared.new.clone()).expect("serde_json writes UTF-8"),
    };
    let ipath = intent_path(paths);
    let bytes = serde_json::to_vec(&intent).expect("intent serialises");
    fsutil::atomic_write(&ipath, &bytes).map_err(|source| TxnError::Io {
        path: ipath.clone(),
        source,
    })?;
    if let Err(e) = append_all(&log, &tagged(&events, &txn)) {
        // Settle what did reach the log (nothing, usually: the intent goes).
        let _ = recover_locked(paths, &log);
        return Err(e.into());
    }
    if let Err(e) = prepared.write() {
        // Logged but not applied: mark the events void, then report.
        let mark = [(
            "change.aborted".to_string(),
            serde_json::json!({ "txn": txn, "reason": format!("config.json could not be written: {e}") }),
        )];
        if append_all(&log, &mark).is_ok() {
            let _ = fs::remove_file(&ipath);
        }
        return Err(e.into());
    }
    remove_intent(&ipath)?;
    Ok(prepared.out)
}

fn remove_intent(path: &std::path::Path) -> Result<(), TxnError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TxnError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Settle a change a crash left half-done, if any. Cheap when there is
/// none (one `stat`); otherwise takes the config lock, as writers do.
pub fn recover(paths: &Paths) -> Result<Option<Recovered>, TxnError> {
    if !intent_path(paths).exists() {
        return Ok(None);
    }
    let _lock = config::lock(paths)?;
    recover_locked(paths, &AuditLog::new(paths))
}

/// [`recover`] for a caller that holds the config lock.
fn recover_locked(paths: &Paths, log: &AuditLog) -> Result<Option<Recovered>, TxnError> {
    let ipath = intent_path(paths);
    let bytes = match fs::read(&ipath) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TxnError::Io { path: ipath, source }),
    };
    let intent: Intent = serde_json::from_slice(&bytes).map_err(|e| TxnError::BadIntent {
        path: ipath.clone(),
        reason: e.to_string(),
    })?;
    if intent.v != 1 || sha(intent.config.as_bytes()) != intent.new_sha256 {
        return Err(TxnError::BadIntent {
            path: ipath,
            reason: "its version or checksum is wrong".into(),
        });
    }
    // A torn line of ours must not count as logged: settle the tail first.
    log.recover()?;
    let logged = count_logged(log, intent.log_from, &intent.txn)?;
    let cfg_path = paths.config_file();
    let current = match fs::read(&cfg_path) {
        Ok(b) => Some(sha(&b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(TxnError::Io { path: cfg_path, source }),
    };
    let missing = tagged(&intent.events[logged.min(intent.events.len())..], &intent.txn);
    let outcome = if current.as_deref() == Some(intent.new_sha256.as_str()) {
        // Applied (by us, before the crash): make sure every event is there.
        append_all(log, &missing)?;
        Recovered::AlreadyApplied
    } else if logged == 0 {
        Recovered::NotStarted
    } else if current == intent.old_sha256 {
        append_all(log, &missing)?;
        fsutil::atomic_write(&cfg_path, intent.config.as_bytes()).map_err(|source| TxnError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        append_all(
            log,
            &[(
                "change.completed".into(),
                serde_json::json!({ "txn": intent.txn, "events": intent.events.len() }),
            )],
        )?;
        Recovered::Completed
    } else {
        append_all(
            log,
            &[(
                "change.aborted".into(),
                serde_json::json!({
                    "txn": intent.txn,
                    "reason": "config.json was changed by something else before this change was applied",
                }),
            )],
        )?;
        Recovered::Aborted
    };
    remove_intent(&ipath)?;
    Ok(Some(outcome))
}

/// How many log lines at or after byte `from` carry transaction `txn`.
fn count_logged(log: &AuditLog, from: u64, txn: &str) -> Result<usize, TxnError> {
    let path = log.log_path().to_path_buf();
    let ioe = |source| TxnError::Io {
        path: path.clone(),
        source,
    };
    let mut file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ioe(e)),
    };
    let len = file.metadata().map_err(ioe)?.len();
    if from > len {
        return Err(AuditError::Integrity(format!(
            "the log is shorter ({len} bytes) than when a pending change was recorded ({from} bytes)"
        ))
        .into());
    }
    file.seek(SeekFrom::Start(from)).map_err(ioe)?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(ioe)?;
    let needle = format!("\"txn\":\"{txn}\"");
    Ok(tail
        .split(|b| *b == b'\n')
        .filter(|l| l.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .count())
}
