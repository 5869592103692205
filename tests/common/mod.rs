//! Test harness shared by every integration test: a private `CMM_HOME`, the
//! real binary, and assertions on exit code, stdout, stderr and files.
//!
//! ```ignore
//! let t = Cmm::new();
//! t.run(&["opt-in", "--accept-terms"]).code(0);
//! let v = t.run(&["status", "--json"]).code(0).json();
//! ```
#![allow(dead_code)]

pub mod raw_tar;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

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

    /// A command ready to run (add env or stdin, then `.run()`).
    pub fn cmd(&self, args: &[&str]) -> Run {
        let mut c = Command::new(BIN);
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
}

pub struct Run {
    pub cmd: Command,
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

    pub fn run(mut self) -> Output {
        self.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = self.cmd.spawn().expect("spawn claude-max-market");
        if let Some(bytes) = self.stdin.take() {
            let mut sin = child.stdin.take().expect("piped stdin");
            std::thread::spawn(move || {
                let _ = sin.write_all(&bytes);
            });
        }
        let out = child.wait_with_output().expect("wait for claude-max-market");
        Output {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
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
pub fn kill_after(mut child: std::process::Child, delay: std::time::Duration) -> bool {
    std::thread::sleep(delay);
    let alive = child.try_wait().unwrap().is_none();
    if alive {
        // SAFETY: sending SIGKILL to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    }
    let _ = child.wait();
    alive
}
