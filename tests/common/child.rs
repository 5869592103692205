//! A background run of our binary ([`Spawned`]): reader threads collect its
//! stdout and stderr lines as they come, so a test waits for the line that
//! says an event happened (`connected`, `posted t-...`, `running on node`)
//! instead of sleeping. It is killed and reaped on drop.
//!
//! Only for commands that keep running while the test acts; anything that
//! simply finishes goes through `Run::run`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Output;

/// One output stream: its lines so far, its raw bytes, and whether it ended.
#[derive(Default)]
struct Stream {
    state: Mutex<StreamState>,
    grew: Condvar,
}

#[derive(Default)]
struct StreamState {
    lines: Vec<String>,
    bytes: Vec<u8>,
    ended: bool,
}

impl Stream {
    fn collect<R: Read + Send + 'static>(self: &Arc<Self>, r: R) -> JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = r.read_until(b'\n', &mut buf).unwrap_or(0);
                let mut s = me.state.lock().unwrap();
                if n == 0 {
                    s.ended = true;
                    me.grew.notify_all();
                    return;
                }
                s.bytes.extend_from_slice(&buf);
                let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                s.lines.push(String::from_utf8_lossy(line).into_owned());
                me.grew.notify_all();
            }
        })
    }

    /// The first line (from the start) that matches, waiting for it until
    /// `timeout` passes or the stream ends.
    fn wait_line(&self, timeout: Duration, pred: &dyn Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap();
        let mut seen = 0;
        loop {
            if let Some(l) = s.lines[seen..].iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            seen = s.lines.len();
            let now = Instant::now();
            if s.ended || now >= deadline {
                return None;
            }
            s = self.grew.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    fn lines(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.state.lock().unwrap().bytes).into_owned()
    }
}

/// A running child of ours with its output collected (see the module doc).
pub struct Spawned {
    child: Child,
    /// The exit code, once reaped.
    code: Option<i32>,
    stdin: Option<ChildStdin>,
    out: Arc<Stream>,
    err: Arc<Stream>,
    readers: Vec<JoinHandle<()>>,
    feeder: Option<JoinHandle<()>>,
}

impl Spawned {
    /// Start `cmd`; stdin gets `input` (then closes), or stays open for the
    /// test when `keep_stdin`, or is empty.
    pub(super) fn start(mut cmd: Command, input: Option<Vec<u8>>, keep_stdin: bool) -> Spawned {
        let piped = input.is_some() || keep_stdin;
        cmd.stdin(if piped { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn claude-max-market");
        let (out, err) = (Arc::new(Stream::default()), Arc::new(Stream::default()));
        let readers = vec![
            out.collect(child.stdout.take().expect("piped stdout")),
            err.collect(child.stderr.take().expect("piped stderr")),
        ];
        let mut stdin = child.stdin.take();
        let feeder = input.map(|bytes| {
            let mut sin = stdin.take().expect("piped stdin");
            std::thread::spawn(move || {
                let _ = sin.write_all(&bytes);
            })
        });
        Spawned {
            child,
            code: None,
            stdin,
            out,
            err,
            readers,
            feeder,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The open stdin of a [`super::Run::spawn_with_stdin`] child.
    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.stdin.as_mut().expect("stdin kept open")
    }

    /// Close stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The first stdout line matching `pred`, or `None` once `timeout`
    /// passes or stdout ends without one.
    pub fn stdout_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.out.wait_line(timeout, &pred)
    }

    /// [`Spawned::stdout_line`] for stderr.
    pub fn stderr_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.err.wait_line(timeout, &pred)
    }

    /// The first stdout line matching `pred`; fails the test, showing both
    /// streams, if none comes within `secs`.
    #[track_caller]
    pub fn expect_stdout(&self, secs: u64, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.stdout_line(Duration::from_secs(secs), pred)
            .unwrap_or_else(|| self.fail(&format!("no {what} on stdout within {secs}s")))
    }

    /// [`Spawned::expect_stdout`] for stderr.
    #[track_caller]
    pub fn expect_stderr(&self, secs: u64, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.stderr_line(Duration::from_secs(secs), pred)
            .unwrap_or_else(|| self.fail(&format!("no {what} on stderr within {secs}s")))
    }

    /// The first JSON stdout line matching `pred`, as for
    /// [`Spawned::expect_stdout`].
    #[track_caller]
    pub fn expect_json(&self, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let l = self.expect_stdout(secs, what, |l| serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v)));
        serde_json::from_str(&l).expect("a JSON line")
    }

    /// Stdout's JSON lines so far.
    pub fn json_lines(&self) -> Vec<Value> {
        self.out
            .lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stdout so far, as printed.
    pub fn stdout_text(&self) -> String {
        self.out.text()
    }

    /// Stderr so far, as printed.
    pub fn stderr_text(&self) -> String {
        self.err.text()
    }

    #[track_caller]
    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout_text(),
            self.stderr_text()
        )
    }

    /// Send `sig` (SIGINT, SIGTERM, ...) to the child, unless it has
    /// already been reaped.
    pub fn signal(&self, sig: i32) {
        if self.code.is_none() {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// Its exit code if it has exited (and is now reaped), else `None`.
    pub fn exited(&mut self) -> Option<i32> {
        if self.code.is_none() {
            let st = self.child.try_wait().expect("try_wait")?;
            self.code = Some(st.code().unwrap_or(-1));
        }
        self.code
    }

    /// Wait for it to exit by itself and return the exit code; its output
    /// lines stay readable (the readers may still be draining the pipes).
    pub fn wait_code(&mut self) -> i32 {
        self.stdin = None;
        if self.code.is_none() {
            let st = self.child.wait().expect("wait for claude-max-market");
            self.code = Some(st.code().unwrap_or(-1));
        }
        self.code.unwrap_or(-1)
    }

    /// Wait for it to exit by itself, then for the rest of its output.
    pub fn wait(mut self) -> Output {
        let code = self.wait_code();
        self.finish(code)
    }

    /// [`Spawned::wait`] with a deadline: fails the test, killing the
    /// child, if it has not exited within `timeout`.
    #[track_caller]
    pub fn wait_within(mut self, timeout: Duration, what: &str) -> Output {
        match super::wait_some(timeout, || self.exited()) {
            Some(code) => self.finish(code),
            None => {
                self.kill9();
                self.fail(&format!("{what}: still running after {timeout:?}"))
            }
        }
    }

    /// `kill -9` and reap (no-op once it has exited).
    pub fn kill9(&mut self) {
        if self.code.is_none() {
            let _ = self.child.kill();
            let st = self.child.wait().expect("reap");
            self.code = Some(st.code().unwrap_or(-1));
        }
    }

    fn finish(mut self, status: i32) -> Output {
        self.stdin = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if let Some(f) = self.feeder.take() {
            let _ = f.join();
        }
        Output {
            status,
            stdout: self.out.text(),
            stderr: self.err.text(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill9();
    }
}
