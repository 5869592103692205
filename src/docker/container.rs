//! One job container: create, attach before start, feed stdin, stream the
//! output line by line, enforce the deadline and the caller's verdicts,
//! and remove the container on every path.
//!
//! It owns the container's lifetime and the reading of its output. It must
//! not decide what a line means (the caller's verdict does), nor build the
//! create request (that is `hardening`'s).

use std::future::Future;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, KillContainerOptions, ListContainersOptions, RemoveContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{is_not_found, DockerError};

/// Bytes of the container's stderr kept for the job record.
const STDERR_TAIL: usize = 4096;

/// Why we killed a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    Timeout,
    TokenCap,
    /// The API refused the credential: retrying cannot help.
    AuthFailed,
}

impl KillReason {
    pub fn name(self) -> &'static str {
        match self {
            KillReason::Timeout => "timeout",
            KillReason::TokenCap => "token-cap",
            KillReason::AuthFailed => "auth-failed",
        }
    }
}

/// What the line handler wants after each stdout line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Kill(KillReason),
    /// The job has said all it will (Claude Code's final `result`): stop
    /// it now instead of waiting for its process to wind down.
    Done,
}

/// How the container's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The process exited by itself.
    Exited(i64),
    /// The job reported its end ([`Verdict::Done`]) and was stopped then,
    /// without waiting for its process to exit (the caller removes it).
    Finished,
    Killed(KillReason),
    Cancelled,
}

#[derive(Debug)]
pub struct Run {
    pub container_id: String,
    pub ending: Ending,
    pub stderr_tail: String,
    /// A job with a [`Hold`]: its workspace as a tar (an unlinked temporary
    /// file, at its start), or why it could not be copied out.
    pub workspace_out: Option<Result<std::fs::File, String>>,
}

/// A job with a workspace. The container's init is our hold (see
/// `relay::main`): the workspace goes in by `docker exec` of our own binary
/// before the job reads its stdin, and comes out the same way once the job
/// has ended, while the container and its size-limited tmpfs still exist.
/// The archive API cannot reach a tmpfs of a read-only-rootfs container,
/// and a bind mount of the user's directory is what this avoids.
#[derive(Debug)]
pub struct Hold {
    /// Names the hold's end-of-job line (see `relay::hold_marker`).
    pub nonce: String,
    /// Who the copies run as (the job's own user).
    pub user: String,
    /// The workspace as a tar, at its start.
    pub tar_in: std::fs::File,
    /// Commands (inside the container) that unpack a tar from stdin into
    /// the workspace and pack the workspace as a tar on stdout.
    pub unpack: Vec<String>,
    pub pack: Vec<String>,
    /// Most bytes the copy-out may bring back.
    pub out_limit: u64,
}

/// How long the hold has to report the end of a job it was told to stop.
const HOLD_GRACE: Duration = Duration::from_secs(10);
/// How long copying the workspace in or out may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(120);

/// A job container that has stopped and still has to be removed. Call
/// [`Exited::remove`] (the caller can do its bookkeeping meanwhile); if it is
/// dropped without that, removal happens on a helper thread before the drop
/// returns, so no path leaves the container behind.
#[must_use = "the container must be removed"]
pub struct Exited {
    docker: Docker,
    pub run: Run,
    removed: bool,
}

impl Exited {
    pub async fn remove(mut self) {
        remove(&self.docker, &self.run.container_id).await;
        self.removed = true;
    }
}

impl Drop for Exited {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let id = self.run.container_id.clone();
        // A fresh client on its own runtime: the caller's runtime may be
        // the one being dropped.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = crate::runtime::current_thread() {
                rt.block_on(async {
                    if let Ok(d) = super::connect().await {
                        remove(&d, &id).await;
                    }
                });
            }
        })
        .join();
    }
}

/// Create and run a container until it stops; the caller removes it
/// through the returned [`Exited`] (on error it is already removed).
///
/// `stdin` is written once the output is attached and the container started,
/// then our end is closed (`stdin_once` closes the container's). The buffer
/// is zeroed after writing because it carries the credential.
pub async fn run(
    docker: &Docker,
    name: &str,
    body: ContainerCreateBody,
    stdin: Vec<u8>,
    timeout: Duration,
    cancel: impl Future<Output = ()>,
    on_line: impl FnMut(&str) -> Verdict,
) -> Result<Exited, DockerError> {
    run_created(
        docker,
        create(docker, name, body).await,
        stdin,
        None,
        timeout,
        cancel,
        on_line,
    )
    .await
}

/// Create (not start) a job container; returns its id.
pub async fn create(docker: &Docker, name: &str, body: ContainerCreateBody) -> Result<String, DockerError> {
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_string()),
                ..Default::default()
            }),
            body,
        )
        .await?;
    Ok(created.id)
}

/// [`run`] for a container from [`create`] (or the error creating it),
/// with the [`Hold`] of a workspace job.
pub async fn run_created(
    docker: &Docker,
    created: Result<String, DockerError>,
    stdin: Vec<u8>,
    hold: Option<Hold>,
    timeout: Duration,
    cancel: impl Future<Output = ()>,
    on_line: impl FnMut(&str) -> Verdict,
) -> Result<Exited, DockerError> {
    let id = match created {
        Ok(id) => id,
        Err(e) => {
            let mut stdin = stdin;
            stdin.fill(0);
            return Err(e);
        }
    };
    match drive(docker, &id, stdin, hold, timeout, cancel, on_line).await {
        Ok((ending, stderr_tail, workspace_out)) => Ok(Exited {
            docker: docker.clone(),
            run: Run {
                container_id: id,
                ending,
                stderr_tail,
                workspace_out,
            },
            removed: false,
        }),
        Err(e) => {
            remove(docker, &id).await;
            Err(e)
        }
    }
}

type Drove = (Ending, String, Option<Result<std::fs::File, String>>);

/// Bytes zeroed when dropped, on every path: the stdin carries the credential.
struct Wiped(Vec<u8>);

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// Run the created container `id` to its end, in the stages below: attach
/// and start it, copy a held job's workspace in, watch its output until it
/// ends, and copy the workspace out.
async fn drive(
    docker: &Docker,
    id: &str,
    stdin: Vec<u8>,
    mut hold: Option<Hold>,
    timeout: Duration,
    cancel: impl Future<Output = ()>,
    on_line: impl FnMut(&str) -> Verdict,
) -> Result<Drove, DockerError> {
    tokio::pin!(cancel);
    let Some(Attached {
        output,
        mut writer,
        stdin,
    }) = attach_and_start(docker, id, Wiped(stdin), hold.is_some()).await?
    else {
        return Ok((Ending::Exited(EXIT_REMOVED), String::new(), None));
    };
    if let Some(h) = hold.as_mut() {
        copy_in(docker, id, h).await?;
        writer = stdin.map(Stdin::send);
        tracing::debug!(container = id, "workspace copied in");
    }
    let mut watch = Watch {
        docker,
        id,
        held: hold.is_some(),
        marker_prefix: hold.as_ref().map(|h| {
            let m = super::relay::hold_marker(&h.nonce, 0);
            m[..m.len() - "0}".len()].to_string()
        }),
        on_line,
        pending: Vec::new(),
        stderr_tail: Vec::new(),
        verdict: Verdict::Continue,
        held_exit: None,
        stopping: None,
    };
    let ending = watch.run(output, tokio::time::sleep(timeout), cancel).await;
    if let Some(w) = writer {
        w.abort();
    }
    let ending = ending?;
    tracing::debug!(container = id, ending = ?ending, "job ended");
    let tail = String::from_utf8_lossy(&watch.stderr_tail).into_owned();
    let workspace_out = match (&hold, watch.held_exit) {
        (None, _) => None,
        (Some(_), None) => Some(Err(
            "the job's container ended before its workspace could be copied out".to_string(),
        )),
        (Some(h), Some(_)) => Some(copy_out(docker, id, h).await),
    };
    Ok((ending, tail, workspace_out))
}

type Output = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// The job's stdin, not yet written: the attached input and its bytes.
struct Stdin {
    input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    bytes: Wiped,
}

impl Stdin {
    /// Write it all and close it, concurrently with reading the output, so
    /// a large prompt cannot deadlock against a job that prints first.
    fn send(self) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let Stdin { mut input, bytes } = self;
        tokio::spawn(async move {
            input.write_all(&bytes.0).await?;
            input.flush().await?;
            input.shutdown().await
        })
    }
}

/// A started container: its output, and its stdin, either on its way
/// (`writer`) or still to be sent (`stdin`, for a held job).
struct Attached {
    output: Output,
    writer: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    stdin: Option<Stdin>,
}

/// Attach to the container and start it; `None` when it was removed from
/// outside (`opt-out`, `clean --force`) before it could start.
async fn attach_and_start(
    docker: &Docker,
    id: &str,
    stdin: Wiped,
    held: bool,
) -> Result<Option<Attached>, DockerError> {
    let attached = docker
        .attach_container(
            id,
            Some(AttachContainerOptions {
                stdin: true,
                stdout: true,
                stderr: true,
                stream: true,
                logs: false,
                detach_keys: None,
            }),
        )
        .await;
    tracing::debug!(container = id, "attached");
    let attached = match attached {
        Ok(a) => a,
        // Removed between create and attach.
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stdin = Stdin {
        input: attached.input,
        bytes: stdin,
    };
    // Stdin goes out before the start request, like `docker run -i`: the
    // engine buffers it and the job reads it the moment it runs, instead of
    // after the start call returns. A job with a workspace gets it only
    // once the workspace is in.
    let (writer, stdin) = if held {
        (None, Some(stdin))
    } else {
        (Some(stdin.send()), None)
    };
    if let Err(e) = docker
        .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
        .await
    {
        if let Some(w) = &writer {
            w.abort();
        }
        // Removed from outside between create and start: the engine says
        // 404, or (a removal under way) a conflict.
        if is_not_found(&e) || being_removed(docker, id).await {
            return Ok(None);
        }
        return Err(e.into());
    }
    tracing::debug!(container = id, "started");
    Ok(Some(Attached {
        output: attached.output,
        writer,
        stdin,
    }))
}

/// The workspace of a held job, unpacked by our binary inside the
/// container from its archive.
async fn copy_in(docker: &Docker, id: &str, h: &Hold) -> Result<(), DockerError> {
    let tar = h
        .tar_in
        .try_clone()
        .map_err(|e| DockerError::Workspace(format!("cannot read the workspace archive: {e}")))?;
    let copied = tokio::time::timeout(
        COPY_TIMEOUT,
        exec_io(docker, id, &h.user, h.unpack.clone(), Some(tar), None),
    )
    .await;
    match copied {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(DockerError::Workspace(format!("cannot copy the workspace in: {e}"))),
        Err(_) => Err(DockerError::Workspace(format!(
            "copying the workspace in took longer than {} s",
            COPY_TIMEOUT.as_secs()
        ))),
    }
}

/// Watching a started job: its output line by line, the caller's verdicts,
/// the deadline and cancellation, until the job ends.
struct Watch<'a, F> {
    docker: &'a Docker,
    id: &'a str,
    /// The job runs under our hold: stopping it means asking the hold, which
    /// reports the job's end, and the container stays up for the copy-out.
    held: bool,
    /// The hold's end-of-job line, up to the exit code.
    marker_prefix: Option<String>,
    on_line: F,
    /// Output after the last newline.
    pending: Vec<u8>,
    stderr_tail: Vec<u8>,
    verdict: Verdict,
    /// The job's own exit code, from the hold's end-of-job line.
    held_exit: Option<i64>,
    /// Why we stopped the job, while a held job's end is awaited.
    stopping: Option<Ending>,
}

impl<F: FnMut(&str) -> Verdict> Watch<'_, F> {
    async fn run(
        &mut self,
        mut output: Output,
        deadline: tokio::time::Sleep,
        cancel: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Ending, DockerError> {
        tokio::pin!(deadline);
        let mut cancel = cancel;
        let grace = tokio::time::sleep(Duration::from_secs(u32::MAX as u64));
        tokio::pin!(grace);
        loop {
            if let Some(code) = self.held_exit {
                return Ok(self.stopping.take().unwrap_or(Ending::Exited(code)));
            }
            let stopped = tokio::select! {
                item = output.next() => match item {
                    Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                        self.stdout(&message, grace.as_mut()).await
                    }
                    Some(Ok(LogOutput::StdErr { message })) => {
                        self.stderr(&message);
                        None
                    }
                    Some(Ok(LogOutput::StdIn { .. })) => None,
                    Some(Err(_)) | None => return self.closed(deadline.as_mut(), cancel.as_mut()).await,
                },
                _ = &mut deadline, if self.stopping.is_none() => {
                    self.stop(Ending::Killed(KillReason::Timeout), true, grace.as_mut()).await
                }
                _ = &mut cancel, if self.stopping.is_none() => {
                    self.stop(Ending::Cancelled, true, grace.as_mut()).await
                }
                _ = &mut grace => {
                    // The hold did not report: the workspace cannot be trusted.
                    kill(self.docker, self.id).await;
                    Some(self.stopping.take().unwrap_or(Ending::Killed(KillReason::Timeout)))
                }
            };
            if let Some(ending) = stopped {
                return Ok(ending);
            }
        }
    }

    /// Stdout: each complete line goes to the caller, who may stop the job.
    async fn stdout(&mut self, bytes: &[u8], grace: std::pin::Pin<&mut tokio::time::Sleep>) -> Option<Ending> {
        self.lines(bytes);
        let (stop, kill_now) = match (self.verdict, &self.stopping) {
            (Verdict::Kill(reason), None) => (Ending::Killed(reason), true),
            // Claude Code takes a tenth of a second or more to wind down
            // after its result; the answer is in.
            (Verdict::Done, None) => (Ending::Finished, false),
            _ => return None,
        };
        self.stop(stop, kill_now, grace).await
    }

    /// Hand every complete line to the caller (until it says stop), but the
    /// hold's end-of-job line, which gives the job's exit code.
    fn lines(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        while let Some(pos) = memchr::memmem::find(&self.pending, b"\n") {
            let line: Vec<u8> = self.pending.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            if let Some(code) = self
                .marker_prefix
                .as_deref()
                .and_then(|p| text.strip_prefix(p))
                .and_then(|r| r.strip_suffix('}'))
            {
                self.held_exit = Some(code.parse().unwrap_or(-1));
                continue;
            }
            if self.verdict == Verdict::Continue {
                self.verdict = (self.on_line)(&text);
            }
        }
    }

    fn stderr(&mut self, bytes: &[u8]) {
        self.stderr_tail.extend_from_slice(bytes);
        if self.stderr_tail.len() > STDERR_TAIL {
            self.stderr_tail.drain(..self.stderr_tail.len() - STDERR_TAIL);
        }
    }

    /// Stop the job for `why`. A held job is asked to stop through its hold
    /// and given [`HOLD_GRACE`] to report its end (`None`: keep watching);
    /// any other is killed (when `kill_now`) and has ended.
    async fn stop(
        &mut self,
        why: Ending,
        kill_now: bool,
        grace: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Option<Ending> {
        if self.held {
            let _ = self
                .docker
                .kill_container(
                    self.id,
                    Some(KillContainerOptions {
                        signal: "SIGUSR1".into(),
                    }),
                )
                .await;
            self.stopping = Some(why);
            grace.reset(tokio::time::Instant::now() + HOLD_GRACE);
            return None;
        }
        if kill_now {
            kill(self.docker, self.id).await;
        }
        Some(why)
    }

    /// The output closed: hand over a last line without newline, then wait
    /// for the process to exit (within the deadline, unless cancelled).
    async fn closed(
        &mut self,
        deadline: std::pin::Pin<&mut tokio::time::Sleep>,
        cancel: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Ending, DockerError> {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            if self.verdict == Verdict::Continue {
                self.verdict = (self.on_line)(&String::from_utf8_lossy(&rest));
            }
            if let Verdict::Kill(reason) = self.verdict {
                kill(self.docker, self.id).await;
                return Ok(self.stopping.take().unwrap_or(Ending::Killed(reason)));
            }
            if self.verdict == Verdict::Done {
                return Ok(self.stopping.take().unwrap_or(Ending::Finished));
            }
        }
        if let Some(s) = self.stopping.take() {
            return Ok(s);
        }
        tokio::select! {
            code = wait(self.docker, self.id) => Ok(Ending::Exited(code?)),
            _ = deadline => {
                kill(self.docker, self.id).await;
                Ok(Ending::Killed(KillReason::Timeout))
            }
            _ = cancel => {
                kill(self.docker, self.id).await;
                Ok(Ending::Cancelled)
            }
        }
    }
}

/// The workspace of a held job, packed by our binary inside the container,
/// into an unlinked temporary file.
async fn copy_out(docker: &Docker, id: &str, h: &Hold) -> Result<std::fs::File, String> {
    let file = tempfile::tempfile().map_err(|e| format!("cannot make a temporary file: {e}"))?;
    let sink = file.try_clone().map_err(|e| e.to_string())?;
    let copied = tokio::time::timeout(
        COPY_TIMEOUT,
        exec_io(docker, id, &h.user, h.pack.clone(), None, Some((sink, h.out_limit))),
    )
    .await;
    match copied {
        Ok(Ok(_)) => {
            use std::io::Seek;
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(0)).map_err(|e| e.to_string())?;
            Ok(file)
        }
        Ok(Err(e)) => Err(format!("cannot copy the workspace out: {e}")),
        Err(_) => Err(format!(
            "copying the workspace out took longer than {} s",
            COPY_TIMEOUT.as_secs()
        )),
    }
}

/// Run `cmd` in the container as `user`: feed it `input`, keep its stdout
/// in `out` (at most the given number of bytes), and fail with its stderr
/// unless it exits 0.
async fn exec_io(
    docker: &Docker,
    id: &str,
    user: &str,
    cmd: Vec<String>,
    input: Option<std::fs::File>,
    out: Option<(std::fs::File, u64)>,
) -> Result<(), String> {
    use bollard::exec::{StartExecOptions, StartExecResults};
    use tokio::io::AsyncReadExt;
    let created = docker
        .create_exec(
            id,
            bollard::models::ExecConfig {
                attach_stdin: Some(input.is_some()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(false),
                user: Some(user.to_string()),
                cmd: Some(cmd),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let started = docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: Some(256 << 10),
            }),
        )
        .await
        .map_err(|e| e.to_string())?;
    let StartExecResults::Attached {
        mut output,
        input: mut sink,
    } = started
    else {
        return Err("the engine did not attach to the copy".into());
    };
    let feed = async {
        if let Some(f) = input {
            let mut f = tokio::fs::File::from_std(f);
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                sink.write_all(&buf[..n]).await?;
            }
        }
        sink.shutdown().await
    };
    let drain = async {
        let mut err = Vec::new();
        let (mut file, limit) = match out {
            Some((f, limit)) => (Some(f), limit),
            None => (None, 0),
        };
        let mut written = 0u64;
        while let Some(item) = output.next().await {
            match item.map_err(|e| e.to_string())? {
                LogOutput::StdOut { message } => {
                    if let Some(f) = file.as_mut() {
                        written += message.len() as u64;
                        if written > limit {
                            return Err(format!("the workspace grew past its limit of {limit} bytes"));
                        }
                        use std::io::Write;
                        f.write_all(&message).map_err(|e| e.to_string())?;
                    }
                }
                LogOutput::StdErr { message } if err.len() < 4096 => err.extend_from_slice(&message),
                _ => {}
            }
        }
        Ok::<_, String>(err)
    };
    let (fed, drained) = tokio::join!(feed, drain);
    let err = drained?;
    fed.map_err(|e| format!("cannot send the workspace: {e}"))?;
    let inspected = docker.inspect_exec(&created.id).await.map_err(|e| e.to_string())?;
    match inspected.exit_code {
        Some(0) => Ok(()),
        code => Err(format!(
            "exit {}: {}",
            code.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
            String::from_utf8_lossy(&err).trim()
        )),
    }
}

/// Exit code meaning "removed from outside" (`opt-out`, `clean --force`).
pub const EXIT_REMOVED: i64 = -1;
/// Exit code meaning "killed by the kernel for exceeding its memory limit".
pub const EXIT_OOM: i64 = -2;

async fn wait(docker: &Docker, id: &str) -> Result<i64, DockerError> {
    let code = wait_code(docker, id).await?;
    if code != 137 {
        return Ok(code);
    }
    // Tell apart an exit of its own from a removal or an OOM kill, which
    // both look like SIGKILL (137) from here.
    match docker
        .inspect_container(id, None::<bollard::query_parameters::InspectContainerOptions>)
        .await
    {
        Err(e) if is_not_found(&e) => Ok(EXIT_REMOVED),
        Ok(i) => {
            let state = i.state.unwrap_or_default();
            if state.oom_killed == Some(true) {
                Ok(EXIT_OOM)
            } else if state.status.is_some_and(|s| s.to_string() == "removing") {
                Ok(EXIT_REMOVED)
            } else {
                Ok(code)
            }
        }
        Err(_) => Ok(code),
    }
}

/// Is the container gone or on its way out?
async fn being_removed(docker: &Docker, id: &str) -> bool {
    match docker
        .inspect_container(id, None::<bollard::query_parameters::InspectContainerOptions>)
        .await
    {
        Err(e) => is_not_found(&e),
        Ok(i) => i
            .state
            .and_then(|s| s.status)
            .is_some_and(|s| matches!(s.to_string().as_str(), "removing" | "dead")),
    }
}

async fn wait_code(docker: &Docker, id: &str) -> Result<i64, DockerError> {
    let mut s = docker.wait_container(id, None::<bollard::query_parameters::WaitContainerOptions>);
    match s.next().await {
        Some(Ok(r)) => Ok(r.status_code),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
        // Removed under us (`opt-out`, `clean --force`): it is over.
        Some(Err(e)) if is_not_found(&e) => Ok(EXIT_REMOVED),
        Some(Err(e)) => Err(e.into()),
        None => Ok(-1),
    }
}

async fn kill(docker: &Docker, id: &str) {
    // It may have exited on its own meanwhile; removal follows either way.
    let _ = docker
        .kill_container(
            id,
            Some(KillContainerOptions {
                signal: "SIGKILL".into(),
            }),
        )
        .await;
}

/// Force-remove a container; a container already gone is fine.
///
/// A busy engine can answer 409 (removal already in progress) or time out;
/// keep asking for up to ~15 s until it confirms the container is gone, so
/// no path leaves one behind.
pub async fn remove(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    for attempt in 0..50u32 {
        match docker.remove_container(id, Some(opts.clone())).await {
            Ok(()) => {
                tracing::debug!(container = id, "removed");
                return;
            }
            Err(e) if is_not_found(&e) => return,
            Err(e) => {
                tracing::debug!(container = id, attempt, error = %e, "container removal not done yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    tracing::warn!(
        container = id,
        "the engine did not confirm the container's removal; `clean` will remove it"
    );
}

/// A container of ours, as listed by the engine.
#[derive(Debug, Clone)]
pub struct Ours {
    pub id: String,
    pub name: String,
    pub image: String,
    pub running: bool,
    /// Created but not started yet: a live job between create and start.
    pub starting: bool,
    pub job_id: Option<String>,
    /// The install that started it (absent on containers of versions
    /// before install labels).
    pub install_id: Option<String>,
}

/// Whose containers a command may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Only this install's (the audit log's id); `None` when this install
    /// has no log yet, so it can have started no job.
    Install(Option<String>),
    /// Every container carrying our label, whichever install started it
    /// (`clean --all-installs`).
    AllInstalls,
}

impl Scope {
    /// This install's scope, from its audit log's id.
    pub fn this_install(paths: &crate::paths::Paths) -> Scope {
        Scope::Install(
            crate::audit::AuditLog::new(paths)
                .read_head()
                .ok()
                .flatten()
                .map(|h| h.log_id),
        )
    }

    fn admits(&self, install_id: Option<&str>) -> bool {
        match self {
            Scope::AllInstalls => true,
            Scope::Install(Some(ours)) => install_id == Some(ours.as_str()),
            Scope::Install(None) => false,
        }
    }
}

/// Every container carrying our label (running or not) within `scope`.
pub async fn list_ours(
    docker: &Docker,
    profile: &super::profile::Profile,
    scope: &Scope,
) -> Result<Vec<Ours>, DockerError> {
    let (label, job_label, install_label) = (&profile.label, &profile.job_label, &profile.install_label);
    let mut wanted = vec![format!("{label}=true")];
    if let Scope::Install(Some(id)) = scope {
        wanted.push(format!("{install_label}={id}"));
    }
    if *scope == Scope::Install(None) {
        return Ok(Vec::new());
    }
    let filters = std::collections::HashMap::from([("label".to_string(), wanted)]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    Ok(list
        .into_iter()
        // Belt and braces: only what really carries the labels.
        .filter(|c| {
            c.labels.as_ref().is_some_and(|l| {
                l.get(label.as_str()).map(String::as_str) == Some("true")
                    && scope.admits(l.get(install_label.as_str()).map(String::as_str))
            })
        })
        .map(|c| Ours {
            id: c.id.unwrap_or_default(),
            name: c
                .names
                .and_then(|n| n.first().cloned())
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            image: c.image.unwrap_or_default(),
            running: c
                .state
                .as_ref()
                .is_some_and(|s| matches!(s.to_string().as_str(), "running" | "restarting" | "paused")),
            // A job's container is created a moment before it starts; one
            // that stays "created" for long is a leftover.
            starting: c.state.as_ref().is_some_and(|s| s.to_string() == "created")
                && c.created.is_some_and(|t| chrono::Utc::now().timestamp() - t < 120),
            install_id: c.labels.as_ref().and_then(|l| l.get(install_label.as_str()).cloned()),
            job_id: c.labels.and_then(|l| l.get(job_label.as_str()).cloned()),
        })
        .collect())
}
