//! Shared by the market tests: a real `market serve` process on a free
//! loopback port with its own database, and nodes with their own `CMM_HOME`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_max_market::crypto::keys::Identity;
use claude_max_market::market::client::Client;
use claude_max_market::market::protocol::{Event, Reason, Request};
use claude_max_market::{AuditLog, Paths};
use serde_json::Value;

use crate::common::{Cmm, BIN};

/// A coordinator process. Killed (SIGKILL) and reaped on drop.
pub struct Server {
    pub home: Cmm,
    pub db: PathBuf,
    pub addr: String,
    pub endpoint: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        let home = Cmm::new();
        let db = home.file("market.db");
        let mut s = Server {
            home,
            db,
            addr: "127.0.0.1:0".into(),
            endpoint: String::new(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        s.spawn();
        s
    }

    /// (Re)start on the same address and database.
    pub fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut cmd = Command::new(BIN);
            cmd.env("CMM_HOME", self.home.path())
                .env("NO_COLOR", "1")
                .args(["market", "serve", "--listen", &self.addr, "--db"])
                .arg(&self.db)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn market serve");
            let mut line = String::new();
            let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
            let _ = out.read_line(&mut line);
            if let Some(i) = line.find("ws://") {
                let ep = line[i..].split_whitespace().next().unwrap_or_default().to_string();
                self.addr = ep.trim_start_matches("ws://").to_string();
                self.endpoint = ep;
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            let _ = child.wait();
            assert!(Instant::now() < deadline, "market serve did not start: {line}{err}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        let mut c = self.child.take().expect("running server");
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().expect("wait").code().unwrap_or(-1)
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn http_get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(&self.addr).expect("connect for HTTP");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    }

    pub fn metric(&self, name: &str) -> i64 {
        let text = self.http_get("/metrics");
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// `market ledger --verify --json`; asserts it verifies.
    #[track_caller]
    pub fn verify(&self) -> Value {
        verify_db(&self.db)
    }
}

#[track_caller]
pub fn verify_db(db: &Path) -> Value {
    let t = Cmm::new();
    let out = t.run(&["--json", "market", "ledger", "--verify", "--db", db.to_str().unwrap()]);
    let v = out.json();
    assert_eq!(v["ok"], true, "ledger does not verify: {v:#}");
    out.code(0);
    v
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A node with its own `CMM_HOME` and identity.
pub struct Node {
    pub home: Cmm,
    pub id: Identity,
}

impl Node {
    pub fn new() -> Node {
        let home = Cmm::new();
        let paths = Paths::in_one_dir(home.path().to_path_buf());
        let id = Identity::load_or_generate(&paths, &AuditLog::new(&paths)).expect("node identity");
        Node { home, id }
    }

    pub fn node_id(&self) -> String {
        self.id.node_id().to_string()
    }

    pub async fn connect(&self, s: &Server) -> Client {
        Client::connect(&s.endpoint, &self.id)
            .await
            .expect("connect and authenticate")
    }
}

pub fn hash(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

pub fn post(max_price: u64) -> Request {
    Request::Post {
        model: "sonnet".into(),
        max_tokens: 1000,
        max_price,
        payload_hash: hash("a prompt"),
        deadline_secs: 600,
        max_attempts: None,
        min_reputation: None,
        payload_bytes: None,
    }
}

pub fn offer(price: u64) -> Request {
    Request::Offer {
        slots: 4,
        price,
        models: vec!["sonnet".into()],
        ttl_secs: 3600,
    }
}

/// Wait for an event matching `pred`, failing after `secs`.
pub async fn expect_event(c: &mut Client, secs: u64, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_event(left).await {
            Some(ev) if pred(&ev) => return ev,
            Some(_) => continue,
            None => panic!("no {what} event within {secs}s"),
        }
    }
}

#[track_caller]
pub fn reason_of(r: Result<Value, claude_max_market::market::client::ClientError>) -> Reason {
    match r {
        Ok(v) => panic!("expected a rejection, got {v}"),
        Err(e) => e.reason().unwrap_or_else(|| panic!("expected a rejection, got {e}")),
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
