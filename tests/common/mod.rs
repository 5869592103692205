//! The one test harness of the integration tests: a private `CMM_HOME`, the
//! real binary run to completion or spawned in the background, assertions
//! on exit code, stdout, stderr and files, and waits with a deadline.
//!
//! Every test file starts with `mod common;`. The parts:
//! - here: [`Cmm`] (an install), [`Run`] (one command), [`Output`],
//!   [`wait_until`] / [`wait_some`], [`kill_after`], [`docker_available`];
//! - [`child`]: [`Spawned`], a background run whose output lines are
//!   collected as they come, to wait on (`advertise`, `bid --wait`, ...);
//! - [`raw_tar`]: hostile tar archives (also used by the library's own
//!   workspace tests through `#[path]`);
//! - `docker.rs`: the fake-claude image and `docker` CLI look-ups;
//! - `market.rs`: a real `market serve` and nodes that talk to it;
//! - `crypto.rs`: installs holding shared identities and envelope layout.
//!
//! The last three are included only by the tests that use them, beside
//! `mod common;` (`#[path = "common/docker.rs"] mod docker;`), so the other
//! test binaries do not compile them (and do not link the library, which
//! the market part needs).
//!
//! No test file runs our binary with `Command::new`: it goes through
//! [`Cmm::cmd`] (or [`bare`]) here, so every run gets the same scrubbed
//! environment. No fixed sleeps stand in for an event: wait for it.
//!
//! ```ignore
//! let t = Cmm::new();
//! t.run(&["opt-in", "--accept-terms"]).code(0);
//! let v = t.run(&["status", "--json"]).code(0).json();
//! ```
#![allow(dead_code)]

pub mod child;
pub mod raw_tar;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use child::Spawned;

pub const BIN: &str = env!("CARGO_BIN_EXE_claude-max-market");

/// Env vars that would leak the developer's setup into a test.
const SCRUB_PREFIXES: &[&str] = &["CMM_", "CLAUDE_", "ANTHROPIC_"];

/// One isolated install: a temporary `CMM_HOME` removed on drop.
pub struct Cmm {
    pub home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Default for Cmm {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmm {
    pub fn new() -> Cmm {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::Builder::new()
            .prefix("cmm-test-")
            .tempdir()
            .expect("temp CMM_HOME");
        // A fresh install's home is private; tests that want otherwise say so.
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod CMM_HOME");
        Cmm { home, env: Vec::new() }
    }

    /// An install that has already accepted the terms.
    pub fn opted_in() -> Cmm {
        let t = Cmm::new();
        t.run(&["opt-in", "--accept-terms"]).code(0);
        t
    }

    pub fn path(&self) -> &Path {
        self.home.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).unwrap_or_default()
    }

    /// Set an env var for every command this install runs.
    pub fn env(mut self, k: &str, v: &str) -> Cmm {
        self.env.push((k.into(), v.into()));
        self
    }

    /// A command ready to run (add env or stdin, then `.run()` or `.spawn()`).
    pub fn cmd(&self, args: &[&str]) -> Run {
        self.cmd_os(args)
    }

    /// [`Cmm::cmd`] with arguments that need not be UTF-8.
    pub fn cmd_os<S: AsRef<OsStr>>(&self, args: &[S]) -> Run {
        self.cmd_of(BIN, args)
    }

    /// [`Cmm::cmd`] for another build of the binary at `bin`.
    pub fn cmd_of<S: AsRef<OsStr>>(&self, bin: &str, args: &[S]) -> Run {
        let mut c = Command::new(bin);
        for (k, _) in std::env::vars() {
            if SCRUB_PREFIXES.iter().any(|p| k.starts_with(p)) && k != "CMM_REQUIRE_DOCKER" {
                c.env_remove(&k);
            }
        }
        c.env("CMM_HOME", self.home.path()).env("NO_COLOR", "1").args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        Run { cmd: c, stdin: None }
    }

    /// Run with no stdin and return the output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).run()
    }

    /// Run on a pseudo-terminal (`tests/fixtures/pty_run.py`), answering
    /// each `prompt=answer` as the prompt appears; stdout holds what the
    /// terminal showed and `EXIT n`.
    pub fn on_terminal(&self, answers: &[&str], args: &[&str]) -> Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pty_run.py");
        let mut argv = vec![script];
        argv.extend_from_slice(answers);
        argv.extend(["--", BIN]);
        argv.extend_from_slice(args);
        self.cmd_of("python3", &argv).run()
    }
}

/// The binary with an empty environment and no install: the workspace
/// modes, which run inside a job's container, get nothing else.
pub fn bare(args: &[&str]) -> Run {
    let mut c = Command::new(BIN);
    c.args(args).env_clear();
    Run { cmd: c, stdin: None }
}

/// One command of our binary, not started yet.
pub struct Run {
    cmd: Command,
    stdin: Option<Vec<u8>>,
}

impl Run {
    pub fn env(mut self, k: &str, v: &str) -> Run {
        self.cmd.env(k, v);
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Run {
        self.stdin = Some(bytes.into());
        self
    }

    /// Run as this user and group (the tests run as root in CI).
    pub fn uid(mut self, uid: u32, gid: u32) -> Run {
        self.cmd.uid(uid).gid(gid);
        self
    }

    /// Run to the end; stdout as bytes (for binary output).
    pub fn run_bytes(mut self) -> RawOutput {
        self.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = self.cmd.spawn().expect("spawn claude-max-market");
        let feeder = self.stdin.take().map(|bytes| {
            let mut sin = child.stdin.take().expect("piped stdin");
            std::thread::spawn(move || {
                let _ = sin.write_all(&bytes);
            })
        });
        let out = child.wait_with_output().expect("wait for claude-max-market");
        if let Some(f) = feeder {
            let _ = f.join();
        }
        RawOutput {
            status: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run to the end and return the output as text.
    pub fn run(self) -> Output {
        let raw = self.run_bytes();
        Output {
            status: raw.status,
            stdout: String::from_utf8_lossy(&raw.stdout).into_owned(),
            stderr: raw.stderr,
        }
    }

    /// Start in the background with every stream closed, for tests that
    /// only kill it (see [`kill_after`]).
    pub fn spawn_silent(mut self) -> Child {
        self.cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.cmd.spawn().expect("spawn claude-max-market")
    }

    /// Start in the background, collecting stdout and stderr lines as they
    /// come; stdin gets the bytes given with [`Run::stdin`], or nothing.
    pub fn spawn(self) -> Spawned {
        Spawned::start(self.cmd, self.stdin, false)
    }

    /// [`Run::spawn`] with stdin left open for the test to write to
    /// ([`Spawned::stdin`]).
    pub fn spawn_with_stdin(self) -> Spawned {
        Spawned::start(self.cmd, None, true)
    }

    /// Run within `bound` (killed and failed past it), stdout discarded,
    /// stdin empty or an endless stream of `a`; reports the peak RSS from
    /// `wait4`, which also reaps the child.
    #[allow(clippy::zombie_processes)]
    pub fn run_bounded(mut self, bound: Duration, endless_stdin: bool) -> Bounded {
        self.cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        self.cmd
            .stdin(if endless_stdin { Stdio::piped() } else { Stdio::null() });
        let start = Instant::now();
        let mut child = self.cmd.spawn().expect("spawn claude-max-market");
        if let Some(mut sin) = child.stdin.take() {
            std::thread::spawn(move || {
                let block = vec![b'a'; 64 << 10];
                while sin.write_all(&block).is_ok() {}
            });
        }
        let mut err = child.stderr.take().expect("piped stderr");
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let pid = child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // Asked every 5 ms: most cases end in a few milliseconds.
        let exited = wait_until_every(bound, Duration::from_millis(5), || {
            // SAFETY: waiting on our own child, with valid out-pointers.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
            r == pid
        });
        if !exited {
            let _ = child.kill();
            // SAFETY: as above; reap the killed child.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            panic!(
                "{:?} still running after {bound:?}: it hangs",
                self.cmd.get_args().collect::<Vec<_>>()
            );
        }
        let elapsed = start.elapsed();
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        Bounded {
            code,
            stderr: reader.join().unwrap(),
            peak_rss_kib: usage.ru_maxrss,
            elapsed,
        }
    }
}

/// What [`Run::run_bounded`] saw.
pub struct Bounded {
    pub code: i32,
    pub stderr: Vec<u8>,
    pub peak_rss_kib: i64,
    pub elapsed: Duration,
}

/// What [`Run::run_bytes`] saw: stdout as bytes.
#[derive(Debug)]
pub struct RawOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Assert the exit code (printing both streams on mismatch).
    #[track_caller]
    pub fn code(&self, want: i32) -> &Output {
        assert_eq!(
            self.status, want,
            "exit code {} (want {want})\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn stdout_has(&self, needle: &str) -> &Output {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn stderr_has(&self, needle: &str) -> &Output {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Parse stdout as one JSON document.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\n--- stderr\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Poll `probe` until it returns a value or `timeout` passes (`None`).
/// The one polling loop of the tests: for state with no line to wait on
/// (files, the audit log, the engine, the database). It asks again after
/// 5 ms, backing off to 100 ms.
pub fn wait_some<T>(timeout: Duration, probe: impl FnMut() -> Option<T>) -> Option<T> {
    poll(timeout, Duration::from_millis(5), Duration::from_millis(100), probe)
}

/// Poll `pred` until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut pred: impl FnMut() -> bool) -> bool {
    wait_some(timeout, || pred().then_some(())).is_some()
}

/// [`wait_until`] asking every `every`, for a test that must act within
/// a fraction of a millisecond of the change.
pub fn wait_until_every(timeout: Duration, every: Duration, mut pred: impl FnMut() -> bool) -> bool {
    poll(timeout, every, every, || pred().then_some(())).is_some()
}

fn poll<T>(timeout: Duration, first: Duration, most: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = first;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(most);
    }
}

/// The pid of a process that has exited and been reaped.
pub fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait for true");
    pid
}

/// Seconds, for deadlines.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Is a Docker engine reachable? Docker tests call this first: without an
/// engine they skip loudly, unless `CMM_REQUIRE_DOCKER=1` makes that a failure.
pub fn docker_available(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CMM_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!("{test}: no Docker engine reachable and CMM_REQUIRE_DOCKER=1");
        }
        eprintln!("\n*** SKIPPED {test}: no Docker engine reachable (set CMM_REQUIRE_DOCKER=1 to fail instead) ***\n");
    }
    ok
}

/// Let `child` run for `delay`, then `kill -9` it if it is still running;
/// reaps it either way. True when the kill landed on a live process.
pub fn kill_after(mut child: Child, delay: Duration) -> bool {
    // A sleep by design: the random moment of the kill is what is tested.
    std::thread::sleep(delay);
    let alive = child.try_wait().unwrap().is_none();
    if alive {
        // SAFETY: sending SIGKILL to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    }
    let _ = child.wait();
    alive
}
