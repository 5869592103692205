//! The requester's acceptance run: before a workspace task is paid for, the
//! requester's own command (`sh -c COMMAND`) runs on a copy of DIR with the
//! provider's patch applied, in a local job container hardened exactly as a
//! job's is (the profile's user, read-only rootfs, tmpfs workspace,
//! cap_drop ALL, no-new-privileges, the config's memory, cpu and pids
//! caps), with no network at all and no credential: stdin stays empty and
//! the environment holds nothing of ours but `HOME` (`PATH` is the
//! image's). The container carries our label and this install's id, so
//! `clean` and `opt-out` find it, and it is removed on every path.
//!
//! DIR goes in the way a job's workspace does: packed on the host into an
//! unlinked temporary file and unpacked inside by our own binary, mounted
//! read-only at `/.cmm` (the container's [`Hold`]), so any image with a
//! `sh` works, even one built `FROM scratch`. The verdict is the exit code
//! and the last lines of output alone.
//!
//! This module must not read a credential, open a network, write to DIR,
//! audit, or build a second container runner: the lifecycle is
//! [`container::run_created`]'s and the request is [`hardening`]'s.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::models::ContainerCreateBody;
use serde::Serialize;

use super::{default_image, joined, new_job_id, Cancel, JobError};
use crate::audit::AuditLog;
use crate::config::Config;
use crate::docker::container::{self, Ending, Hold, Verdict, EXIT_OOM, EXIT_REMOVED};
use crate::docker::hardening::{self, Profile, Resources};
use crate::docker::image::{self, ImageProgress, Provenance};
use crate::docker::{relay, DockerError};
use crate::exit::{Exit, Failure};
use crate::paths::Paths;
use crate::workspace;

/// Lines of output an outcome keeps.
pub const TAIL_LINES: usize = 20;
/// Bytes of output an outcome keeps, at most.
pub const TAIL_BYTES: usize = 4096;

/// What to accept: a directory (the patched copy, on the host) and the
/// command that decides.
#[derive(Debug, Clone)]
pub struct AcceptSpec {
    /// Its files are copied into the container's workspace; it is never
    /// mounted and never written to.
    pub dir: PathBuf,
    /// Run as `sh -c COMMAND` in the workspace, stderr joined to stdout.
    pub command: String,
    pub image: String,
    pub timeout: Duration,
}

impl AcceptSpec {
    /// A spec with the config's defaults: our runner image (`docker.image`)
    /// and a job's timeout (`docker.timeout`).
    pub fn from_config(cfg: &Config, dir: PathBuf, command: String) -> AcceptSpec {
        AcceptSpec {
            dir,
            command,
            image: default_image(cfg),
            timeout: cfg.settings().docker.timeout.max(Duration::from_secs(1)),
        }
    }
}

/// How an acceptance run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcceptOutcome {
    /// Exit code 0 and not killed.
    pub passed: bool,
    /// `None` when the command was killed.
    pub exit_code: Option<i64>,
    /// Why it was killed: `timeout`, `cancelled`, `out-of-memory`, or
    /// `removed` (its container removed from outside: `opt-out`, `clean
    /// --force`).
    pub killed: Option<String>,
    /// The last [`TAIL_LINES`] lines of stdout and stderr, interleaved as
    /// they were written, at most [`TAIL_BYTES`].
    pub tail: String,
    /// From the container's creation to its end, the copy-in included.
    pub duration_ms: u64,
    pub image: String,
}

/// Run the acceptance command of `spec` and report how it ended.
///
/// `Err` means the command never ran (bad input, no image, no engine, DIR
/// unreadable or over `docker.workspaceLimit`, cancelled before the start);
/// a command that fails or is killed is an `Ok` outcome that did not pass.
/// `progress` hears about the runner image being pulled or built, when it
/// is the configured default and missing.
pub async fn run(
    paths: &Paths,
    cfg: &Config,
    spec: AcceptSpec,
    progress: &dyn ImageProgress,
    cancel: Cancel,
) -> Result<AcceptOutcome, JobError> {
    validate(&spec)?;
    let install_id = install_id(paths)?;
    let profile = hardening::profile()?;
    let limit = super::workspace::limit(cfg)?;
    let resources = Resources {
        // No way out at all: an acceptance command needs none, and there
        // is no proxy for it to be allowed through.
        network: hardening::NO_NETWORK.to_string(),
        proxy: None,
        relay: None,
        workspace: Some(limit),
        ..Resources::from_config(cfg, profile)?
    };

    // DIR packed, our binary ready to mount and the image there, all at
    // once; the first failure is the answer.
    let dir = spec.dir.clone();
    let packed = async {
        tokio::task::spawn_blocking(move || pack(&dir, limit))
            .await
            .map_err(joined)?
    };
    let files = async {
        tokio::task::spawn_blocking(|| relay::RelayFiles::prepare(&relay::base_dir()?))
            .await
            .map_err(joined)?
            .map_err(|e| JobError::from(DockerError::Relay(e.to_string())))
    };
    let (docker, tar_in, files) = tokio::select! {
        r = async { tokio::try_join!(ready_image(cfg, &spec.image, profile, progress), packed, files) } => r?,
        _ = cancel.cancelled() => return Err(JobError::Cancelled),
    };
    if cancel.is_cancelled() {
        return Err(JobError::Cancelled);
    }

    let id = format!("accept-{}", new_job_id());
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let mount = &profile.workspace.mount;
    let hold = Hold {
        nonce: nonce.clone(),
        user: profile.user.clone(),
        tar_in,
        unpack: files.command(&[workspace::UNPACK_MODE, mount]),
        pack: files.command(&[workspace::PACK_MODE, mount]),
        // Nothing is copied back: with no room, the hold's copy-out stops
        // at its first bytes, and what it says is not looked at.
        out_limit: 0,
    };
    let resources = Resources {
        // The image's entrypoint is not run: the hold runs the command.
        relay: Some(hardening::RelaySetup {
            entrypoint: files.entrypoint_with(None, Some(&nonce), &[]),
            binds: vec![files.files_bind()],
        }),
        ..resources
    };
    let body = create_body(profile, &resources, &spec, &id, &install_id)?;

    let mut tail = Tail::default();
    let t0 = Instant::now();
    let created = container::create(&docker, &format!("cmm-{id}"), body).await;
    let exited = container::run_created(
        &docker,
        created,
        // No credential, no input: the command's stdin closes empty, once
        // the workspace is in.
        Vec::new(),
        Some(hold),
        spec.timeout,
        cancel.cancelled(),
        |line| {
            tail.push(line);
            Verdict::Continue
        },
    )
    .await?;
    let duration_ms = t0.elapsed().as_millis() as u64;
    let oom = matches!(exited.run.ending, Ending::Exited(137)) && oom_killed(&docker, &exited.run.container_id).await;
    let (exit_code, killed) = ending(&exited.run.ending, oom);
    // The hold's own complaints (no `sh` in the image, ...) come last.
    let stderr = exited.run.stderr_tail.clone();
    exited.remove().await;
    Ok(AcceptOutcome {
        passed: exit_code == Some(0) && killed.is_none(),
        exit_code,
        killed,
        tail: tail.finish(&stderr),
        duration_ms,
        image: spec.image,
    })
}

fn validate(spec: &AcceptSpec) -> Result<(), JobError> {
    let bad = |m: String| Err(JobError::Invalid(m));
    if spec.command.trim().is_empty() {
        return bad("the acceptance command is empty; give the command that checks the work (e.g. `make test`)".into());
    }
    if spec.command.contains('\0') {
        return bad("the acceptance command contains a NUL byte, which no shell can be given".into());
    }
    if spec.timeout.is_zero() {
        return bad("the acceptance timeout must be above 0".into());
    }
    if spec.image.trim().is_empty() {
        return bad("no image to run the acceptance command in; name one or set `docker.image`".into());
    }
    Ok(())
}

/// This install's id, which the container carries so that this install's
/// `clean` and `opt-out` find it; without an audit log there is none.
fn install_id(paths: &Paths) -> Result<String, JobError> {
    match AuditLog::new(paths).read_head()? {
        Some(h) if !h.log_id.is_empty() => Ok(h.log_id),
        _ => Err(Failure::refused(format!(
            "this install has no audit log in {}, so its containers could not be told apart from another install's",
            paths.data_dir.display()
        ))
        .hint("run `claude-max-market opt-in` first")
        .into()),
    }
}

/// DIR as a tar in an unlinked temporary file, at its start; refused when
/// its content would not fit the workspace tmpfs. The archive is capped
/// while it is written, so a huge DIR is refused without being copied
/// whole to the temporary file first.
fn pack(dir: &Path, limit: u64) -> Result<std::fs::File, JobError> {
    use std::io::{Seek, Write};
    let io = |e: io::Error| {
        JobError::Workspace(workspace::WorkspaceError::io(format!(
            "cannot pack `{}` for the acceptance run",
            dir.display()
        ))(e))
    };
    let too_big = || {
        JobError::Invalid(format!(
            "`{}` holds more than the workspace takes (docker.workspaceLimit, {}); raise it with `claude-max-market config --set docker.workspaceLimit=SIZE`",
            dir.display(),
            crate::fsutil::human_bytes(limit)
        ))
    };
    if !dir.is_dir() {
        return Err(JobError::Invalid(format!(
            "`{}` is not a directory; give the directory the acceptance command runs in",
            dir.display()
        )));
    }
    let mut w = Capped {
        inner: io::BufWriter::with_capacity(256 << 10, tempfile::tempfile().map_err(io)?),
        room: hardening::WorkspaceMount::archive_bound(limit),
        over: false,
    };
    let counts = workspace::pack_dir(dir, &mut w);
    if w.over {
        return Err(too_big());
    }
    if counts?.bytes > limit {
        return Err(too_big());
    }
    w.flush().map_err(io)?;
    let mut file = w.inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.seek(io::SeekFrom::Start(0)).map_err(io)?;
    Ok(file)
}

/// A writer that refuses to go past `room` bytes, and says it did.
struct Capped<W> {
    inner: W,
    room: u64,
    over: bool,
}

impl<W: io::Write> io::Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.room {
            self.over = true;
            return Err(io::Error::other("the archive is over the workspace's limit"));
        }
        let n = self.inner.write(buf)?;
        self.room -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The engine, with `image` present: our runner image is pulled or built
/// when missing, as for a job; any other image is the user's to provide.
async fn ready_image(
    cfg: &Config,
    name: &str,
    profile: &Profile,
    progress: &dyn ImageProgress,
) -> Result<bollard::Docker, JobError> {
    let docker = crate::docker::connect().await?;
    if image::exists(&docker, name).await? {
        return Ok(docker);
    }
    if name != default_image(cfg) {
        return Err(Failure::new(
            Exit::Unavailable,
            format!("the acceptance image `{name}` is not present in the local Docker engine"),
        )
        .hint(format!(
            "pull it (`docker pull {name}`) or build it (`docker build --tag {name} DIR`), then run the acceptance again"
        ))
        .into());
    }
    let manage = image::LocalBuild::from_config(cfg);
    let _: Provenance = image::ensure(&docker, name, Some(&manage), profile, progress).await?;
    Ok(docker)
}

/// A job's create request, running `sh -c COMMAND` (stderr joined to
/// stdout) under the hold instead of Claude Code. Checked against the
/// profile before it is sent, as `compliance-check` checks a job's.
fn create_body(
    profile: &Profile,
    resources: &Resources,
    spec: &AcceptSpec,
    id: &str,
    install_id: &str,
) -> Result<ContainerCreateBody, JobError> {
    let launch = hardening::Launch {
        image: &spec.image,
        model: "",
        claude_args: &[],
        job_id: id,
        install_id,
    };
    let body = ContainerCreateBody {
        cmd: Some(command_argv(&spec.command)),
        ..hardening::create_body(profile, resources, &launch)
    };
    let bad = hardening::mismatches(profile, &body);
    if !bad.is_empty() {
        return Err(DockerError::Refused(format!(
            "the acceptance container's request differs from the security profile in: {}",
            bad.join(", ")
        ))
        .into());
    }
    Ok(body)
}

/// Our script before the command: stderr onto stdout, so the tail holds
/// both in the order they were written; then wait for stdin to close. The
/// hold starts the command with the container, before the workspace is
/// copied in, and closes its (empty) stdin only once it is: reading to its
/// end is what keeps the command off a half-filled workspace.
const PRELUDE: &str = "exec 2>&1; while read -r line; do :; done; exec sh -c \"$1\"";

/// `sh -c COMMAND` after [`PRELUDE`]. The command is passed as an argument
/// of its own, never spliced into our script, so it runs exactly as `sh -c`
/// would run it.
fn command_argv(command: &str) -> Vec<String> {
    ["sh", "-c", PRELUDE, "sh", command].map(String::from).to_vec()
}

/// The exit code and why it was killed, from how the container ended.
fn ending(e: &Ending, oom: bool) -> (Option<i64>, Option<String>) {
    let killed = |why: &str| (None, Some(why.to_string()));
    match e {
        Ending::Exited(EXIT_REMOVED) => killed("removed"),
        Ending::Exited(EXIT_OOM) => killed("out-of-memory"),
        Ending::Exited(_) if oom => killed("out-of-memory"),
        Ending::Exited(code) => (Some(*code), None),
        Ending::Killed(reason) => killed(reason.name()),
        Ending::Cancelled => killed("cancelled"),
        // Only a line handler that says `Done` ends a run this way, and
        // ours never does; an end without an exit code does not pass.
        Ending::Finished => (None, None),
    }
}

/// Was a process of the container killed for exceeding its memory limit?
/// Under the hold, the command's own exit then reads as SIGKILL (137).
async fn oom_killed(docker: &bollard::Docker, id: &str) -> bool {
    docker
        .inspect_container(id, None::<bollard::query_parameters::InspectContainerOptions>)
        .await
        .ok()
        .and_then(|i| i.state)
        .and_then(|s| s.oom_killed)
        .unwrap_or(false)
}

/// The last lines of output, each cut to [`TAIL_BYTES`] as it arrives so
/// a runaway line costs no more than that.
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    fn push(&mut self, line: &str) {
        // One more than kept: the last may be the hold's (see `finish`).
        if self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(last_bytes(line, TAIL_BYTES).to_string());
    }

    /// The tail as text, with the container's `stderr` (the hold's own
    /// messages: the command's went to stdout) after it.
    fn finish(mut self, stderr: &str) -> String {
        // The hold starts its end-of-run line on a fresh line: after output
        // that ended with a newline, that makes one empty line of ours.
        if self.lines.back().is_some_and(|l| l.is_empty()) {
            self.lines.pop_back();
        }
        for line in stderr.lines() {
            self.push(line);
        }
        while self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
        let text = Vec::from(self.lines).join("\n");
        last_bytes(&text, TAIL_BYTES).to_string()
    }
}

/// The end of `s`, at most `n` bytes, cut at a character boundary.
fn last_bytes(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::container::KillReason;

    #[test]
    fn the_tail_keeps_the_last_lines_without_the_holds_newline() {
        let mut t = Tail::default();
        for i in 1..=30 {
            t.push(&format!("line {i}"));
        }
        t.push("");
        let want: Vec<String> = (11..=30).map(|i| format!("line {i}")).collect();
        assert_eq!(t.finish(""), want.join("\n"));
        let mut t = Tail::default();
        t.push("a");
        t.push("b");
        assert_eq!(t.finish("hold: cannot run\n"), "a\nb\nhold: cannot run");
    }

    #[test]
    fn the_tail_is_bounded_in_bytes_and_cut_on_a_character() {
        let mut t = Tail::default();
        t.push(&"é".repeat(5000));
        let text = t.finish("");
        assert!(
            text.len() <= TAIL_BYTES && text.len() >= TAIL_BYTES - 1,
            "{}",
            text.len()
        );
        assert!(text.chars().all(|c| c == 'é'));
        let mut t = Tail::default();
        for _ in 0..TAIL_LINES {
            t.push(&"x".repeat(1000));
        }
        assert_eq!(t.finish("").len(), TAIL_BYTES);
    }

    #[test]
    fn only_exit_zero_passes() {
        assert_eq!(ending(&Ending::Exited(0), false), (Some(0), None));
        assert_eq!(ending(&Ending::Exited(3), false), (Some(3), None));
        assert_eq!(ending(&Ending::Exited(137), true), (None, Some("out-of-memory".into())));
        assert_eq!(
            ending(&Ending::Exited(EXIT_REMOVED), false),
            (None, Some("removed".into()))
        );
        assert_eq!(
            ending(&Ending::Killed(KillReason::Timeout), false),
            (None, Some("timeout".into()))
        );
        assert_eq!(ending(&Ending::Cancelled, false), (None, Some("cancelled".into())));
        assert_eq!(ending(&Ending::Finished, false), (None, None));
    }

    #[test]
    fn the_request_is_a_hardened_job_request_with_no_network_and_no_credential() {
        let p = hardening::profile().unwrap();
        let r = Resources {
            memory: 512 << 20,
            cpu_shares: 512,
            network: hardening::NO_NETWORK.into(),
            proxy: None,
            relay: Some(hardening::RelaySetup {
                entrypoint: vec!["/.cmm/cmm".into()],
                binds: vec!["/x/relay-1:/.cmm:ro".into()],
            }),
            workspace: Some(100 << 20),
        };
        let spec = AcceptSpec {
            dir: "/nowhere".into(),
            command: "make test; echo \"$HOME\"".into(),
            image: "img".into(),
            timeout: Duration::from_secs(5),
        };
        let body = create_body(p, &r, &spec, "accept-1", "install-1").unwrap();
        assert_eq!(
            body.cmd.as_deref().unwrap(),
            ["sh", "-c", PRELUDE, "sh", "make test; echo \"$HOME\""]
        );
        assert_eq!(body.env, Some(vec![format!("HOME={}", p.home)]));
        assert_eq!(body.working_dir.as_deref(), Some(p.workspace.mount.as_str()));
        let h = body.host_config.unwrap();
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(h.memory, h.memory_swap);
        let labels = body.labels.unwrap();
        assert_eq!(labels[&p.install_label], "install-1");
        assert_eq!(labels[&p.job_label], "accept-1");
        // A request the profile would not allow is refused before it is sent.
        let mounted = Resources {
            relay: Some(hardening::RelaySetup {
                entrypoint: vec![],
                binds: vec!["/home/u:/work".into()],
            }),
            ..r
        };
        assert!(matches!(
            create_body(p, &mounted, &spec, "accept-1", "install-1"),
            Err(JobError::Docker(DockerError::Refused(_)))
        ));
    }

    #[test]
    fn the_archive_stops_at_its_cap_and_says_so() {
        use std::io::Write;
        let mut w = Capped {
            inner: Vec::new(),
            room: 10,
            over: false,
        };
        w.write_all(b"0123456789").unwrap();
        assert!(!w.over);
        assert!(w.write_all(b"x").is_err());
        assert!(w.over);
        assert_eq!(w.inner, b"0123456789");
    }

    #[test]
    fn bad_specs_are_refused_before_anything_runs() {
        let spec = |command: &str, timeout: u64| AcceptSpec {
            dir: ".".into(),
            command: command.into(),
            image: "img".into(),
            timeout: Duration::from_secs(timeout),
        };
        assert!(validate(&spec("make test", 5)).is_ok());
        for s in [spec("  ", 5), spec("a\0b", 5), spec("true", 0)] {
            assert!(matches!(validate(&s), Err(JobError::Invalid(_))), "{s:?}");
        }
    }
}
