//! How image and job progress look on stderr: a spinner and bars on a
//! terminal, and only the lines that matter (retries, rate limits, warnings)
//! when stderr is a file or pipe; and how a federated job's steps and its
//! settled result look (`bid --wait` and `market result` share them).
//! Rendering only: nothing here decides or records anything.

use std::io::{self, IsTerminal};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::context::{self, Printer};
use crate::docker::image::{ImageEvent, ImageProgress};
use crate::job::{JobEvent, Progress};
use crate::market::requester::{Outcome, RequesterEvent};

pub struct StderrProgress {
    printer: Printer,
    tty: bool,
    /// `execute --output-format stream-json`: Claude Code's own event lines
    /// go to stdout as they come.
    stream_stdout: bool,
    spinner: Mutex<Option<ProgressBar>>,
    layers: Mutex<Option<(MultiProgress, std::collections::HashMap<String, ProgressBar>)>>,
}

impl StderrProgress {
    pub fn new(printer: &Printer) -> StderrProgress {
        StderrProgress {
            printer: printer.clone(),
            tty: io::stderr().is_terminal() && !printer.quiet,
            stream_stdout: false,
            spinner: Mutex::new(None),
            layers: Mutex::new(None),
        }
    }

    /// Pass Claude Code's own event lines through to stdout.
    pub fn stream_to_stdout(mut self, on: bool) -> StderrProgress {
        self.stream_stdout = on;
        self
    }

    fn spin(&self, msg: String) {
        if !self.tty {
            return;
        }
        let mut s = self.spinner.lock().unwrap_or_else(|e| e.into_inner());
        let bar = s.get_or_insert_with(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        bar.set_message(msg);
    }

    /// A line that stays, printed above the spinner when there is one.
    fn line(&self, text: &str) {
        if self.printer.quiet {
            return;
        }
        let s = self.spinner.lock().unwrap_or_else(|e| e.into_inner());
        match s.as_ref() {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = self.spinner.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
        if let Some((m, bars)) = self.layers.lock().unwrap_or_else(|e| e.into_inner()).take() {
            for b in bars.values() {
                b.finish_and_clear();
            }
            let _ = m.clear();
        }
    }
}

impl ImageProgress for StderrProgress {
    fn image_event(&self, event: ImageEvent<'_>) {
        match event {
            ImageEvent::Step(s) => {
                if self.tty {
                    self.line(s);
                    self.spin(s.to_string());
                }
            }
            ImageEvent::Output(o) => {
                if self.tty {
                    self.spin(o.chars().take(100).collect());
                }
            }
            ImageEvent::Note(n) => self.line(n),
            ImageEvent::Layer {
                id,
                status,
                current,
                total,
            } => {
                if !self.tty || id.is_empty() {
                    return;
                }
                let mut l = self.layers.lock().unwrap_or_else(|e| e.into_inner());
                let (multi, bars) = l.get_or_insert_with(|| (MultiProgress::new(), Default::default()));
                let bar = bars.entry(id.to_string()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(0));
                    b.set_style(
                        ProgressStyle::with_template("{prefix} {wide_bar} {bytes}/{total_bytes} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    b.set_prefix(id.to_string());
                    b
                });
                if let Some(t) = total {
                    bar.set_length(t.max(0) as u64);
                }
                if let Some(c) = current {
                    bar.set_position(c.max(0) as u64);
                }
                bar.set_message(status.to_string());
            }
        }
    }
}

impl Progress for StderrProgress {
    fn job_event(&self, event: JobEvent<'_>) {
        match event {
            JobEvent::Approved { .. } => {}
            JobEvent::Starting { image, model } => self.spin(format!("starting {model} in {image}")),
            JobEvent::Init { model } => self.spin(format!("running ({})", model.unwrap_or("?"))),
            JobEvent::Tokens { so_far, turns, max } => {
                let text = format!("turn {turns} · {so_far}/{max} fresh tokens");
                // Without a terminal there is no spinner; `-v` still shows
                // the job's progress, a line per update.
                if !self.tty && self.printer.verbose > 0 && !self.printer.quiet {
                    self.line(&text);
                }
                self.spin(text);
            }
            JobEvent::Retry(r) => self.line(&format!(
                "Claude API retry: attempt {}/{} in {} ms{}",
                r.attempt,
                r.max_retries,
                r.retry_delay_ms,
                r.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
            )),
            JobEvent::RateLimit(r) => {
                if r.rejected() || r.status != "allowed" {
                    self.line(&format!(
                        "rate limit {}{}{}",
                        r.status,
                        r.kind.as_ref().map(|k| format!(" ({k})")).unwrap_or_default(),
                        r.resets_at_text().map(|t| format!("; resets {t}")).unwrap_or_default()
                    ));
                }
            }
            JobEvent::InvalidLine(l) => {
                let short: String = l.chars().take(80).collect();
                self.printer
                    .warn(&format!("ignored a line that is not a stream-json event: {short}"));
            }
            JobEvent::StreamLine(l) => {
                if self.stream_stdout {
                    use std::io::Write;
                    let mut out = io::stdout().lock();
                    // A closed pipe is the reader's choice, not our failure.
                    let _ = writeln!(out, "{l}").and_then(|_| out.flush());
                }
            }
            JobEvent::Killing(r) => self.line(&format!("stopping the job: {}", r.name())),
            JobEvent::Cancelling => self.line("cancelling: removing the container"),
        }
    }

    fn note(&self, text: &str) {
        self.line(&format!("note: {text}"));
    }

    fn ask(&self, question: &str) -> io::Result<Option<bool>> {
        if !context::interactive() {
            return Ok(None);
        }
        context::confirm(question).map(Some)
    }
}

/// The first 16 characters of a node id, enough to tell nodes apart.
pub fn short(node_id: &str) -> &str {
    node_id.get(..16).unwrap_or(node_id)
}

/// One line of progress (stderr) for a step of following a task.
pub fn requester_line(ev: &RequesterEvent) -> String {
    match ev {
        RequesterEvent::Posted { task_id, escrow } => format!("posted {task_id}; {escrow} RUV locked in escrow"),
        RequesterEvent::Assigned { attempt, provider, .. } => {
            format!("assigned to node {} (attempt {attempt})", short(provider))
        }
        RequesterEvent::Running { provider, .. } => {
            format!("payload sent encrypted; running on node {}", short(provider))
        }
        RequesterEvent::PayloadRefused { error, .. } => format!("payload not relayed: {error}"),
        RequesterEvent::Delivered { attempt, .. } => format!("result delivered (attempt {attempt}); verifying"),
        RequesterEvent::Progress {
            attempt,
            turns,
            tokens,
            files_changed,
            ..
        } => match files_changed {
            Some(n) => format!("attempt {attempt}: done after {turns} turns, {tokens} tokens; {n} files changed"),
            None => format!("attempt {attempt}: {turns} turns, {tokens} tokens so far"),
        },
        RequesterEvent::Checking { accept_cmd, .. } => match accept_cmd {
            Some(c) => format!("rebuilding the changes on a copy of the workspace and running `{c}`"),
            None => "rebuilding the changes on a copy of the workspace".into(),
        },
        RequesterEvent::ResultRejected {
            attempt,
            provider,
            reason,
            state,
            ..
        } => format!(
            "attempt {attempt} on node {} rejected ({}); the task is {state}",
            short(provider),
            reason.lines().next().unwrap_or_default()
        ),
        RequesterEvent::AttemptFailed {
            attempt,
            provider,
            reason,
            error,
            ..
        } => format!(
            "attempt {attempt} on node {} {}: {}; the task is re-offered",
            short(provider),
            reason.as_str(),
            error.as_deref().unwrap_or("no report")
        ),
        RequesterEvent::Refunded { amount, why, .. } => format!("refunded {amount} RUV: {why}"),
        RequesterEvent::Failover { endpoint, from } => {
            format!("connection to {from} lost; now using {endpoint}, carrying on with the task")
        }
        RequesterEvent::Warning { message } => message.clone(),
    }
}

/// A step of following a task, on stderr (warnings as warnings).
pub fn show_step(p: &Printer, ev: &RequesterEvent) {
    match ev {
        RequesterEvent::Warning { message } => p.warn(message),
        ev => p.note(&requester_line(ev)),
    }
}

/// A serialised outcome with `"ok": true` beside its fields.
pub fn ok(outcome: &impl serde::Serialize) -> serde_json::Value {
    let mut v = serde_json::to_value(outcome).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.insert("ok".into(), true.into());
    }
    v
}

/// The exit code of a settled result: refused (3) when `--apply` could not
/// write the accepted changes into DIR (the patch is kept), as `execute
/// --apply` does.
pub fn settled_exit(o: &Outcome) -> crate::exit::Exit {
    match o.workspace.as_ref().and_then(|w| w.apply_error.as_ref()) {
        Some(_) => crate::exit::Exit::Refused,
        None => crate::exit::Exit::Ok,
    }
}

/// A verified, settled result: the payment on stderr, the result text on
/// stdout (`--json`: the whole record).
pub fn render_settled(o: &Outcome, p: &Printer) {
    p.note(&format!(
        "verified and settled: paid {} RUV, refunded {} RUV",
        o.settlement.paid, o.settlement.refunded
    ));
    if let Some(w) = &o.workspace {
        p.note(&format!("changes: {}", w.changes["summary"].as_str().unwrap_or("none")));
        if let Some(a) = &w.acceptance {
            p.note(&format!("acceptance command passed in {} ms", a.duration_ms));
        }
        match (&w.applied, &w.apply_error, &w.patch) {
            (Some(a), _, _) => p.note(&format!("{} in {}", a.summary(), w.dir.display())),
            (None, Some(e), _) => p.warn(e),
            (None, None, Some(path)) => p.note(&format!("patch saved at {}", path.display())),
            _ => {}
        }
    }
    if p.json {
        p.json(ok(o));
    } else {
        p.out(o.text());
    }
}
