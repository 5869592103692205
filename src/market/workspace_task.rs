//! Market tasks that carry a workspace: what travels and how each side
//! checks it.
//!
//! The payload of such a task is a **bundle**: the prompt and the
//! requester's workspace (DIR selected by the same rules as `execute
//! --workspace`, as a tar), sealed together to the lease holder, so the
//! coordinator sees only the bundle's hash and size. The provider unpacks
//! the tar into a fresh directory of its own (as untrusted input), runs the
//! job there through the local pipeline, and sends back a **delta**: the
//! new content of every changed path and what was removed, inside the
//! result it signs with task, attempt and payload hash.
//!
//! The requester never trusts the provider's patch text: it rebuilds the
//! job's tree from its own snapshot plus the delta, computes its own change
//! set from that, runs its acceptance command on the rebuilt copy in a
//! hardened container with no network and no credential, and pays only if
//! the command exits 0. `--apply` writes the change set into DIR only if DIR
//! has not changed since the bid.
//!
//! This module must not talk to the coordinator or settle anything: it
//! builds and checks bytes and answers with a [`Verdict`]; the requester and
//! the provider's lease decide what to send.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::Config;
use crate::job::acceptance::{self, AcceptOutcome, AcceptSpec};
use crate::job::Cancel;
use crate::paths::Paths;
use crate::workspace::{self, Applied, ChangeSet, DiffRules, Rules, Snapshot};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The first line of a bundle.
const MAGIC: &[u8] = b"cmm-task/1\n";

/// The largest delta a provider sends back: the result must fit in one
/// `deliver` frame (4 MiB by default) after encryption and two base64
/// encodings.
pub const MAX_DELTA_BYTES: u64 = 2 * 1024 * 1024;

/// Most files a received workspace may unpack to.
pub const MAX_FILES: u64 = 100_000;

/// How many lines of the acceptance command's output a rejection carries.
pub const REASON_LINES: usize = 20;

/// The most bytes of reason text a rejection carries (it travels in a
/// control frame, sealed).
pub const MAX_REASON_BYTES: usize = 2048;

/// The permission modes that let a job change nothing without asking:
/// every provider allows them. Others must be listed in
/// `market.permissionModes`.
pub const ALWAYS_ALLOWED_MODES: &[&str] = &["default", "plan"];

/// The permission mode a workspace task asks for unless told otherwise.
pub const DEFAULT_MODE: &str = "acceptEdits";

/// The bundle of a workspace task: prompt and workspace tar.
pub fn bundle(prompt: &[u8], tar: &[u8]) -> Vec<u8> {
    let header = json!({ "prompt_bytes": prompt.len(), "workspace_tar_bytes": tar.len() }).to_string();
    let mut out = Vec::with_capacity(MAGIC.len() + header.len() + 1 + prompt.len() + tar.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(header.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(prompt);
    out.extend_from_slice(tar);
    out
}

/// Split a bundle into (prompt, workspace tar); refuses anything else.
pub fn unbundle(plain: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let rest = plain
        .strip_prefix(MAGIC)
        .ok_or("the payload is not a workspace bundle")?;
    let nl = rest
        .iter()
        .take(256)
        .position(|b| *b == b'\n')
        .ok_or("the bundle's header is missing")?;
    let header: Value = serde_json::from_slice(&rest[..nl]).map_err(|e| format!("the bundle's header: {e}"))?;
    let (p, t) = (
        header["prompt_bytes"]
            .as_u64()
            .ok_or("the bundle's header has no prompt size")? as usize,
        header["workspace_tar_bytes"]
            .as_u64()
            .ok_or("the bundle's header has no workspace size")? as usize,
    );
    let body = &rest[nl + 1..];
    if p.checked_add(t) != Some(body.len()) {
        return Err(format!(
            "the bundle holds {} bytes, not the {p} + {t} its header names",
            body.len()
        ));
    }
    Ok(body.split_at(p))
}

/// Whether a provider's `market.permissionModes` allows `mode`.
pub fn mode_allowed(allowed: &[String], mode: &str) -> bool {
    ALWAYS_ALLOWED_MODES.contains(&mode) || allowed.iter().any(|m| m == mode)
}

/// The requester's own selection of DIR for a market task: the rules of
/// `execute --workspace` with the size limit `docker.workspaceLimit`.
pub fn select(dir: &Path, limit: u64) -> Result<Snapshot, workspace::WorkspaceError> {
    workspace::select(dir, &Rules::new(limit))
}

/// The snapshot as a tar, in memory (it is sealed into the payload).
pub fn tar_of(snapshot: &Snapshot) -> Result<Vec<u8>, workspace::WorkspaceError> {
    let mut tar = Vec::with_capacity(snapshot.total_bytes() as usize + 1024 * snapshot.file_count() + 2048);
    snapshot.write_tar(&mut tar)?;
    Ok(tar)
}

/// A private temporary directory for a copy of a workspace of about
/// `bytes`: on a memory file system when one has room (`$XDG_RUNTIME_DIR`,
/// else `/dev/shm`), since creating thousands of files on a disk file system
/// costs far more than the job itself; else in the temporary directory.
pub fn scratch_dir(prefix: &str, bytes: u64) -> std::io::Result<tempfile::TempDir> {
    let need = bytes.saturating_mul(3).saturating_add(64 << 20);
    let candidates = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::iter::once(PathBuf::from("/dev/shm")));
    for dir in candidates {
        if in_memory_with_room(&dir, need) {
            if let Ok(d) = tempfile::Builder::new().prefix(prefix).tempdir_in(&dir) {
                return Ok(d);
            }
        }
    }
    tempfile::Builder::new().prefix(prefix).tempdir()
}

/// Whether `dir` is a tmpfs with at least `need` bytes free.
fn in_memory_with_room(dir: &Path, need: u64) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid C string and `st` a zeroed statfs the call fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    st.f_type as i64 == TMPFS_MAGIC && (st.f_bavail as u64).saturating_mul(st.f_bsize as u64) >= need
}

// ---------------------------------------------------------------------------
// Provider side.

/// A received workspace, unpacked into a private temporary directory that
/// goes away with this value.
pub struct Received {
    pub dir: tempfile::TempDir,
    pub files: u64,
    pub bytes: u64,
}

/// Unpack a requester's workspace tar (untrusted) into a fresh directory,
/// at most `max_bytes` of content.
pub fn receive(tar: &[u8], max_bytes: u64) -> Result<Received, String> {
    let dir = scratch_dir("cmm-market-ws-", max_bytes.min(tar.len() as u64))
        .map_err(|e| format!("cannot create a directory for the workspace: {e}"))?;
    let bound = crate::docker::hardening::WorkspaceMount::archive_bound(max_bytes);
    let counts = workspace::unpack_untrusted(dir.path(), tar, bound, MAX_FILES)
        .map_err(|e| format!("the requester's workspace was refused: {e}"))?;
    Ok(Received {
        dir,
        files: counts.files,
        bytes: counts.bytes,
    })
}

/// The `workspace` part of a result: the delta and what it changed, as the
/// provider saw it (the requester computes its own from the delta).
pub fn result_part(dir: &Path, received: &Received, changes: Option<&Value>) -> Result<Value, String> {
    let empty = json!({ "files": [], "dirs_added": [], "dirs_removed": [] });
    let changes = changes.unwrap_or(&empty);
    let delta = workspace::pack_delta(dir, changes, MAX_DELTA_BYTES).map_err(|e| e.to_string())?;
    Ok(json!({
        "files_in": received.files,
        "bytes_in": received.bytes,
        "files_changed": changes["files"].as_array().map_or(0, |f| f.len()),
        "patch_sha256": changes["patch"]["sha256"],
        "summary": changes["summary"],
        "delta": B64.encode(&delta),
    }))
}

// ---------------------------------------------------------------------------
// Requester side.

/// What the requester checks a workspace task's result with.
pub struct Check {
    pub paths: Paths,
    /// DIR, as given.
    pub dir: PathBuf,
    /// DIR as it was sent.
    pub snapshot: Arc<Snapshot>,
    /// Run in the hardened container; settle only if it exits 0.
    pub accept_cmd: Option<String>,
    /// Default: the runner image (`docker.image`).
    pub accept_image: Option<String>,
    /// Default: the job timeout (`docker.timeout`).
    pub accept_timeout: Option<Duration>,
    /// Apply the accepted change set to DIR (only if it is unchanged).
    pub apply: bool,
}

/// What the requester's check of one delivery came to.
pub enum Verdict {
    /// Pay: the changes rebuilt, and the acceptance command (if any) passed.
    Accept(Checked),
    /// Do not pay; the reason goes to the provider and both audit logs.
    Reject { reason: String, checked: Option<Checked> },
    /// This node could not run the check (its own fault, not the
    /// provider's): neither pay nor reject.
    Unchecked { why: String },
}

/// A delivery's changes, rebuilt on this machine.
pub struct Checked {
    pub changes: ChangeSet,
    pub acceptance: Option<AcceptOutcome>,
    /// The rebuilt copy (kept until the verdict is acted on).
    _copy: tempfile::TempDir,
}

/// The workspace part of a settled outcome, for the caller and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkspaceOutcome {
    pub dir: PathBuf,
    pub files_in: usize,
    pub bytes_in: u64,
    /// The change set computed here (per-file entries, totals, patch id).
    pub changes: Value,
    /// Where the patch was saved.
    pub patch: Option<PathBuf>,
    pub acceptance: Option<AcceptOutcome>,
    /// `--apply`: what was written to DIR, or why nothing was.
    pub applied: Option<Applied>,
    pub apply_error: Option<String>,
}

/// The last `n` lines of `text`, at most `max` bytes (cut at a line, or
/// within a character boundary when one line alone is longer).
fn tail(text: &str, n: usize, max: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut s = lines[lines.len().saturating_sub(n)..].join("\n");
    while s.len() > max {
        match s.find('\n') {
            Some(i) => s.drain(..=i),
            None => {
                let cut = s.len() - max;
                let cut = (cut..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
                s.drain(..cut)
            }
        };
    }
    s
}

/// A rejection's reason: what the command did on its first line (always
/// kept), then the last lines of its output, all within
/// [`MAX_REASON_BYTES`].
fn reason(head: &str, output: &str) -> String {
    let head = tail(head, 1, MAX_REASON_BYTES / 4);
    let room = MAX_REASON_BYTES - head.len() - 1;
    format!("{head}\n{}", tail(output, REASON_LINES, room))
}

impl Check {
    /// Judge one delivery's result document.
    pub async fn judge(&self, cfg: &Config, body: &Value, cancel: Cancel) -> Verdict {
        let rebuilt = {
            let snapshot = self.snapshot.clone();
            let delta = body["workspace"]["delta"].as_str().map(str::to_string);
            tokio::task::spawn_blocking(move || rebuild(&snapshot, delta.as_deref()))
                .await
                .unwrap_or_else(|e| Err(format!("the rebuild stopped: {e}")))
        };
        let (changes, copy) = match rebuilt {
            Ok(x) => x,
            Err(e) => {
                return Verdict::Reject {
                    reason: format!("the returned changes could not be rebuilt: {e}"),
                    checked: None,
                }
            }
        };
        let Some(cmd) = &self.accept_cmd else {
            return Verdict::Accept(Checked {
                changes,
                acceptance: None,
                _copy: copy,
            });
        };
        let spec = AcceptSpec {
            dir: copy.path().join("ws"),
            command: cmd.clone(),
            image: self
                .accept_image
                .clone()
                .unwrap_or_else(|| crate::job::default_image(cfg)),
            timeout: self.accept_timeout.unwrap_or(cfg.settings().docker.timeout),
        };
        let outcome = acceptance::run(&self.paths, cfg, spec, &crate::job::Unattended, cancel).await;
        match outcome {
            Ok(o) if o.passed => Verdict::Accept(Checked {
                changes,
                acceptance: Some(o),
                _copy: copy,
            }),
            Ok(o) => {
                let head = match (&o.killed, o.exit_code) {
                    (Some(k), _) => format!("the acceptance command `{cmd}` was stopped ({k})"),
                    (None, Some(c)) => format!("the acceptance command `{cmd}` exited {c}"),
                    (None, None) => format!("the acceptance command `{cmd}` did not report an exit code"),
                };
                Verdict::Reject {
                    reason: reason(&head, &o.tail),
                    checked: Some(Checked {
                        changes,
                        acceptance: Some(o),
                        _copy: copy,
                    }),
                }
            }
            // Our own machine failed to test (no engine, image missing):
            // not the provider's fault, so no rejection; and nothing
            // unchecked is paid. The delivery stays held for `market result`.
            Err(e) => Verdict::Unchecked {
                why: format!("the acceptance command could not be run here: {e}"),
            },
        }
    }

    /// After paying: save the patch beside this node's records and, with
    /// `--apply`, write the changes into DIR if it is unchanged.
    pub fn finish(&self, task_id: &str, checked: &Checked) -> WorkspaceOutcome {
        let c = &checked.changes;
        let mut out = WorkspaceOutcome {
            dir: self.dir.clone(),
            files_in: self.snapshot.file_count(),
            bytes_in: self.snapshot.total_bytes(),
            changes: serde_json::to_value(c).unwrap_or(Value::Null),
            patch: None,
            acceptance: checked.acceptance.clone(),
            applied: None,
            apply_error: None,
        };
        if !c.is_empty() {
            match self.save_patch(task_id, c) {
                Ok(p) => out.patch = Some(p),
                Err(e) => out.apply_error = Some(format!("the patch could not be saved: {e}")),
            }
        }
        if self.apply && !c.is_empty() {
            match workspace::apply(c, &self.snapshot, &self.dir) {
                Ok(a) => out.applied = Some(a),
                Err(e) => {
                    out.apply_error = Some(match &out.patch {
                        Some(p) => format!("{e}; the patch is kept at {}", p.display()),
                        None => e.to_string(),
                    })
                }
            }
        }
        out
    }

    fn save_patch(&self, task_id: &str, c: &ChangeSet) -> std::io::Result<PathBuf> {
        let dir = self.paths.jobs_dir();
        crate::fsutil::ensure_private_dir(&dir)?;
        let path = dir.join(format!("market-{task_id}.patch"));
        crate::fsutil::atomic_write(&path, &c.patch_text()?)?;
        Ok(path)
    }
}

/// Rebuild the job's tree from the snapshot and the provider's delta.
fn rebuild(snapshot: &Snapshot, delta: Option<&str>) -> Result<(ChangeSet, tempfile::TempDir), String> {
    let delta = delta.ok_or("the result carries no workspace changes")?;
    let delta = B64.decode(delta).map_err(|e| format!("the delta is not base64: {e}"))?;
    if delta.len() as u64 > MAX_DELTA_BYTES {
        return Err(format!(
            "the delta is {} bytes, above the {MAX_DELTA_BYTES} a result may carry",
            delta.len()
        ));
    }
    let copy = scratch_dir("cmm-accept-", snapshot.total_bytes() + delta.len() as u64)
        .map_err(|e| format!("cannot create a directory for the copy: {e}"))?;
    let into = copy.path().join("ws");
    std::fs::create_dir(&into).map_err(|e| format!("cannot create {}: {e}", into.display()))?;
    // The rebuilt tree holds at most the snapshot and the delta's content.
    let rules = DiffRules::new(crate::docker::hardening::WorkspaceMount::archive_bound(
        snapshot.total_bytes() + MAX_DELTA_BYTES,
    ));
    let changes = workspace::rebuild(snapshot, &delta, &into, &rules).map_err(|e| e.to_string())?;
    Ok((changes, copy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_round_trips_and_refuses_what_is_not_one() {
        let b = bundle(b"fix it", b"TARBYTES");
        let (p, t) = unbundle(&b).unwrap();
        assert_eq!((p, t), (&b"fix it"[..], &b"TARBYTES"[..]));
        assert!(unbundle(b"just a prompt").is_err());
        let mut cut = b.clone();
        cut.pop();
        assert!(unbundle(&cut).unwrap_err().contains("not the"));
    }

    #[test]
    fn modes_that_change_nothing_unasked_are_always_allowed() {
        let allowed = vec!["acceptEdits".to_string()];
        assert!(mode_allowed(&allowed, "acceptEdits"));
        assert!(mode_allowed(&allowed, "default"));
        assert!(mode_allowed(&allowed, "plan"));
        assert!(!mode_allowed(&allowed, "bypassPermissions"));
        assert!(mode_allowed(&["bypassPermissions".into()], "bypassPermissions"));
    }

    #[test]
    fn a_reason_keeps_the_last_lines_within_its_size() {
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text, 20, MAX_REASON_BYTES);
        assert!(t.starts_with("line 30") && t.ends_with("line 49"));
        let long = "x".repeat(10_000);
        assert_eq!(tail(&long, 20, MAX_REASON_BYTES).len(), MAX_REASON_BYTES);
    }

    #[test]
    fn a_reason_keeps_what_the_command_did_however_long_its_output() {
        let output: String = (0..40).map(|i| format!("{i:03} {}\n", "y".repeat(200))).collect();
        let r = reason("the acceptance command `make` exited 2", &output);
        assert!(r.len() <= MAX_REASON_BYTES, "{}", r.len());
        assert!(r.starts_with("the acceptance command `make` exited 2\n"), "{r}");
        assert!(
            r.ends_with(&format!("039 {}", "y".repeat(200))),
            "the last line is there"
        );
        let r = reason(&"c".repeat(5_000), "out");
        assert!(r.len() <= MAX_REASON_BYTES && r.ends_with("\nout"), "{}", r.len());
    }
}
