//! `Ctx`: everything a command needs, resolved once — paths, config (lazily)
//! and the [`Printer`] that decides where output goes. It holds no audit
//! handle: the library operations write their own events.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};

use serde_json::Value;

use crate::config::{Config, ConfigError};
use crate::paths::Paths;

/// `text` with every control character but newline and tab written as an
/// escape (`\x1b`, `\u{9b}`), for echoing user input to a terminal: an
/// argument or file name carrying ESC must not be able to move the cursor,
/// recolour or retitle the terminal of whoever reads the error.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if c.is_control() && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON documents printed with `--json` carry this version.
pub const SCHEMA_VERSION: u32 = 1;

/// Output policy: human text or one JSON document on stdout; notes and
/// progress on stderr; `-q` silences notes, `-v` adds detail.
#[derive(Debug, Clone)]
pub struct Printer {
    pub json: bool,
    pub quiet: bool,
    pub verbose: u8,
    color: bool,
}

impl Printer {
    pub fn new(json: bool, quiet: bool, verbose: u8) -> Printer {
        let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && io::stderr().is_terminal();
        Printer {
            json,
            quiet,
            verbose,
            color,
        }
    }

    /// The answer, on stdout. A closed pipe (`| head`) ends the process
    /// quietly with success, like other Unix tools.
    pub fn out(&self, text: &str) {
        let mut o = io::stdout().lock();
        if let Err(e) = o.write_all(text.as_bytes()).and_then(|_| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                o.write_all(b"\n")
            }
        }) {
            exit_on_pipe(e);
        }
        let _ = o.flush();
    }

    /// One JSON document on stdout, with `schema_version` added to objects.
    pub fn json(&self, value: Value) {
        let value = with_schema_version(value);
        let text = serde_json::to_string_pretty(&value).expect("JSON values serialise");
        self.out(&text);
    }

    /// A note for people, on stderr; silent with `-q`.
    pub fn note(&self, text: &str) {
        if !self.quiet {
            eprintln!("{text}");
        }
    }

    /// Detail shown only with `-v`.
    pub fn detail(&self, text: &str) {
        if self.verbose > 0 && !self.quiet {
            eprintln!("{text}");
        }
    }

    /// A warning, on stderr; shown even with `-q`.
    pub fn warn(&self, text: &str) {
        eprintln!("{} {}", self.paint("warning:", "33;1"), printable(text));
    }

    pub fn paint(&self, text: &str, sgr: &str) -> String {
        if self.color {
            format!("\x1b[{sgr}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    pub fn bold(&self, text: &str) -> String {
        self.paint(text, "1")
    }
    pub fn green(&self, text: &str) -> String {
        self.paint(text, "32")
    }
    pub fn yellow(&self, text: &str) -> String {
        self.paint(text, "33")
    }
    pub fn red(&self, text: &str) -> String {
        self.paint(text, "31")
    }
}

/// Add `schema_version` as the first key of an object document.
pub fn with_schema_version(value: Value) -> Value {
    match value {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            out.insert("schema_version".into(), Value::from(SCHEMA_VERSION));
            out.extend(m.into_iter().filter(|(k, _)| k != "schema_version"));
            Value::Object(out)
        }
        other => other,
    }
}

fn exit_on_pipe(e: io::Error) {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
}

/// Resolved state for one command run.
pub struct Ctx {
    pub paths: Paths,
    pub printer: Printer,
    config: OnceCell<Config>,
}

impl Ctx {
    pub fn new(paths: Paths, printer: Printer) -> Ctx {
        // Settle a change a crash left half-done (write-ahead recovery,
        // `crate::txn`): one `stat` when there is none. A failure here is
        // reported, not fatal: read-only commands must still run, and every
        // change re-runs recovery under the lock and refuses on failure.
        if let Err(e) = crate::txn::recover(&paths) {
            printer.warn(&format!("could not settle an interrupted change: {e}"));
        }
        Ctx {
            paths,
            printer,
            config: OnceCell::new(),
        }
    }

    /// The config, loaded on first use (commands that never need it, like
    /// `terms`, never read the file).
    pub fn config(&self) -> Result<&Config, ConfigError> {
        if let Some(c) = self.config.get() {
            return Ok(c);
        }
        let c = Config::load(&self.paths)?;
        Ok(self.config.get_or_init(|| c))
    }

    /// Forget the cached config after this process changed the file.
    pub fn reload_config(&mut self) {
        self.config = OnceCell::new();
    }

    pub fn out(&self) -> &Printer {
        &self.printer
    }
}

/// Is there a person at the keyboard to ask? (stdin and stderr are terminals.)
pub fn interactive() -> bool {
    io::stdin().is_terminal() && io::stderr().is_terminal()
}

/// Ask a question on stderr and read one line from stdin (trimmed).
/// Returns `None` at end of input.
pub fn ask(question: &str) -> io::Result<Option<String>> {
    eprint!("{question}");
    io::stderr().flush()?;
    let mut line = String::new();
    if io::stdin().read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim().to_string()))
}

/// Ask a yes/no question; anything but y/yes is no.
pub fn confirm(question: &str) -> io::Result<bool> {
    Ok(matches!(
        ask(&format!("{question} [y/N] "))?
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("y" | "yes")
    ))
}
