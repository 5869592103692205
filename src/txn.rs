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

use crate::audit::{AuditError, AuditLog, Event};
use crate::config::{self, ConfigError, PreparedEdit};
use crate::exit::{Exit, HasExit};
use crate::fsutil;
use crate::paths::Paths;

/// File name of the pending-change record, next to `config.json`.
pub const INTENT_FILE: &str = "config.intent";

/// One audit event: name and fields.
pub type Logged = (Event, Value);

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
    events: Vec<Logged>,
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

fn tagged(events: &[Logged], txn: &str) -> Vec<Logged> {
    events
        .iter()
        .map(|(name, fields)| {
            let mut m = match fields {
                Value::Object(m) => m.clone(),
                _ => Map::new(),
            };
            m.insert("txn".into(), Value::String(txn.to_string()));
            (*name, Value::Object(m))
        })
        .collect()
}

fn append_all(log: &AuditLog, events: &[Logged]) -> Result<(), AuditError> {
    if events.is_empty() {
        return Ok(());
    }
    log.append_many(events).map(|_| ())
}

/// Change `config.json` and record `events` write-ahead (module doc).
/// `edit` changes the file object; `events` sees the validated result and
/// names the events that record it. With no events the file is written
/// only if its bytes changed, and nothing is logged.
pub fn edit_audited<T>(
    paths: &Paths,
    edit: impl FnOnce(&mut Map<String, Value>) -> Result<T, ConfigError>,
    events: impl FnOnce(&PreparedEdit<T>) -> Result<Vec<Logged>, ConfigError>,
) -> Result<T, TxnError> {
    edit_audited_until(paths, edit, events, Step::Done)
}

/// One applied setting: key, old and new effective value (without env
/// overrides).
pub type Applied = (String, Value, Value);

/// Set (or with `None`, remove, so that its default applies) schema keys in
/// one atomic write, each change audited write-ahead as `config.changed`
/// with `via` (the command that made it). Returns what changed.
pub fn set_config(
    paths: &Paths,
    changes: &[(&'static config::KeyDef, Option<Value>)],
    via: &str,
) -> Result<Vec<Applied>, TxnError> {
    AuditLog::new(paths).recover()?;
    edit_audited(
        paths,
        |file| {
            let mut out = Vec::new();
            for (d, v) in changes {
                let old = config::set_in(file, d.key, v.clone());
                let effective = |v: &Option<Value>| {
                    v.clone()
                        .unwrap_or_else(|| config::default_value(d.key).expect("schema key"))
                };
                if old != *v {
                    out.push((d.key.to_string(), effective(&old), effective(v)));
                }
            }
            Ok(out)
        },
        |p| {
            Ok(p.out
                .iter()
                .map(|(key, old, new)| {
                    (
                        Event::ConfigChanged,
                        serde_json::json!({ "key": key, "old": old, "new": new, "via": via }),
                    )
                })
                .collect())
        },
    )
}

/// Where [`edit_audited_until`] stops: tests stand in for a crash with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// After the events are logged, before `config.json` is written.
    #[cfg(test)]
    Logged,
    Done,
}

fn edit_audited_until<T>(
    paths: &Paths,
    edit: impl FnOnce(&mut Map<String, Value>) -> Result<T, ConfigError>,
    events: impl FnOnce(&PreparedEdit<T>) -> Result<Vec<Logged>, ConfigError>,
    stop: Step,
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
    if stop != Step::Done {
        return Ok(prepared.out);
    }
    if let Err(e) = prepared.write() {
        // Logged but not applied: mark the events void, then report.
        let mark = [(
            Event::ChangeAborted,
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
                Event::ChangeCompleted,
                serde_json::json!({ "txn": intent.txn, "events": intent.events.len() }),
            )],
        )?;
        Recovered::Completed
    } else {
        append_all(
            log,
            &[(
                Event::ChangeAborted,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn default_daily() -> u64 {
        config::Settings::defaults().limits.daily_tasks
    }

    fn home() -> (tempfile::TempDir, Paths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::in_one_dir(dir.path().to_path_buf());
        (dir, paths)
    }

    /// Set `limits.dailyTasks` and stop as a crash would after logging.
    fn crash_after_logging(paths: &Paths, v: i64) {
        edit_audited_until(
            paths,
            |f| {
                config::set_in(f, "limits.dailyTasks", Some(v.into()));
                Ok(())
            },
            |_| {
                Ok(vec![
                    (
                        Event::ConfigChanged,
                        serde_json::json!({ "key": "limits.dailyTasks", "new": v }),
                    ),
                    (
                        Event::ConfigChanged,
                        serde_json::json!({ "key": "limits.dailyTasks", "note": 2 }),
                    ),
                ])
            },
            Step::Logged,
        )
        .unwrap();
    }

    fn events(paths: &Paths) -> Vec<String> {
        AuditLog::new(paths).entries().unwrap().map(|e| e.event).collect()
    }

    #[test]
    fn a_logged_change_is_completed_by_recovery() {
        let (_d, paths) = home();
        crash_after_logging(&paths, 7);
        assert!(intent_path(&paths).exists());
        assert_eq!(
            config::Config::load(&paths).unwrap().settings().limits.daily_tasks,
            default_daily()
        );
        assert_eq!(recover(&paths).unwrap(), Some(Recovered::Completed));
        assert_eq!(config::Config::load(&paths).unwrap().settings().limits.daily_tasks, 7);
        assert!(!intent_path(&paths).exists());
        assert_eq!(events(&paths).last().map(String::as_str), Some("change.completed"));
        assert_eq!(recover(&paths).unwrap(), None, "nothing left to settle");
    }

    #[test]
    fn a_change_whose_file_was_replaced_meanwhile_is_marked_void() {
        let (_d, paths) = home();
        crash_after_logging(&paths, 7);
        std::fs::write(paths.config_file(), b"{\"limits\":{\"dailyTasks\":9}}\n").unwrap();
        assert_eq!(recover(&paths).unwrap(), Some(Recovered::Aborted));
        assert_eq!(config::Config::load(&paths).unwrap().settings().limits.daily_tasks, 9);
        let log = AuditLog::new(&paths);
        let last = log.tail(1).unwrap().pop().unwrap();
        assert_eq!(last.event, "change.aborted");
        let txn = last.raw["txn"].as_str().unwrap().to_string();
        let voided = log
            .entries()
            .unwrap()
            .filter(|e| e.event == "config.changed" && e.raw["txn"] == txn.as_str())
            .count();
        assert_eq!(voided, 2);
        assert!(log.verify().unwrap().ok);
    }

    #[test]
    fn a_partly_logged_change_gets_its_missing_events_before_it_is_completed() {
        let (_d, paths) = home();
        crash_after_logging(&paths, 7);
        // Cut the second event off the log, as a crash between the two
        // appends would have left it (the head goes back one line too).
        let log = AuditLog::new(&paths);
        let text = std::fs::read_to_string(log.log_path()).unwrap();
        let keep: Vec<&str> = text.lines().collect();
        let keep = &keep[..keep.len() - 1];
        let body = keep.join("\n") + "\n";
        std::fs::write(log.log_path(), &body).unwrap();
        let last = keep.last().unwrap();
        let head = crate::audit::Head {
            log_id: log.read_head().unwrap().unwrap().log_id,
            seq: keep.len() as u64 - 1,
            hash: hex::encode(Sha256::digest(last.as_bytes())),
            last_start: (body.len() - last.len() - 1) as u64,
            len: body.len() as u64,
            file: None,
        };
        std::fs::write(paths.audit_head(), serde_json::to_vec(&head).unwrap()).unwrap();
        assert_eq!(recover(&paths).unwrap(), Some(Recovered::Completed));
        let ev = events(&paths);
        assert_eq!(
            ev[ev.len() - 3..],
            [
                "config.changed".to_string(),
                "config.changed".into(),
                "change.completed".into()
            ]
        );
        assert!(AuditLog::new(&paths).verify().unwrap().ok);
    }

    #[test]
    fn nothing_logged_means_nothing_happened() {
        let (_d, paths) = home();
        crash_after_logging(&paths, 7);
        // Rewind as if the crash came before the append: drop the intent's events.
        let mut intent: Intent = serde_json::from_slice(&std::fs::read(intent_path(&paths)).unwrap()).unwrap();
        intent.txn = "0000000000000000".into();
        std::fs::write(intent_path(&paths), serde_json::to_vec(&intent).unwrap()).unwrap();
        let before = events(&paths).len();
        assert_eq!(recover(&paths).unwrap(), Some(Recovered::NotStarted));
        assert_eq!(events(&paths).len(), before);
        assert_eq!(
            config::Config::load(&paths).unwrap().settings().limits.daily_tasks,
            default_daily()
        );
    }
}
