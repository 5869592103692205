//! Append-only, hash-chained audit log (DESIGN.md section 5).
//!
//! `audit.jsonl` holds one JSON object per line:
//! `{"v":1,"seq":N,"ts":"...","event":"...",<fields>,"prev":"<hex>"}` where
//! `prev` is the SHA-256 of the exact bytes of the previous line (without its
//! `\n`); line 0 is `log.genesis` with a random log id and `prev` of zeros.
//!
//! `audit.head` records the last line's sequence number, hash and byte
//! offsets. Appends are O(1) in the log's size: the head says where the tail
//! is, so only the last line is re-read and re-hashed to prove nothing moved.
//! `verify` streams the whole file and checks every link, then the head, so
//! edits, deletions, reordering and truncation are all detected.
//!
//! Crash model: a line is written with one `write_all` of line + `\n` and
//! `fsync`ed before the head is replaced atomically. A crash can therefore
//! leave (a) a torn last line with no `\n`, which recovery moves aside and
//! records as a chained `log.recovered` event, or (b) one complete line the
//! head does not know yet, which recovery checks and rolls the head onto.
//! Anything else is corruption: appends are refused (exit 5).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::exit::{Exit, HasExit};
use crate::fsutil::{self, FileLock};
use crate::paths::Paths;

/// Format version written in every line.
pub const LOG_VERSION: u32 = 1;
const ZERO_HASH: [u8; 32] = [0; 32];
/// `"prev":"` + 64 hex + `"}`: the fixed suffix of every line.
const PREV_SUFFIX_LEN: usize = 8 + 64 + 2;
const LINE_PREFIX: &[u8] = b"{\"v\":1,\"seq\":";

/// Errors from the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log integrity failure: {0}")]
    Integrity(String),
    #[error("audit log I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl HasExit for AuditError {
    fn exit(&self) -> Exit {
        match self {
            AuditError::Integrity(_) => Exit::Integrity,
            AuditError::Io { .. } => Exit::Failed,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            AuditError::Integrity(_) => Some(
                "the log was edited, truncated or reordered; keep a copy for investigation and run `claude-max-market audit verify` for details".into(),
            ),
            AuditError::Io { .. } => Some("check that the data directory exists and is writable".into()),
        }
    }
}

/// What `audit.head` records about the last line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub log_id: String,
    /// Sequence number of the last line.
    pub seq: u64,
    /// Hex SHA-256 of the last line.
    pub hash: String,
    /// Byte offset where the last line starts.
    pub last_start: u64,
    /// Log length in bytes after the last line's `\n`.
    pub len: u64,
}

/// Outcome of a full chain walk.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub events: u64,
    pub bytes: u64,
    pub log_id: Option<String>,
    pub head_seq: Option<u64>,
    /// Lines recovered after crashes (`log.recovered` events) seen in the chain.
    pub recoveries: u64,
    /// Problems found; empty when `ok`.
    pub problems: Vec<String>,
}

/// Handle on the audit log files.
#[derive(Debug, Clone)]
pub struct AuditLog {
    log: PathBuf,
    head: PathBuf,
    lock: PathBuf,
    dir: PathBuf,
}

/// One parsed line, for readers (`logs`, `audit`, analytics).
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub ts: String,
    pub event: String,
    /// The whole object (including v, seq, ts, event, prev).
    pub raw: Map<String, Value>,
    /// The line's exact bytes, without the newline.
    pub line: String,
}

impl Entry {
    /// Fields other than the envelope keys.
    pub fn fields(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.raw
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "v" | "seq" | "ts" | "event" | "prev"))
    }
}

impl AuditLog {
    pub fn new(paths: &Paths) -> AuditLog {
        AuditLog {
            log: paths.audit_log(),
            head: paths.audit_head(),
            lock: paths.audit_lock(),
            dir: paths.data_dir.clone(),
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn io(&self, source: io::Error) -> AuditError {
        AuditError::Io {
            path: self.log.clone(),
            source,
        }
    }

    /// Read `audit.head` (None when the log was never written).
    pub fn read_head(&self) -> Result<Option<Head>, AuditError> {
        match fs::read(&self.head) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| AuditError::Integrity(format!("{} is unreadable: {e}", self.head.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AuditError::Io {
                path: self.head.clone(),
                source,
            }),
        }
    }

    fn write_head(&self, head: &Head) -> Result<(), AuditError> {
        let bytes = serde_json::to_vec(head).expect("head serialises");
        fsutil::atomic_write(&self.head, &bytes).map_err(|source| AuditError::Io {
            path: self.head.clone(),
            source,
        })
    }

    /// Append one event. `fields` must be a JSON object (or null); its keys
    /// must not collide with the envelope keys. Returns the new sequence number.
    pub fn append(&self, event: &str, fields: Value) -> Result<u64, AuditError> {
        Ok(self.append_many(&[(event, fields)])?.0)
    }

    /// Append several events under one lock (used by recovery and imports).
    /// Returns the first and last sequence numbers written.
    pub fn append_many(&self, events: &[(&str, Value)]) -> Result<(u64, u64), AuditError> {
        fsutil::ensure_private_dir(&self.dir).map_err(|e| self.io(e))?;
        let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
        let mut file = fsutil::open_append(&self.log).map_err(|e| self.io(e))?;
        let mut head = self.settle_tail(&mut file)?;
        let mut first = None;
        for (event, fields) in events {
            let (h, seq) = self.write_line(&mut file, head.as_ref(), event, fields)?;
            first.get_or_insert(seq);
            head = Some(h);
        }
        let last = head.as_ref().map(|h| h.seq).unwrap_or(0);
        Ok((first.unwrap_or(last), last))
    }

    /// Under the lock: make the file and head agree, recovering a crash's
    /// leftovers, or fail on corruption. Returns the head to chain onto.
    fn settle_tail(&self, file: &mut File) -> Result<Option<Head>, AuditError> {
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        let head = self.read_head()?;
        let Some(head) = head else {
            if len == 0 {
                // Brand new log: genesis.
                let log_id = hex::encode(rand::random::<[u8; 16]>());
                let fields = serde_json::json!({ "log_id": log_id });
                let (h, _) = self.write_line_raw(file, &log_id, 0, ZERO_HASH, 0, "log.genesis", &fields)?;
                return Ok(Some(h));
            }
            return Err(AuditError::Integrity(format!(
                "{} has {len} bytes but {} is missing",
                self.log.display(),
                self.head.display()
            )));
        };
        if len < head.len {
            return Err(AuditError::Integrity(format!(
                "log is {len} bytes but audit.head says {} (truncated)",
                head.len
            )));
        }
        // Prove the line the head names is still there, unchanged.
        let last = read_range(file, head.last_start, head.len).map_err(|e| self.io(e))?;
        let last_line = last.strip_suffix(b"\n").unwrap_or(&last);
        if hex::encode(Sha256::digest(last_line)) != head.hash {
            return Err(AuditError::Integrity(format!(
                "line {} no longer matches audit.head (edited or replaced)",
                head.seq
            )));
        }
        if len == head.len {
            return Ok(Some(head));
        }
        // Extra bytes after the head: a crash's leftovers.
        let extra = read_range(file, head.len, len).map_err(|e| self.io(e))?;
        let mut head = head;
        let mut rest: &[u8] = &extra;
        if let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            // One complete line the head has not caught up with.
            let line = &rest[..nl];
            let (seq, prev) = parse_link(line).ok_or_else(|| {
                AuditError::Integrity(format!("line after seq {} is not a valid audit line", head.seq))
            })?;
            if seq != head.seq + 1 || hex::encode(prev) != head.hash {
                return Err(AuditError::Integrity(format!(
                    "line after seq {} does not chain onto it",
                    head.seq
                )));
            }
            let start = head.len;
            head = Head {
                log_id: head.log_id,
                seq,
                hash: hex::encode(Sha256::digest(line)),
                last_start: start,
                len: start + nl as u64 + 1,
            };
            rest = &rest[nl + 1..];
            if rest.contains(&b'\n') {
                return Err(AuditError::Integrity(
                    "more than one line beyond audit.head; lines were added outside the tool".into(),
                ));
            }
            self.write_head(&head)?;
        }
        if !rest.is_empty() {
            self.recover_torn(file, &head, rest)?;
            // Recovery appended a chained event; re-read the head it wrote.
            return self.read_head();
        }
        Ok(Some(head))
    }

    /// Move a torn tail aside and record a chained `log.recovered` event.
    fn recover_torn(&self, file: &mut File, head: &Head, torn: &[u8]) -> Result<(), AuditError> {
        let aside = self.dir.join(format!(
            "audit.torn-{}-{}",
            head.seq,
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        ));
        fsutil::atomic_write(&aside, torn).map_err(|e| self.io(e))?;
        file.set_len(head.len).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        let fields = serde_json::json!({
            "torn_bytes": torn.len(),
            "torn_sha256": hex::encode(Sha256::digest(torn)),
            "moved_to": aside.file_name().map(|n| n.to_string_lossy().into_owned()),
        });
        self.write_line(file, Some(head), "log.recovered", &fields)?;
        Ok(())
    }

    fn write_line(
        &self,
        file: &mut File,
        head: Option<&Head>,
        event: &str,
        fields: &Value,
    ) -> Result<(Head, u64), AuditError> {
        let head = head.expect("settle_tail always yields a head");
        let mut prev = [0u8; 32];
        hex::decode_to_slice(&head.hash, &mut prev)
            .map_err(|_| AuditError::Integrity("audit.head hash is not hex".into()))?;
        let h = self.write_line_raw(file, &head.log_id, head.seq + 1, prev, head.len, event, fields)?;
        Ok(h)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_line_raw(
        &self,
        file: &mut File,
        log_id: &str,
        seq: u64,
        prev: [u8; 32],
        start: u64,
        event: &str,
        fields: &Value,
    ) -> Result<(Head, u64), AuditError> {
        let line = render_line(seq, &chrono::Utc::now(), event, fields, &prev);
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        file.write_all(&bytes).map_err(|e| self.io(e))?;
        file.sync_data().map_err(|e| self.io(e))?;
        let head = Head {
            log_id: log_id.to_string(),
            seq,
            hash: hex::encode(Sha256::digest(line.as_bytes())),
            last_start: start,
            len: start + bytes.len() as u64,
        };
        self.write_head(&head)?;
        Ok((head, seq))
    }

    /// Cheap consistency check for `health` and `status`: head present and
    /// matching the file's length and last line. Reads one line, not the log.
    pub fn quick_check(&self) -> Result<Option<Head>, AuditError> {
        let Some(head) = self.read_head()? else {
            return match fs::metadata(&self.log) {
                Ok(m) if m.len() > 0 => Err(AuditError::Integrity("audit.head is missing".into())),
                _ => Ok(None),
            };
        };
        let mut file = File::open(&self.log).map_err(|e| self.io(e))?;
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        if len < head.len {
            return Err(AuditError::Integrity(format!(
                "log is {len} bytes but audit.head says {} (truncated)",
                head.len
            )));
        }
        let last = read_range(&mut file, head.last_start, head.len).map_err(|e| self.io(e))?;
        let last_line = last.strip_suffix(b"\n").unwrap_or(&last);
        if hex::encode(Sha256::digest(last_line)) != head.hash {
            return Err(AuditError::Integrity(format!(
                "line {} no longer matches audit.head",
                head.seq
            )));
        }
        Ok(Some(head))
    }

    /// Settle a crash's leftovers (if any) under the lock, so a following
    /// [`verify`](Self::verify) sees a clean tail. A no-op on a healthy log.
    pub fn recover(&self) -> Result<(), AuditError> {
        if !self.log.exists() {
            return Ok(());
        }
        let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
        let mut file = fsutil::open_append(&self.log).map_err(|e| self.io(e))?;
        self.settle_tail(&mut file).map(|_| ())
    }

    /// Walk the whole chain and compare its end with `audit.head`.
    ///
    /// Hot loop: per line, one SHA-256 and two fixed-position field reads
    /// (`seq` is right after the fixed prefix, `prev` is the fixed suffix);
    /// no JSON parse, so throughput is bounded by hashing.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        let mut rep = VerifyReport {
            ok: true,
            events: 0,
            bytes: 0,
            log_id: None,
            head_seq: None,
            recoveries: 0,
            problems: vec![],
        };
        let head = match self.read_head() {
            Ok(h) => h,
            Err(AuditError::Integrity(m)) => {
                rep.problems.push(m);
                None
            }
            Err(e) => return Err(e),
        };
        rep.head_seq = head.as_ref().map(|h| h.seq);
        let file = match File::open(&self.log) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if head.is_some() {
                    rep.problems
                        .push("audit.jsonl is missing but audit.head exists (deleted)".into());
                }
                rep.ok = rep.problems.is_empty();
                return Ok(rep);
            }
            Err(e) => return Err(self.io(e)),
        };
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut prev = ZERO_HASH;
        let mut line = Vec::with_capacity(1024);
        let mut offset = 0u64;
        let mut last_start = 0u64;
        let mut expected_seq = 0u64;
        let mut first_bad: Option<String> = None;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(|e| self.io(e))?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                first_bad
                    .get_or_insert_with(|| format!("torn last line at byte {offset} ({n} bytes without a newline)"));
                offset += n as u64;
                break;
            }
            let body = &line[..n - 1];
            match parse_link(body) {
                Some((seq, p)) => {
                    if seq != expected_seq && first_bad.is_none() {
                        first_bad = Some(if seq < expected_seq {
                            format!("line at byte {offset} has seq {seq}, expected {expected_seq} (reordered or duplicated)")
                        } else {
                            format!(
                                "seq jumps from {} to {seq} at byte {offset} (lines deleted)",
                                expected_seq.wrapping_sub(1)
                            )
                        });
                    }
                    if p != prev && first_bad.is_none() {
                        first_bad = Some(format!(
                            "line seq {seq} does not chain onto the line before it (an earlier line was edited, or lines were reordered)"
                        ));
                    }
                    if seq == 0 {
                        rep.log_id = extract_str(body, "log_id");
                    }
                    if body.windows(15).any(|w| w == b"\"log.recovered\"") {
                        rep.recoveries += 1;
                    }
                    expected_seq = seq + 1;
                }
                None => {
                    first_bad.get_or_insert_with(|| format!("line at byte {offset} is not an audit line"));
                    expected_seq += 1;
                }
            }
            prev = Sha256::digest(body).into();
            last_start = offset;
            offset += n as u64;
            rep.events += 1;
        }
        rep.bytes = offset;
        if let Some(b) = first_bad {
            rep.problems.push(b);
        }
        match &head {
            Some(h) => {
                if rep.events == 0 {
                    rep.problems
                        .push("audit.head names lines the log no longer has (truncated)".into());
                } else if h.seq + 1 < rep.events {
                    rep.problems.push(format!(
                        "log has {} lines beyond audit.head (seq {}) — an unrecovered crash or lines added outside the tool",
                        rep.events - 1 - h.seq,
                        h.seq
                    ));
                } else if h.seq + 1 > rep.events {
                    rep.problems.push(format!(
                        "audit.head is at seq {} but the log ends at seq {} (truncated)",
                        h.seq,
                        rep.events - 1
                    ));
                } else if hex::encode(prev) != h.hash || h.last_start != last_start {
                    rep.problems.push(format!(
                        "last line (seq {}) does not match audit.head (edited or replaced)",
                        h.seq
                    ));
                }
            }
            None if rep.events > 0 && rep.problems.is_empty() => {
                rep.problems.push("audit.head is missing".into());
            }
            None => {}
        }
        rep.ok = rep.problems.is_empty();
        Ok(rep)
    }

    /// Iterate parsed entries from the start (for reports and `logs`).
    pub fn entries(&self) -> Result<impl Iterator<Item = Entry>, AuditError> {
        let file = match File::open(&self.log) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io(e)),
        };
        let reader = file.map(|f| BufReader::with_capacity(1 << 16, f));
        Ok(reader
            .into_iter()
            .flat_map(|r| r.lines().map_while(Result::ok).filter_map(parse_entry)))
    }

    /// The last `n` entries, reading backwards from the end (cost ~ n lines).
    pub fn tail(&self, n: usize) -> Result<Vec<Entry>, AuditError> {
        let mut file = match File::open(&self.log) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(self.io(e)),
        };
        let len = file.metadata().map_err(|e| self.io(e))?.len();
        let mut pos = len;
        let mut buf: Vec<u8> = Vec::new();
        const STEP: u64 = 64 * 1024;
        while pos > 0 && buf.iter().filter(|b| **b == b'\n').count() <= n {
            let start = pos.saturating_sub(STEP);
            let chunk = read_range(&mut file, start, pos).map_err(|e| self.io(e))?;
            let mut joined = chunk;
            joined.extend_from_slice(&buf);
            buf = joined;
            pos = start;
        }
        let text = String::from_utf8_lossy(&buf);
        let mut lines: Vec<&str> = text.split('\n').collect();
        // Drop a partial first line when we did not read from byte 0, and the
        // empty string after the final newline (or a torn tail).
        if pos > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        // The last piece is "" after a final newline, or a torn line: drop it.
        let complete = &lines[..lines.len().saturating_sub(1)];
        let skip = complete.len().saturating_sub(n);
        Ok(complete[skip..]
            .iter()
            .filter_map(|l| parse_entry(l.to_string()))
            .collect())
    }
}

/// Render one line in canonical order: v, seq, ts, event, fields..., prev.
fn render_line(seq: u64, ts: &chrono::DateTime<chrono::Utc>, event: &str, fields: &Value, prev: &[u8; 32]) -> String {
    let mut s = String::with_capacity(256);
    s.push_str("{\"v\":1,\"seq\":");
    s.push_str(&seq.to_string());
    s.push_str(",\"ts\":\"");
    s.push_str(&ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    s.push_str("\",\"event\":");
    s.push_str(&serde_json::to_string(event).expect("strings serialise"));
    if let Value::Object(map) = fields {
        for (k, v) in map {
            if matches!(k.as_str(), "v" | "seq" | "ts" | "event" | "prev") {
                continue;
            }
            s.push(',');
            s.push_str(&serde_json::to_string(k).expect("strings serialise"));
            s.push(':');
            s.push_str(&serde_json::to_string(v).expect("values serialise"));
        }
    }
    s.push_str(",\"prev\":\"");
    s.push_str(&hex::encode(prev));
    s.push_str("\"}");
    s
}

/// Read `seq` and `prev` from a line by their fixed positions.
fn parse_link(line: &[u8]) -> Option<(u64, [u8; 32])> {
    let rest = line.strip_prefix(LINE_PREFIX)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let seq: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    if line.len() < LINE_PREFIX.len() + digits + PREV_SUFFIX_LEN {
        return None;
    }
    let suffix = &line[line.len() - PREV_SUFFIX_LEN..];
    let hexpart = suffix.strip_prefix(b"\"prev\":\"")?;
    let hexpart = hexpart.strip_suffix(b"\"}")?;
    let mut prev = [0u8; 32];
    hex::decode_to_slice(hexpart, &mut prev).ok()?;
    Some((seq, prev))
}

fn extract_str(line: &[u8], key: &str) -> Option<String> {
    let v: Value = serde_json::from_slice(line).ok()?;
    v.get(key)?.as_str().map(str::to_string)
}

/// Parse one log line into an [`Entry`] (None if it is not an audit line).
pub fn parse_line(line: &str) -> Option<Entry> {
    parse_entry(line.to_string())
}

fn parse_entry(line: String) -> Option<Entry> {
    let Value::Object(raw) = serde_json::from_str(&line).ok()? else {
        return None;
    };
    Some(Entry {
        seq: raw.get("seq")?.as_u64()?,
        ts: raw.get("ts")?.as_str()?.to_string(),
        event: raw.get("event")?.as_str()?.to_string(),
        raw,
        line,
    })
}

fn read_range(file: &mut File, start: u64, end: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; end.saturating_sub(start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut buf)?;
    Ok(buf)
}

/// Open the log for appending lines as another process would, for tests that
/// simulate crashes. Not part of the normal API.
#[doc(hidden)]
pub fn raw_append_for_tests(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().append(true).open(path)?;
    f.write_all(bytes)
}

/// Write a brand-new log (genesis, then `events`, each with the timestamp
/// given) and its head in one buffered pass, chained exactly as appends are.
/// For tests and benchmarks that need backdated or very long histories; the
/// product never writes timestamps it did not read from the clock. Refuses to
/// touch an existing log.
#[doc(hidden)]
pub fn write_backdated_log_for_tests<I>(paths: &Paths, events: I) -> Result<Head, AuditError>
where
    I: IntoIterator<Item = (chrono::DateTime<chrono::Utc>, String, Value)>,
{
    let log = AuditLog::new(paths);
    let io = |e| log.io(e);
    fsutil::ensure_private_dir(&log.dir).map_err(io)?;
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(fsutil::FILE_MODE)
            .open(&log.log)
            .map_err(io)?
    };
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    let mut events = events.into_iter().peekable();
    let genesis_ts = events.peek().map(|e| e.0).unwrap_or_else(chrono::Utc::now);
    let log_id = hex::encode(rand::random::<[u8; 16]>());
    let genesis = serde_json::json!({ "log_id": log_id });
    let mut prev = ZERO_HASH;
    let (mut seq, mut start, mut len) = (0u64, 0u64, 0u64);
    let mut emit = |seq: u64, ts: &chrono::DateTime<chrono::Utc>, event: &str, fields: &Value| {
        let line = render_line(seq, ts, event, fields, &prev);
        prev = Sha256::digest(line.as_bytes()).into();
        start = len;
        len += line.len() as u64 + 1;
        out.write_all(line.as_bytes()).and_then(|_| out.write_all(b"\n"))
    };
    emit(0, &genesis_ts, "log.genesis", &genesis).map_err(io)?;
    for (ts, event, fields) in events {
        seq += 1;
        emit(seq, &ts, &event, &fields).map_err(io)?;
    }
    out.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    let head = Head {
        log_id,
        seq,
        hash: hex::encode(prev),
        last_start: start,
        len,
    };
    log.write_head(&head)?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::in_one_dir(dir.path().to_path_buf());
        (dir, AuditLog::new(&paths))
    }

    #[test]
    fn lines_have_fixed_prefix_and_suffix() {
        let line = render_line(7, &chrono::Utc::now(), "x.y", &serde_json::json!({"a":1}), &[0xab; 32]);
        let (seq, prev) = parse_link(line.as_bytes()).unwrap();
        assert_eq!(seq, 7);
        assert_eq!(prev, [0xab; 32]);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn append_and_verify() {
        let (_d, log) = log();
        for i in 0..10 {
            log.append("test.event", serde_json::json!({ "i": i })).unwrap();
        }
        let rep = log.verify().unwrap();
        assert!(rep.ok, "{:?}", rep.problems);
        assert_eq!(rep.events, 11);
        assert_eq!(log.read_head().unwrap().unwrap().seq, 10);
    }

    #[test]
    fn torn_tail_is_recovered_as_a_chained_event() {
        let (_d, log) = log();
        log.append("a", Value::Null).unwrap();
        raw_append_for_tests(log.log_path(), b"{\"v\":1,\"seq\":2,\"ts\":\"20").unwrap();
        assert!(!log.verify().unwrap().ok);
        log.append("b", Value::Null).unwrap();
        let rep = log.verify().unwrap();
        assert!(rep.ok, "{:?}", rep.problems);
        assert_eq!(rep.recoveries, 1);
        let events: Vec<String> = log.entries().unwrap().map(|e| e.event).collect();
        assert_eq!(events, ["log.genesis", "a", "log.recovered", "b"]);
    }

    #[test]
    fn edits_are_detected_and_block_appends() {
        let (_d, log) = log();
        for _ in 0..3 {
            log.append("a", serde_json::json!({"n": 1})).unwrap();
        }
        let text = fs::read_to_string(log.log_path()).unwrap();
        fs::write(log.log_path(), text.replacen("\"n\":1", "\"n\":2", 1)).unwrap();
        let rep = log.verify().unwrap();
        assert!(!rep.ok);
        // Editing the *last* line is caught on append too.
        let (_d2, log2) = self::log();
        log2.append("a", serde_json::json!({"n": 1})).unwrap();
        let text = fs::read_to_string(log2.log_path()).unwrap();
        fs::write(log2.log_path(), text.replacen("\"n\":1", "\"n\":9", 1)).unwrap();
        assert!(matches!(log2.append("b", Value::Null), Err(AuditError::Integrity(_))));
    }

    #[test]
    fn tail_reads_last_lines() {
        let (_d, log) = log();
        for i in 0..100 {
            log.append("t", serde_json::json!({ "i": i })).unwrap();
        }
        let t = log.tail(3).unwrap();
        assert_eq!(t.iter().map(|e| e.seq).collect::<Vec<_>>(), [98, 99, 100]);
    }
}
