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

use crate::fsutil::{self, FileLock};
use crate::paths::Paths;

mod anchor;
pub mod error;
mod event;
pub use anchor::Cosignature;
pub use error::AuditError;
pub use event::Event;

/// Format version written in every line.
pub const LOG_VERSION: u32 = 1;
const ZERO_HASH: [u8; 32] = [0; 32];
/// `"prev":"` + 64 hex + `"}`: the fixed suffix of every line.
const PREV_SUFFIX_LEN: usize = 8 + 64 + 2;
const LINE_PREFIX: &[u8] = b"{\"v\":1,\"seq\":";

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
    /// The log file as our last append left it. Any other write (an edit
    /// anywhere in the file) changes its ctime, and the next append or
    /// quick check then walks the whole chain instead of trusting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileStamp>,
}

/// Identity and change time of `audit.jsonl` (`stat`: device, inode, ctime).
/// ctime cannot be set by a user process: every write or metadata change
/// moves it to the current time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub ctime: i64,
    pub ctime_nsec: i64,
    pub len: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            len: meta.len(),
        }
    }
}

/// `audit.checkpoint`: a point of the chain that was walked and found
/// sound, signed with the node's Ed25519 key when it has one
/// (docs/FORMAT.md, "Audit checkpoints").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub v: u32,
    pub log_id: String,
    pub seq: u64,
    /// Hex SHA-256 of line `seq`.
    pub hash: String,
    /// Byte offset where line `seq` starts.
    pub offset: u64,
    pub ts: String,
    /// Signer's node id, public key (hex) and signature (hex) over
    /// [`Checkpoint::signed_text`]; all absent when the node had no key.
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub sig: Option<String>,
}

impl Checkpoint {
    /// The exact bytes signed: a small text note, one field per line.
    pub fn signed_text(&self) -> String {
        format!(
            "claude-max-market audit checkpoint v1\nlog {}\nseq {}\nhash {}\noffset {}\nts {}\n",
            self.log_id, self.seq, self.hash, self.offset, self.ts
        )
    }

    /// Does the signature verify under the key it names? (`None`: unsigned.)
    pub fn signature_valid(&self) -> Option<bool> {
        let (key, sig) = (self.key.as_deref()?, self.sig.as_deref()?);
        let mut k = [0u8; 32];
        let mut s = [0u8; 64];
        if hex::decode_to_slice(key, &mut k).is_err() || hex::decode_to_slice(sig, &mut s).is_err() {
            return Some(false);
        }
        let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&k) else {
            return Some(false);
        };
        let sig = ed25519_dalek::Signature::from_bytes(&s);
        Some(vk.verify_strict(self.signed_text().as_bytes(), &sig).is_ok())
    }
}

/// Every this many events an append walks the chain from the last
/// checkpoint to the head and writes a new one (O(this) per checkpoint).
pub const CHECKPOINT_EVERY: u64 = 256;

/// What `verify` says about the last checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointReport {
    pub seq: u64,
    pub hash: String,
    pub ts: String,
    pub signed: bool,
    pub node_id: Option<String>,
    /// The signing key is one of this node's keys (current or retired).
    pub own_key: bool,
}

/// What `audit verify` found: the walk, the checkpoint it signed (if the
/// chain is sound) and why recovery failed, if it did.
#[derive(Debug, Clone)]
pub struct Checked {
    pub report: VerifyReport,
    pub checkpoint: Option<Checkpoint>,
    pub recovery: Option<String>,
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
    /// The last checkpoint the log was checked against (before this walk).
    pub checkpoint: Option<CheckpointReport>,
    /// Witness cosignatures (`audit anchor`) of this log that were checked.
    pub anchors: u64,
    pub last_anchor: Option<Cosignature>,
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
    checkpoint: PathBuf,
    anchors: PathBuf,
    paths: Paths,
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
    /// The kind of event, when this build knows its name.
    pub fn kind(&self) -> Option<Event> {
        Event::parse(&self.event)
    }

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
            checkpoint: paths.data_dir.join("audit.checkpoint"),
            anchors: paths.data_dir.join("audit.anchors"),
            paths: paths.clone(),
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
    pub fn append(&self, event: Event, fields: Value) -> Result<u64, AuditError> {
        Ok(self.append_many(&[(event, fields)])?.1)
    }

    /// Append several events under one lock (used by recovery and imports).
    /// Returns the first and last sequence numbers written.
    pub fn append_many(&self, events: &[(Event, Value)]) -> Result<(u64, u64), AuditError> {
        fsutil::ensure_private_dir(&self.dir).map_err(|e| self.io(e))?;
        let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
        let mut file = fsutil::open_append(&self.log).map_err(|e| self.io(e))?;
        let mut head = self.settle_tail(&mut file)?;
        let mut first = None;
        for (event, fields) in events {
            let (h, seq) = self.write_line(&mut file, head.as_ref(), event.name(), fields)?;
            first.get_or_insert(seq);
            head = Some(h);
        }
        let last = head.as_ref().map(|h| h.seq).unwrap_or(0);
        Ok((first.unwrap_or(last), last))
    }

    /// Under the lock: make the file and head agree, recovering a crash's
    /// leftovers, or fail on corruption. Returns the head to chain onto.
    fn settle_tail(&self, file: &mut File) -> Result<Option<Head>, AuditError> {
        let meta = file.metadata().map_err(|e| self.io(e))?;
        let len = meta.len();
        let head = self.read_head()?;
        let Some(head) = head else {
            if len == 0 {
                // A missing log is a new log only if nothing shows there was one.
                self.refuse_fresh_start()?;
                return self.genesis(file, serde_json::json!({})).map(Some);
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
        // Something other than our own appends wrote the file since the
        // head was written (an edit anywhere changes its ctime), or the head
        // predates stamps: trust nothing, walk the chain up to the head.
        let walked = head.file.as_ref() != Some(&FileStamp::of(&meta));
        if walked {
            self.check_chain_to(file, &head)?;
        }
        if len == head.len {
            let head = if walked {
                let h = Head {
                    file: Some(FileStamp::of(&meta)),
                    ..head
                };
                self.write_head(&h)?;
                h
            } else {
                head
            };
            self.maybe_checkpoint(file, &head, walked)?;
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
                file: None,
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
        self.write_line(file, Some(head), Event::LogRecovered.name(), &fields)?;
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
        let stamp = FileStamp::of(&file.metadata().map_err(|e| self.io(e))?);
        let head = Head {
            log_id: log_id.to_string(),
            seq,
            hash: hex::encode(Sha256::digest(line.as_bytes())),
            last_start: start,
            len: start + bytes.len() as u64,
            file: Some(stamp),
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
                // No log: fine on a new install, not where one existed.
                _ => self.refuse_fresh_start().map(|_| None),
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
        // Written by something other than our appends since: walk it, and
        // record the new stamp under the lock so the walk happens once per
        // outside write, not on every `status`. Read-only if the lock or the
        // head cannot be written (a read-only data directory).
        let meta = file.metadata().map_err(|e| self.io(e))?;
        if head.file.as_ref() != Some(&FileStamp::of(&meta)) {
            match self.recover() {
                Ok(()) => return self.read_head(),
                Err(AuditError::Io { .. }) => self.check_chain_to(&mut file, &head)?,
                Err(e) => return Err(e),
            }
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

    /// Walk the whole chain and compare its end with `audit.head`, and check
    /// that the log extends the last checkpoint (and that its signature, if
    /// any, is this node's).
    ///
    /// Hot loop: per line, one SHA-256 and two fixed-position field reads
    /// (`seq` is right after the fixed prefix, `prev` is the fixed suffix);
    /// no JSON parse, so throughput is bounded by hashing.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        // Head and log are read under the writers' lock (shared), so a line
        // another process is appending meanwhile is never seen without its
        // head, which would read as a broken chain. (A home this user cannot
        // write to is read without it: nobody can be appending there.)
        let _lock = if self.log.exists() {
            FileLock::shared(&self.lock).ok()
        } else {
            None
        };
        let mut rep = VerifyReport {
            ok: true,
            events: 0,
            bytes: 0,
            log_id: None,
            head_seq: None,
            recoveries: 0,
            checkpoint: None,
            anchors: 0,
            last_anchor: None,
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
        let cp = match self.read_checkpoint() {
            Ok(c) => c,
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
                if let Err(e) = self.refuse_fresh_start() {
                    rep.problems.push(e.to_string());
                }
                rep.ok = rep.problems.is_empty();
                return Ok(rep);
            }
            Err(e) => return Err(self.io(e)),
        };
        let anchors = self.read_anchors().unwrap_or_else(|e| {
            rep.problems.push(e.to_string());
            vec![]
        });
        let mut marks: Vec<u64> = anchors.iter().map(|a| a.seq).collect();
        marks.extend(cp.as_ref().map(|c| c.seq));
        let w = walk(&file, 0, None, None, &marks).map_err(|e| self.io(e))?;
        rep.events = w.events;
        rep.bytes = w.bytes;
        rep.log_id = w.log_id.clone();
        rep.recoveries = w.recoveries;
        let prev = w.last_hash;
        let last_start = w.last_start;
        if let Some(b) = w.first_bad.clone() {
            rep.problems.push(b);
        }
        rep.problems
            .extend(head_problems(head.as_ref(), &rep, prev, last_start));
        if let Some(c) = &cp {
            let (report, problems) = self.check_checkpoint(c, &w);
            rep.checkpoint = Some(report);
            rep.problems.extend(problems);
        }
        let (counted, problems) = anchor_problems(&anchors, &w);
        rep.problems.extend(problems);
        rep.anchors = counted.len() as u64;
        rep.last_anchor = counted.last().cloned();
        rep.ok = rep.problems.is_empty();
        Ok(rep)
    }

    /// `audit verify` whole: settle a crash's torn tail first (itself a
    /// chained event), then [`verify_and_checkpoint`](Self::verify_and_checkpoint).
    /// A real break is in the report with its details; a failed recovery is
    /// returned beside it, as one more thing to show.
    pub fn check(&self) -> Result<Checked, AuditError> {
        let recovery = self.recover().err().map(|e| e.to_string());
        let (report, checkpoint) = self.verify_and_checkpoint()?;
        Ok(Checked {
            report,
            checkpoint,
            recovery,
        })
    }

    /// `audit verify`: [`verify`](Self::verify), then, if the chain is sound,
    /// sign a new checkpoint at the head (the report names the one checked).
    pub fn verify_and_checkpoint(&self) -> Result<(VerifyReport, Option<Checkpoint>), AuditError> {
        let rep = self.verify()?;
        if !rep.ok || rep.events == 0 {
            return Ok((rep, None));
        }
        let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
        let mut file = fsutil::open_append(&self.log).map_err(|e| self.io(e))?;
        let Some(head) = self.settle_tail(&mut file)? else {
            return Ok((rep, None));
        };
        let cp = self.write_checkpoint(&head)?;
        Ok((rep, Some(cp)))
    }

    /// After the node's keys changed: check the chain from the last
    /// checkpoint to the head and sign a new checkpoint with the current key.
    pub fn resign_checkpoint(&self) -> Result<(), AuditError> {
        if !self.log.exists() {
            return Ok(());
        }
        let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
        let mut file = fsutil::open_append(&self.log).map_err(|e| self.io(e))?;
        let Some(head) = self.settle_tail(&mut file)? else {
            return Ok(());
        };
        match self.read_checkpoint()? {
            Some(c) => self.check_segment(&file, &c, &head)?,
            None => self.check_chain_to(&mut file, &head)?,
        }
        self.write_checkpoint(&head).map(|_| ())
    }

    /// Compare a checkpoint with a full walk: the log must extend it, and
    /// its signature must be valid and this node's.
    fn check_checkpoint(&self, c: &Checkpoint, w: &Walk) -> (CheckpointReport, Vec<String>) {
        let mut problems = Vec::new();
        let own = own_public_keys(&self.paths);
        let own_key = c.key.as_ref().is_some_and(|k| own.contains(k));
        let report = CheckpointReport {
            seq: c.seq,
            hash: c.hash.clone(),
            ts: c.ts.clone(),
            signed: c.sig.is_some(),
            node_id: c.node_id.clone(),
            own_key,
        };
        if w.log_id.as_deref().is_some_and(|id| id != c.log_id) {
            problems.push(format!(
                "the log's id is {} but the last checkpoint (seq {}, {}) is of log {}: the log was replaced",
                w.log_id.as_deref().unwrap_or("-"),
                c.seq,
                c.ts,
                c.log_id
            ));
        } else if !w.marks.contains_key(&c.seq) {
            problems.push(format!(
                "the log ends before the last checkpoint (seq {}, {}): truncated or replaced",
                c.seq, c.ts
            ));
        } else if w.marks.get(&c.seq) != Some(&(hash_bytes(&c.hash), c.offset)) {
            problems.push(format!(
                "line {} differs from the last checkpoint (signed {}): the log was rewritten",
                c.seq, c.ts
            ));
        }
        match c.signature_valid() {
            Some(false) => problems.push(format!("the checkpoint at seq {} has an invalid signature", c.seq)),
            Some(true) if !own_key => problems.push(format!(
                "the checkpoint at seq {} is signed by node {}, which is not one of this node's keys",
                c.seq,
                c.node_id.as_deref().unwrap_or("?")
            )),
            Some(true) => {}
            None => {
                // Unsigned is fine only if the node had no key at the time.
                let created = crate::crypto::keys::current_key_created(&self.paths).ok().flatten();
                let at = chrono::DateTime::parse_from_rfc3339(&c.ts).ok();
                if let (Some(k), Some(at)) = (created, at) {
                    if k < at {
                        problems.push(format!(
                            "the checkpoint at seq {} is unsigned although this node had a key then (created {})",
                            c.seq,
                            k.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ));
                    }
                }
            }
        }
        (report, problems)
    }

    /// Witness cosignatures kept by `audit anchor` (`audit.anchors`, one
    /// JSON object per line), oldest first.
    pub fn read_anchors(&self) -> Result<Vec<Cosignature>, AuditError> {
        let text = match fs::read_to_string(&self.anchors) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => {
                return Err(AuditError::Io {
                    path: self.anchors.clone(),
                    source,
                })
            }
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| AuditError::Integrity(format!("{} has a bad line: {e}", self.anchors.display())))
            })
            .collect()
    }

    /// Keep a witness cosignature and record it in the chain.
    pub fn add_anchor(&self, c: &Cosignature) -> Result<u64, AuditError> {
        let ioe = |source| AuditError::Io {
            path: self.anchors.clone(),
            source,
        };
        {
            let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
            let mut f = fsutil::open_append(&self.anchors).map_err(ioe)?;
            let mut line = serde_json::to_vec(c).expect("cosignatures serialise");
            line.push(b'\n');
            f.write_all(&line).map_err(ioe)?;
            f.sync_data().map_err(ioe)?;
        }
        self.append(
            Event::AuditAnchored,
            serde_json::json!({ "seq": c.seq, "hash": c.hash, "witness": c.witness, "time": c.time }),
        )
    }

    /// Read `audit.checkpoint` (None when none was written yet).
    pub fn read_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        match fs::read(&self.checkpoint) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| AuditError::Integrity(format!("{} is unreadable: {e}", self.checkpoint.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AuditError::Io {
                path: self.checkpoint.clone(),
                source,
            }),
        }
    }

    /// Under the lock: record `head` as a checkpoint, signed with the
    /// node's current key when it has one.
    fn write_checkpoint(&self, head: &Head) -> Result<Checkpoint, AuditError> {
        let mut cp = Checkpoint {
            v: 1,
            log_id: head.log_id.clone(),
            seq: head.seq,
            hash: head.hash.clone(),
            offset: head.last_start,
            ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            node_id: None,
            key: None,
            sig: None,
        };
        if let Ok(id) = crate::crypto::keys::Identity::load(&self.paths) {
            let sig = id.sign(cp.signed_text().as_bytes());
            cp.node_id = Some(id.node_id().to_string());
            cp.key = Some(hex::encode(id.current().public_key_bytes()));
            cp.sig = Some(hex::encode(sig.to_bytes()));
        }
        let bytes = serde_json::to_vec_pretty(&cp).expect("checkpoint serialises");
        fsutil::atomic_write(&self.checkpoint, &bytes).map_err(|source| AuditError::Io {
            path: self.checkpoint.clone(),
            source,
        })?;
        Ok(cp)
    }

    /// Under the lock, with `head` settled: every [`CHECKPOINT_EVERY`]
    /// events, walk from the last checkpoint to the head (so every line is
    /// walked once by an appender, not once per append) and write a new one.
    fn maybe_checkpoint(&self, file: &mut File, head: &Head, walked: bool) -> Result<(), AuditError> {
        let cp = self.read_checkpoint()?;
        if let Some(c) = &cp {
            if c.log_id != head.log_id {
                return Err(AuditError::Integrity(format!(
                    "audit.checkpoint is of log {} but the log is {}: the log was replaced",
                    c.log_id, head.log_id
                )));
            }
            if c.seq > head.seq {
                return Err(AuditError::Integrity(format!(
                    "the log ends at seq {} before the last checkpoint (seq {}, {}): truncated",
                    head.seq, c.seq, c.ts
                )));
            }
            if head.seq < c.seq + CHECKPOINT_EVERY && !walked {
                return Ok(());
            }
        }
        if !walked {
            match &cp {
                Some(c) => self.check_segment(file, c, head)?,
                None => self.check_chain_to(file, head)?,
            }
        }
        self.write_checkpoint(head).map(|_| ())
    }

    /// Walk from the checkpoint's line to the head: the checkpoint line is
    /// unchanged and every later line chains onto it.
    fn check_segment(&self, file: &File, c: &Checkpoint, head: &Head) -> Result<(), AuditError> {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&c.hash, &mut hash)
            .map_err(|_| AuditError::Integrity("audit.checkpoint hash is not hex".into()))?;
        let w = walk(file, c.offset, Some(head.len), Some((c.seq, hash)), &[]).map_err(|e| self.io(e))?;
        self.judge(&w, head, &format!("since the checkpoint at seq {}", c.seq))
    }

    /// Walk the whole chain up to the head (bytes beyond it are a crash's
    /// leftovers, settled separately), including the checkpoint check.
    fn check_chain_to(&self, file: &mut File, head: &Head) -> Result<(), AuditError> {
        let cp = self.read_checkpoint()?;
        let marks: Vec<u64> = cp.iter().map(|c| c.seq).collect();
        let w = walk(file, 0, Some(head.len), None, &marks).map_err(|e| self.io(e))?;
        self.judge(&w, head, "")?;
        if let Some(c) = &cp {
            let (_, problems) = self.check_checkpoint(c, &w);
            if let Some(p) = problems.into_iter().next() {
                return Err(AuditError::Integrity(p));
            }
        }
        Ok(())
    }

    fn judge(&self, w: &Walk, head: &Head, scope: &str) -> Result<(), AuditError> {
        if let Some(b) = &w.first_bad {
            return Err(AuditError::Integrity(format!(
                "{b}{}",
                if scope.is_empty() {
                    String::new()
                } else {
                    format!(" ({scope})")
                }
            )));
        }
        if w.next_seq != head.seq + 1 || hex::encode(w.last_hash) != head.hash || w.last_start != head.last_start {
            return Err(AuditError::Integrity(format!(
                "the chain does not end at audit.head (seq {}){}: edited, truncated or replaced",
                head.seq,
                if scope.is_empty() {
                    String::new()
                } else {
                    format!(" {scope}")
                }
            )));
        }
        Ok(())
    }

    /// A log is new only when nothing shows there was one: a checkpoint or
    /// this node's keys (whose creation is itself an audited event).
    fn refuse_fresh_start(&self) -> Result<(), AuditError> {
        if let Some(c) = self.read_checkpoint()? {
            return Err(AuditError::Missing(format!(
                "audit.jsonl and audit.head are gone, but audit.checkpoint shows log {} with {} events (checked {})",
                c.log_id,
                c.seq + 1,
                c.ts
            )));
        }
        if let Ok(Some(created)) = crate::crypto::keys::current_key_created(&self.paths) {
            return Err(AuditError::Missing(format!(
                "audit.jsonl and audit.head are gone, but this node has keys (created {}), so it had a log",
                created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )));
        }
        Ok(())
    }

    /// Write `log.genesis` (with `extra` fields) into an empty file, and a
    /// first checkpoint at it.
    fn genesis(&self, file: &mut File, extra: Value) -> Result<Head, AuditError> {
        let log_id = hex::encode(rand::random::<[u8; 16]>());
        let mut fields = Map::new();
        fields.insert("log_id".into(), Value::String(log_id.clone()));
        if let Value::Object(m) = extra {
            fields.extend(m);
        }
        let (h, _) = self.write_line_raw(
            file,
            &log_id,
            0,
            ZERO_HASH,
            0,
            Event::LogGenesis.name(),
            &Value::Object(fields),
        )?;
        self.write_checkpoint(&h)?;
        Ok(h)
    }

    /// `audit restart`: start a new log on purpose after the old one was
    /// lost. Its genesis records what the old checkpoint said, the old
    /// checkpoint is kept as `audit.checkpoint.<old log id>`, and the node's
    /// keys no longer block. Refused while a log or head exists.
    pub fn restart(&self, reason: &str) -> Result<Head, AuditError> {
        fsutil::ensure_private_dir(&self.dir).map_err(|e| self.io(e))?;
        let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
        let mut file = fsutil::open_append(&self.log).map_err(|e| self.io(e))?;
        if file.metadata().map_err(|e| self.io(e))?.len() > 0 || self.read_head()?.is_some() {
            return Err(AuditError::Integrity(
                "the log or its head still exists; `audit restart` only replaces a log that is gone".into(),
            ));
        }
        let old = self.read_checkpoint().ok().flatten();
        if let Some(c) = &old {
            let aside = self.dir.join(format!("audit.checkpoint.{}", c.log_id));
            fs::rename(&self.checkpoint, &aside).map_err(|e| self.io(e))?;
        }
        let extra = serde_json::json!({
            "restart": {
                "reason": reason,
                "previous_log_id": old.as_ref().map(|c| c.log_id.clone()),
                "previous_seq": old.as_ref().map(|c| c.seq),
                "previous_hash": old.as_ref().map(|c| c.hash.clone()),
            }
        });
        self.genesis(&mut file, extra)
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

/// Result of walking part of the chain.
#[derive(Debug, Default)]
struct Walk {
    /// Lines read (complete or not).
    events: u64,
    /// Bytes read.
    bytes: u64,
    last_hash: [u8; 32],
    last_start: u64,
    next_seq: u64,
    log_id: Option<String>,
    recoveries: u64,
    first_bad: Option<String>,
    /// Hash and start of the lines whose seq was asked for, if reached.
    marks: std::collections::HashMap<u64, ([u8; 32], u64)>,
}

/// Walk lines from byte `from` up to `to` (or the end). With `start`, the
/// first line must be `(seq, hash)` (a checkpoint) and later lines chain
/// onto it; without, the walk starts at genesis.
fn walk(file: &File, from: u64, to: Option<u64>, start: Option<(u64, [u8; 32])>, marks: &[u64]) -> io::Result<Walk> {
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(from))?;
    let limit = to.map(|t| t.saturating_sub(from)).unwrap_or(u64::MAX);
    let mut reader = BufReader::with_capacity(1 << 20, f.take(limit));
    let mut w = Walk {
        next_seq: start.map(|s| s.0).unwrap_or(0),
        ..Walk::default()
    };
    let mut prev = ZERO_HASH;
    let mut line = Vec::with_capacity(1024);
    let mut offset = from;
    let mut first = true;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            w.first_bad
                .get_or_insert_with(|| format!("torn last line at byte {offset} ({n} bytes without a newline)"));
            offset += n as u64;
            w.events += 1;
            break;
        }
        let body = &line[..n - 1];
        let hash: [u8; 32] = Sha256::digest(body).into();
        let expected_seq = w.next_seq;
        match parse_link(body) {
            Some((seq, p)) => {
                if seq != expected_seq && w.first_bad.is_none() {
                    w.first_bad = Some(if seq < expected_seq {
                        format!(
                            "line at byte {offset} has seq {seq}, expected {expected_seq} (reordered or duplicated)"
                        )
                    } else {
                        format!(
                            "seq jumps from {} to {seq} at byte {offset} (lines deleted)",
                            expected_seq.wrapping_sub(1)
                        )
                    });
                }
                match (first, start) {
                    (true, Some((_, want))) => {
                        if hash != want && w.first_bad.is_none() {
                            w.first_bad = Some(format!("line seq {seq} no longer matches the checkpoint (edited)"));
                        }
                    }
                    _ => {
                        if p != prev && w.first_bad.is_none() {
                            w.first_bad = Some(format!(
                                "line seq {seq} does not chain onto the line before it (an earlier line was edited, or lines were reordered)"
                            ));
                        }
                    }
                }
                if seq == 0 {
                    w.log_id = extract_str(body, "log_id");
                }
                if body.windows(15).any(|x| x == b"\"log.recovered\"") {
                    w.recoveries += 1;
                }
                if seq == expected_seq && marks.contains(&seq) {
                    w.marks.insert(seq, (hash, offset));
                }
                w.next_seq = seq + 1;
            }
            None => {
                w.first_bad
                    .get_or_insert_with(|| format!("line at byte {offset} is not an audit line"));
                w.next_seq += 1;
            }
        }
        first = false;
        prev = hash;
        w.last_start = offset;
        offset += n as u64;
        w.events += 1;
    }
    w.last_hash = prev;
    w.bytes = offset - from;
    Ok(w)
}

fn hash_bytes(hexs: &str) -> [u8; 32] {
    let mut h = [0u8; 32];
    let _ = hex::decode_to_slice(hexs, &mut h);
    h
}

/// Hex public signing keys of this node (current and retired); empty
/// when it has none.
fn own_public_keys(paths: &Paths) -> Vec<String> {
    crate::crypto::keys::Identity::load(paths)
        .map(|id| {
            id.decryption_keys()
                .map(|k| hex::encode(k.public_key_bytes()))
                .collect()
        })
        .unwrap_or_default()
}

/// Does `audit.head` agree with the walked log (`rep`, its last line's
/// hash `prev` and start offset)?
fn head_problems(head: Option<&Head>, rep: &VerifyReport, prev: [u8; 32], last_start: u64) -> Vec<String> {
    let mut problems = Vec::new();
    match head {
        Some(h) => {
            if rep.events == 0 {
                problems.push("audit.head names lines the log no longer has (truncated)".into());
            } else if h.seq + 1 < rep.events {
                problems.push(format!(
                    "log has {} lines beyond audit.head (seq {}) — an unrecovered crash or lines added outside the tool",
                    rep.events - 1 - h.seq,
                    h.seq
                ));
            } else if h.seq + 1 > rep.events {
                problems.push(format!(
                    "audit.head is at seq {} but the log ends at seq {} (truncated)",
                    h.seq,
                    rep.events - 1
                ));
            } else if hex::encode(prev) != h.hash || h.last_start != last_start {
                problems.push(format!(
                    "last line (seq {}) does not match audit.head (edited or replaced)",
                    h.seq
                ));
            }
        }
        None if rep.events > 0 && rep.problems.is_empty() && problems.is_empty() => {
            problems.push("audit.head is missing".into());
        }
        None => {}
    }
    problems
}

/// The validly signed anchors of this log (`w`), and the problems found:
/// an invalid witness signature (not counted), or a line that differs from
/// what the witness cosigned. Anchors of an earlier log (before
/// `audit restart`) are skipped.
fn anchor_problems(anchors: &[Cosignature], w: &Walk) -> (Vec<Cosignature>, Vec<String>) {
    let mut counted = Vec::new();
    let mut problems = Vec::new();
    for a in anchors {
        if Some(&a.log_id) != w.log_id.as_ref() {
            continue; // an anchor of an earlier log (before `audit restart`)
        }
        if !a.valid() {
            problems.push(format!(
                "the anchor of seq {} ({}) has an invalid witness signature",
                a.seq, a.time
            ));
            continue;
        }
        match w.marks.get(&a.seq) {
            Some((h, _)) if hex::encode(h) == a.hash => {}
            _ => problems.push(format!(
                "line {} differs from what witness {} cosigned at {}: the log was rewritten since",
                a.seq,
                &a.witness[..16.min(a.witness.len())],
                a.time
            )),
        }
        counted.push(a.clone());
    }
    (counted, problems)
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
    emit(0, &genesis_ts, Event::LogGenesis.name(), &genesis).map_err(io)?;
    for (ts, event, fields) in events {
        seq += 1;
        emit(seq, &ts, &event, &fields).map_err(io)?;
    }
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let head = Head {
        log_id,
        seq,
        hash: hex::encode(prev),
        last_start: start,
        len,
        file: Some(FileStamp::of(&file.metadata().map_err(io)?)),
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
            log.append(Event::ConfigChanged, serde_json::json!({ "i": i })).unwrap();
        }
        let rep = log.verify().unwrap();
        assert!(rep.ok, "{:?}", rep.problems);
        assert_eq!(rep.events, 11);
        assert_eq!(log.read_head().unwrap().unwrap().seq, 10);
    }

    #[test]
    fn torn_tail_is_recovered_as_a_chained_event() {
        let (_d, log) = log();
        log.append(Event::ConfigChanged, Value::Null).unwrap();
        raw_append_for_tests(log.log_path(), b"{\"v\":1,\"seq\":2,\"ts\":\"20").unwrap();
        assert!(!log.verify().unwrap().ok);
        log.append(Event::KeyCreated, Value::Null).unwrap();
        let rep = log.verify().unwrap();
        assert!(rep.ok, "{:?}", rep.problems);
        assert_eq!(rep.recoveries, 1);
        let events: Vec<String> = log.entries().unwrap().map(|e| e.event).collect();
        assert_eq!(
            events,
            ["log.genesis", "config.changed", "log.recovered", "key.created"]
        );
    }

    #[test]
    fn edits_are_detected_and_block_appends() {
        let (_d, log) = log();
        for _ in 0..3 {
            log.append(Event::ConfigChanged, serde_json::json!({"n": 1})).unwrap();
        }
        let text = fs::read_to_string(log.log_path()).unwrap();
        fs::write(log.log_path(), text.replacen("\"n\":1", "\"n\":2", 1)).unwrap();
        let rep = log.verify().unwrap();
        assert!(!rep.ok);
        // Editing the *last* line is caught on append too.
        let (_d2, log2) = self::log();
        log2.append(Event::ConfigChanged, serde_json::json!({"n": 1})).unwrap();
        let text = fs::read_to_string(log2.log_path()).unwrap();
        fs::write(log2.log_path(), text.replacen("\"n\":1", "\"n\":9", 1)).unwrap();
        assert!(matches!(
            log2.append(Event::KeyCreated, Value::Null),
            Err(AuditError::Integrity(_))
        ));
    }

    /// Same-length edit of line `n` (one digit of its timestamp).
    fn edit_line(log: &AuditLog, n: usize) {
        let text = fs::read_to_string(log.log_path()).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let at = lines[n].find("\"ts\":\"").unwrap() + 6 + 21;
        let mut b = lines[n].clone().into_bytes();
        b[at] = if b[at] == b'1' { b'2' } else { b'1' };
        lines[n] = String::from_utf8(b).unwrap();
        fs::write(log.log_path(), lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn an_outside_write_anywhere_makes_the_next_append_walk_and_refuse() {
        let (_d, log) = log();
        for i in 0..10 {
            log.append(Event::ConfigChanged, serde_json::json!({ "i": i })).unwrap();
        }
        edit_line(&log, 3);
        assert!(matches!(
            log.append(Event::KeyCreated, Value::Null),
            Err(AuditError::Integrity(_))
        ));
        assert!(matches!(log.quick_check(), Err(AuditError::Integrity(_))));
    }

    #[test]
    fn a_head_without_a_stamp_is_walked_once_and_stamped() {
        let (_d, log) = log();
        for _ in 0..5 {
            log.append(Event::ConfigChanged, Value::Null).unwrap();
        }
        let mut head = log.read_head().unwrap().unwrap();
        head.file = None;
        log.write_head(&head).unwrap();
        assert!(log.quick_check().unwrap().unwrap().file.is_some());
        assert!(log.read_head().unwrap().unwrap().file.is_some());
    }

    #[test]
    fn checkpoints_advance_every_n_events() {
        let (_d, log) = log();
        log.append(Event::ConfigChanged, Value::Null).unwrap();
        assert_eq!(
            log.read_checkpoint().unwrap().unwrap().seq,
            0,
            "genesis is checkpointed"
        );
        for i in 1..(2 * CHECKPOINT_EVERY + 50) {
            log.append(Event::ConfigChanged, serde_json::json!({ "i": i })).unwrap();
        }
        let cp = log.read_checkpoint().unwrap().unwrap();
        assert_eq!(cp.seq, 2 * CHECKPOINT_EVERY);
        assert_eq!(cp.signature_valid(), None, "no keys: unsigned");
        assert!(log.verify().unwrap().ok);
    }

    #[test]
    fn an_edit_that_forges_the_stamp_is_caught_at_the_next_checkpoint() {
        let (_d, log) = log();
        for i in 0..100 {
            log.append(Event::ConfigChanged, serde_json::json!({ "i": i })).unwrap();
        }
        edit_line(&log, 50);
        // Forge the stamp so appends do not notice the outside write.
        let mut head = log.read_head().unwrap().unwrap();
        head.file = Some(FileStamp::of(&fs::metadata(log.log_path()).unwrap()));
        log.write_head(&head).unwrap();
        let refused = (0..CHECKPOINT_EVERY)
            .map(|i| log.append(Event::KeyCreated, serde_json::json!({ "i": i })))
            .position(|r| matches!(r, Err(AuditError::Integrity(_))));
        assert_eq!(
            // The head is at seq 100 + i when the i-th of these appends settles.
            refused.map(|i| i as u64 + 100),
            Some(CHECKPOINT_EVERY),
            "the append at the checkpoint boundary walks from the last checkpoint and refuses"
        );
    }

    #[test]
    fn tail_reads_last_lines() {
        let (_d, log) = log();
        for i in 0..100 {
            log.append(Event::ConfigChanged, serde_json::json!({ "i": i })).unwrap();
        }
        let t = log.tail(3).unwrap();
        assert_eq!(t.iter().map(|e| e.seq).collect::<Vec<_>>(), [98, 99, 100]);
    }
}
